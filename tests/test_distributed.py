"""Blockwise prediction and objects on a real dask.distributed LocalCluster of 2 worker processes."""

import warnings

import numpy as np
import pytest
import zarr

from napari_dinofuse.distributed import VolumeRef, connect, prepare_job, run_blockwise
from napari_dinofuse.features.cache import FeatureCache
from napari_dinofuse.features.extract import extract_sources
from napari_dinofuse.inference.outputs import ZarrSink
from napari_dinofuse.inference.predict import predict
from napari_dinofuse.modeling.checkpoint import load_model, save_model
from napari_dinofuse.progress import drive
from napari_dinofuse.training.train import model_info, new_model

SETTINGS = dict(tile_shape=(16, 48, 48), overlap=(8, 16, 16), block_shape=(16, 64, 64))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_backbone):
    from napari_dinofuse.synthetic.sample import make_sample

    d = tmp_path_factory.mktemp("dist")
    sample = make_sample(seed=2, raw_shape=(32, 128, 128))
    np.save(d / "raw.npy", np.asarray(sample.raw.data))
    np.save(d / "context.npy", np.asarray(sample.context.data))
    raw = VolumeRef(str(d / "raw.npy"), sample.raw.voxel_size, sample.raw.offset, name="raw")
    context = VolumeRef(str(d / "context.npy"), sample.context.voxel_size, sample.context.offset, name="context")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = drive(extract_sources(raw.open(), context.open(), tiny_backbone, FeatureCache(d / "ref-cache")))
    model = new_model(source, 4, base_channels=4, seed=1)
    save_model(d / "model", model, model_info(model, source))
    # The single-process reference, with the same blocks and tiles (8 blocks of 16x64x64).
    drive(predict(model.eval(), source, sink=ZarrSink(d / "single.zarr"), device="cpu", **SETTINGS))
    client = connect(workers=2)
    yield d, raw, context, client
    client.close()
    client.cluster.close()


def _read(path, name):
    return zarr.open_array(str(path / name / "0"), mode="r")[:]


def _job(setup, tiny_backbone, out, cache, **extra):
    d, raw, context, _ = setup
    return prepare_job(raw, context, d / "model", d / out, tiny_backbone, FeatureCache(d / cache), device="cpu",
                       **{**SETTINGS, **extra})


def test_cluster_output_equals_single_process(setup, tiny_backbone):
    d, _, _, client = setup
    job, extraction = _job(setup, tiny_backbone, "cluster.zarr", "shared-cache")
    assert extraction  # features computed on the workers, into the shared cache
    stats = drive(run_blockwise(client, job, extraction))
    assert (stats["blocks"], stats["computed"], stats["skipped"]) == (8, 8, 0) and stats["task_seconds"] > 0
    assert np.array_equal(_read(d / "cluster.zarr", "labels"), _read(d / "single.zarr", "labels"))
    for name in ("probabilities", "uncertainty", "attention/level2"):
        assert np.allclose(_read(d / "cluster.zarr", name).astype(np.float32),
                           _read(d / "single.zarr", name).astype(np.float32), atol=2e-3), name
    attrs = zarr.open_group(str(d / "cluster.zarr"), mode="r").attrs["dinofuse"]
    assert attrs["complete"] and attrs["class_names"] == load_model(d / "model")[1].class_names


