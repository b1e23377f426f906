"""`dinofuse train`, `predict` and `demo` end to end on a tiny synthetic volume, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from napari_dinofuse.defaults import CPU_BF16_ENV, TILES_PER_STEP
from napari_dinofuse.io import open_volume
from napari_dinofuse.modeling.checkpoint import read_training_log

DINOFUSE = str(Path(sys.executable).with_name("dinofuse"))


def _run(*args, env=None):
    return subprocess.run([DINOFUSE, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from napari_dinofuse.synthetic.sample import make_sample

    d = tmp_path_factory.mktemp("cli")
    sample = make_sample(seed=1, raw_shape=(16, 128, 128))
    np.save(d / "raw.npy", np.asarray(sample.raw.data))
    np.save(d / "context.npy", np.asarray(sample.context.data))
    np.save(d / "labels.npy", sample.scribbles(seed=1))
    flags = ["--raw", d / "raw.npy", "--raw-voxel-size", ",".join(map(str, sample.raw.voxel_size)),
             "--raw-offset", ",".join(map(str, sample.raw.offset)),
             "--context", d / "context.npy", "--context-voxel-size", ",".join(map(str, sample.context.voxel_size)),
             "--context-offset", ",".join(map(str, sample.context.offset)),
             "--backbone", "random:tiny", "--device", "cpu", "--cache", d / "cache"]
    return d, sample, flags


def test_train_then_predict_writes_an_aligned_ome_zarr(files):
    d, sample, flags = files
    trained = _run("train", *flags, "--labels", d / "labels.npy", "--out", d / "model", "--iterations", "8",
                   "--base-channels", "4")
    assert trained.returncode == 0, trained.stderr
    assert (d / "model" / "config.json").is_file() and (d / "model" / "model.safetensors").is_file()
    kept = open_volume(d / "model" / "annotations.zarr")  # the strokes it was trained on, placed like the raw
    assert np.array_equal(np.asarray(kept.data), np.load(d / "labels.npy"))
    assert kept.voxel_size == pytest.approx(sample.raw.voxel_size) and kept.offset == pytest.approx(sample.raw.offset)
    # Fine-tune the saved model further (--init), keeping its classes: on a CPU computing bf16, in float32 unless
    # asked for bf16; the log says which.
    bf16 = {CPU_BF16_ENV: "1"}
    again = _run("train", *flags, "--labels", d / "labels.npy", "--out", d / "model2", "--init", d / "model",
                 "--iterations", "4", "--tiles-per-step", "2", "--train-precision", "bf16", env=bf16)
    assert again.returncode == 0, again.stderr
    steps = [e for e in read_training_log(d / "model2") if "iteration" in e]  # both runs, the first's batch default
    precisions = [(e.get("tiles"), e.get("precision")) for e in steps]
    assert precisions == [(TILES_PER_STEP, "float32")] * 8 + [(2, "bf16")] * 4
    exact = _run("train", *flags, "--labels", d / "labels.npy", "--out", d / "model3", "--init", d / "model",
                 "--iterations", "2", "--tiles-per-step", "2", env=bf16)
    assert exact.returncode == 0, exact.stderr
    assert [e.get("precision") for e in read_training_log(d / "model3") if "iteration" in e][8:] == ["float32"] * 2

    out = d / "pred.zarr"
    predicted = _run("predict", *flags, "--model", d / "model2", "--out", out, "--attention", "--roi", "0:8,16:80,:",
                     "--instances", "3,4", "--no-fill-holes", "--measurements", d / "objects.csv")
    assert predicted.returncode == 0, predicted.stderr
    labels = open_volume(out / "labels")
    assert labels.shape == (8, 64, 128) and labels.dtype == np.uint8
    assert labels.voxel_size == sample.raw.voxel_size
    expected_offset = np.asarray(sample.raw.offset) + np.array([0, 16, 0]) * np.asarray(sample.raw.voxel_size)
    assert np.allclose(labels.offset, expected_offset)
    assert set(np.unique(labels.data[:])) <= {1, 2, 3, 4}
    level3 = open_volume(out / "attention" / "level3")
    assert level3.shape == (2, 16, 32) and np.allclose(level3.voxel_size, np.asarray(sample.raw.voxel_size) * 4)
    assert zarr.open_array(str(out / "probabilities" / "0"), mode="r").shape == (4, 8, 64, 128)
    # The model's class names travel with the prediction (the reader names the classes from them).
    names = json.loads((d / "model2" / "config.json").read_text())["class_names"]
    assert len(names) == 4 and zarr.open_group(str(out), mode="r").attrs["dinofuse"]["class_names"] == names
    # --instances: the objects of classes 3 and 4 beside the labels, aligned with them, and their table.
    objects = open_volume(out / "instances")
    assert objects.voxel_size == labels.voxel_size and np.allclose(objects.offset, labels.offset)
    assert np.array_equal(objects.data[:] > 0, np.isin(labels.data[:], [3, 4]))
    rows = (d / "objects.csv").read_text().splitlines()
    assert rows[0].startswith("index,class,class_name") and len(rows) - 1 == objects.data[:].max()
    assert (d / "objects.csv").read_text() == (out / "instances" / "measurements.csv").read_text()


def test_predict_from_a_saved_model_is_bitwise_reproducible(files):
    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import extract_sources
    from napari_dinofuse.inference.predict import predict_to_memory
    from napari_dinofuse.modeling.checkpoint import load_model, save_model
    from napari_dinofuse.progress import drive
    from napari_dinofuse.training.train import model_info, new_model

    d, sample, _ = files
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("random:tiny", device="cpu")
    source = drive(extract_sources(sample.raw, sample.context, backbone, FeatureCache(d / "cache")))
    model = new_model(source, 4, base_channels=4, seed=5)
    save_model(d / "roundtrip", model, model_info(model, source))
    loaded, info = load_model(d / "roundtrip")
    assert info.backbone == "random:tiny" and info.raw_voxel_size == sample.raw.voxel_size
    roi = (slice(0, 8), slice(0, 64), slice(0, 64))
    a = predict_to_memory(model.eval(), source, roi, tile_shape=(16, 32, 32), overlap=(8, 16, 16)).arrays
    b = predict_to_memory(loaded, source, roi, tile_shape=(16, 32, 32), overlap=(8, 16, 16)).arrays
    for name in ("labels", "probabilities", "attention/level1"):
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("problem, expected", [
    ("one-class", "only class"),
    ("wrong-shape", "shape"),
    ("missing-model", "not a dinofuse model folder"),
])
def test_cli_refusals_are_one_clear_line(files, tmp_path, problem, expected):
    d, sample, flags = files
    if problem == "missing-model":
        result = _run("predict", *flags, "--model", tmp_path / "nothing", "--out", tmp_path / "o.zarr")
    else:
        labels = np.zeros(sample.raw.shape if problem == "one-class" else (3, 3, 3), np.uint8)
        labels[2, 10:20, 10:20] = 2
        np.save(tmp_path / "labels.npy", labels)
        result = _run("train", *flags, "--labels", tmp_path / "labels.npy", "--out", tmp_path / "m")
    assert result.returncode != 0
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "o.zarr").exists()


def test_demo_runs_offline_and_reports_iou(tmp_path):
    result = subprocess.run([DINOFUSE, "demo", "--out", tmp_path / "demo", "--backbone", "random:tiny",
                             "--device", "cpu", "--iterations", "6", "--cache", tmp_path / "cache",
                             "--raw-shape", "16,128,128"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "IoU on unpainted voxels" in result.stdout and "nuclear granule" in result.stdout
    with Image.open(tmp_path / "demo" / "demo.png") as figure:  # two rows of four 128x128 panels, 4-pixel gaps
        assert figure.format == "PNG" and figure.mode == "RGB" and figure.size == (4 * 128 + 3 * 4, 2 * 128 + 4)
    assert (tmp_path / "demo" / "prediction-attention.zarr" / "attention" / "level4").is_dir()