def test_a_block_out_of_memory_is_retried_once_with_smaller_tiles(setup, tiny_backbone, monkeypatch):
    """A cluster task, like predict(), retries a block that ran out of device memory once with tiles halved in
    y/x, and its worker keeps them; the block is then exactly what tiles of that size give from the start."""
    import torch

    from napari_dinofuse import distributed
    from napari_dinofuse.errors import MemoryRetryWarning
    from napari_dinofuse.inference import predict as predict_module

    d = setup[0]
    run, raised = predict_module._run_tile, []

    def out_of_memory_above_32(model, features, tile, with_attention):
        if tile[1].stop - tile[1].start > 32:
            raised.append(tile)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run(model, features, tile, with_attention)

    outputs = {}
    monkeypatch.setattr(distributed, "_WORKER_CACHE", {})  # this process acts as the worker
    for out, tiles in (("oom-small.zarr", (16, 32, 32)), ("oom.zarr", SETTINGS["tile_shape"])):
        job, extraction = _job(setup, tiny_backbone, out, "ref-cache", tile_shape=tiles)
        assert not extraction
        distributed.prepare_output(job, distributed._source_and_plan(job, load_model(d / "model")[0])[1])
        monkeypatch.setattr(predict_module, "_run_tile", out_of_memory_above_32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distributed.predict_task(job, 0)
            distributed.predict_task(job, 1)
        retries = [w for w in caught if issubclass(w.category, MemoryRetryWarning)]
        outputs[out] = _read(d / out, "probabilities")[..., :16, :64, :]  # blocks 0 and 1
        assert len(retries) == (out == "oom.zarr")  # once: block 1 runs with the smaller tiles straight away
    assert len(raised) == 1
    np.testing.assert_array_equal(outputs["oom.zarr"], outputs["oom-small.zarr"])


def test_a_killed_worker_does_not_stop_the_run(setup, tiny_backbone):
    d, _, _, client = setup
    job, extraction = _job(setup, tiny_backbone, "faulty.zarr", "shared-cache", fault_once=str(d / "killed-once"))
    stats = drive(run_blockwise(client, job, extraction))
    assert (d / "killed-once").exists()  # one worker process really died mid-task
    assert stats["computed"] == 8
    assert np.array_equal(_read(d / "faulty.zarr", "labels"), _read(d / "single.zarr", "labels"))


def test_a_rerun_computes_only_missing_blocks(setup, tiny_backbone):
    d, _, _, client = setup
    job, extraction = _job(setup, tiny_backbone, "rerun.zarr", "shared-cache")
    drive(run_blockwise(client, job, extraction))
    # As if the run had stopped before three blocks were finished.
    for index in (1, 4, 6):
        (d / "rerun.zarr" / ".blocks" / f"{index:07d}").unlink()
    root = zarr.open_group(str(d / "rerun.zarr"), mode="r+")
    root.attrs["dinofuse"] = {**dict(root.attrs["dinofuse"]), "complete": False}
    job, extraction = _job(setup, tiny_backbone, "rerun.zarr", "shared-cache")
    assert extraction == []  # the features are all in the shared cache
    stats = drive(run_blockwise(client, job, extraction))
    assert (stats["blocks"], stats["computed"], stats["skipped"]) == (8, 3, 5)
    assert np.array_equal(_read(d / "rerun.zarr", "labels"), _read(d / "single.zarr", "labels"))


def test_an_interrupted_run_finishes_where_it_stopped(setup, tiny_backbone):
    d, _, _, client = setup
    job, extraction = _job(setup, tiny_backbone, "interrupted.zarr", "shared-cache")
    run = run_blockwise(client, job, extraction)
    for progress in run:
        if progress.message.startswith("blocks") and progress.done == 3:
            break
    run.close()  # Ctrl-C: queued blocks are cancelled, finished ones keep their records
    _wait_until_idle(client)  # blocks already running when the run stopped still finish
    finished = len(list((d / "interrupted.zarr" / ".blocks").iterdir()))
    assert 3 <= finished < 8
    assert not zarr.open_group(str(d / "interrupted.zarr"), mode="r").attrs["dinofuse"]["complete"]
    job, extraction = _job(setup, tiny_backbone, "interrupted.zarr", "shared-cache")
    stats = drive(run_blockwise(client, job, extraction))
    assert stats["skipped"] == finished and stats["computed"] == 8 - finished
    assert np.array_equal(_read(d / "interrupted.zarr", "labels"), _read(d / "single.zarr", "labels"))


def _executing(dask_worker) -> int:
    return len(dask_worker.state.executing)  # includes cancelled tasks that are still running


def _wait_until_idle(client, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while any(client.run(_executing).values()) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_objects_on_the_cluster_equal_those_of_one_process(setup, tmp_path):
    import shutil

    from napari_dinofuse.distributed import block_mapper
    from napari_dinofuse.inference.instances import ObjectSettings, objects_in_prediction

    d, _, _, client = setup
    settings = ObjectSettings((2, 3), min_size_nm3=2000, split_depth_nm=8)
    tables = {}
    for where, mapper in (("here", map), ("cluster", block_mapper(client))):
        shutil.copytree(d / "single.zarr", tmp_path / f"{where}.zarr")
        tables[where] = drive(objects_in_prediction(tmp_path / f"{where}.zarr", settings, block_shape=(16, 64, 64),
                                                    map_blocks=mapper))
    here = _read(tmp_path / "here.zarr", "instances")
    assert len(tables["here"]) >= 3 and here.max() == len(tables["here"])  # objects across 8 blocks
    assert np.array_equal(_read(tmp_path / "cluster.zarr", "instances"), here)
    assert tables["cluster"].to_csv() == tables["here"].to_csv()


def test_cli_runs_on_a_local_cluster(setup):
    import subprocess
    import sys
    from pathlib import Path

    d, raw, context, _ = setup
    flags = ["--raw", raw.path, "--raw-voxel-size", ",".join(map(str, raw.voxel_size)),
             "--raw-offset", ",".join(map(str, raw.offset)), "--context", context.path,
             "--context-voxel-size", ",".join(map(str, context.voxel_size)),
             "--context-offset", ",".join(map(str, context.offset)), "--device", "cpu", "--cache", d / "cli-cache",
             "--model", d / "model", "--out", d / "cli.zarr", "--workers", "2", "--block-shape", "16,64,64",
             "--instances", "2"]
    result = subprocess.run([str(Path(sys.executable).with_name("dinofuse")), "predict", *map(str, flags)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "dask dashboard: http" in result.stdout and "8 blocks computed" in result.stdout
    assert zarr.open_group(str(d / "cli.zarr"), mode="r").attrs["dinofuse"]["complete"]
    assert "instances (with measurements.csv)" in result.stdout  # objects found on the same cluster
    assert (d / "cli.zarr" / "instances" / "measurements.csv").is_file()
