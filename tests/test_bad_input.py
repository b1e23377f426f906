"""Bad input, as a user gives it: every value is either used or refused with one line naming the setting.

Most cases run the CLI in-process up to the point where it would load the backbone (stubbed to stop there):
every check (argument parsing, the engine's settings objects, the volumes, the labels, the ROI) runs before
that, so this is fast and still what `dinofuse` does. A few commands run as real subprocesses.
"""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_dinofuse import cli, demo
from napari_dinofuse.errors import DinofuseError, InputError
from napari_dinofuse.features import backbone
from napari_dinofuse.features.extract import ExtractionSettings
from napari_dinofuse.geometry import Volume
from napari_dinofuse.inference.plan import PredictionSettings
from napari_dinofuse.modeling import FusedUNet3D, UNetConfig
from napari_dinofuse.modeling.checkpoint import ModelInfo, save_model
from napari_dinofuse.training.finetune import NewModel
from napari_dinofuse.training.train import TrainConfig, find_painted

DINOFUSE = str(Path(sys.executable).with_name("dinofuse"))
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Reached(Exception):
    """The command passed every check and got to loading the backbone: it would run."""


def _stop(*args, **kwargs):
    raise _Reached


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny raw, context, labels (classes 1 and 2) and a saved model, as files."""
    d = tmp_path_factory.mktemp("bad-input")
    rng = np.random.default_rng(0)
    np.save(d / "raw.npy", rng.integers(0, 256, (4, 64, 64), dtype=np.uint8))
    np.save(d / "context.npy", rng.integers(0, 256, (2, 8, 8), dtype=np.uint8))
    labels = np.zeros((4, 64, 64), np.uint8)
    labels[1, 5:20, 5] = 1
    labels[2, 30:50, 40] = 2
    np.save(d / "labels.npy", labels)
    torch.manual_seed(0)
    model = FusedUNet3D(UNetConfig(raw_channels=64, context_channels=64, num_classes=2, base_channels=4))
    save_model(d / "model", model, ModelInfo(unet=model.config, class_names=["bg", "fg"], backbone="random:tiny",
                                             normalization="lvd1689m", backbone_dim=64, raw_voxel_size=(4, 4, 4),
                                             context_voxel_size=(64, 64, 64)))
    return d


def _volume_flags(d):
    return ["--raw", d / "raw.npy", "--raw-voxel-size", "4", "--context", d / "context.npy",
            "--context-voxel-size", "64", "--backbone", "random:tiny", "--device", "cpu", "--cache", d / "cache"]


def _commands(d):
    """The start of each command line that takes values; a generated option is appended."""
    flags = _volume_flags(d)
    return {
        "train": ["train", *flags, "--labels", d / "labels.npy", "--out", d / "never"],
        "predict": ["predict", *flags, "--model", d / "model", "--out", d / "never.zarr"],
        "extract": ["extract", *flags],
    }


def dinofuse(argv) -> tuple[int, str]:
    """(exit status, stderr) of `dinofuse argv` run up to loading the backbone (status 0: it would run)."""
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(backbone, "load_backbone", _stop)
        mp.setattr(demo, "demo_backbone", _stop)
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
        except _Reached:
            code = 0
    return code, err.getvalue()


def assert_one_line(code, err, names=()):
    """What a user notices: status 1 or 2, one 'error:' line (naming the setting), never a traceback."""
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    said = lines[0].lower().replace("-", " ").replace("_", " ")
    assert not names or any(n.replace("-", " ").replace("_", " ") in said for n in names), lines[0]


def test_good_command_lines_get_past_every_check(inputs):
    for command, argv in _commands(inputs).items():
        assert dinofuse(argv) == (0, ""), command


# -- the ten command lines of issue 15, and other explicit bad values ------------------------------------------

BAD_OPTIONS = [
    # (command, option values, words the one line must contain)
    ("train", ["--iterations", "0"], ["iterations"]),
    ("train", ["--iterations", "-5"], ["iterations"]),
    ("train", ["--iterations", "2.5"], ["iterations"]),
    ("train", ["--iterations", "lots"], ["iterations"]),
    ("train", ["--learning-rate", "nan"], ["learning_rate"]),
    ("train", ["--learning-rate", "0"], ["learning_rate"]),
    ("train", ["--learning-rate", "-0.1"], ["learning_rate"]),
    ("train", ["--learning-rate", "inf"], ["learning_rate"]),
    ("train", ["--learning-rate", "2"], ["learning_rate"]),
    ("train", ["--base-channels", "0"], ["base_channels"]),
    ("train", ["--base-channels", "-4"], ["base_channels"]),
    ("train", ["--base-channels", "100000"], ["base_channels"]),
    ("train", ["--context-margin", "nan"], ["context_margin"]),
    ("train", ["--context-margin", "-5"], ["context_margin"]),
    ("train", ["--context-margin", "0"], ["context_margin"]),
    ("train", ["--validation-share", "0.9"], ["validation_share"]),
    ("train", ["--validation-share", "-1"], ["validation_share"]),
    ("train", ["--dice-weight", "-1"], ["dice_weight"]),
    ("train", ["--dice-weight", "inf"], ["dice_weight"]),
    ("train", ["--edge-weight", "-0.5"], ["edge_weight"]),
    ("train", ["--keep-weight", "nan"], ["keep_weight"]),
    ("train", ["--tiles-per-step", "0"], ["tiles_per_step"]),
    ("train", ["--seed", "-1"], ["seed"]),
    ("train", ["--seed", str(2**40)], ["seed"]),
    ("train", ["--fusion", "max"], ["fusion"]),
    ("train", ["--planes", "xz"], ["planes"]),
    ("train", ["--batch-size", "0"], ["batch_size"]),
    ("train", ["--raw-voxel-size", "0"], ["voxel size"]),
    ("train", ["--raw-voxel-size", "4,4"], ["voxel size"]),
    ("train", ["--raw-voxel-size", "-4,4,4"], ["voxel size"]),
    ("train", ["--raw-voxel-size", "nan"], ["voxel size"]),
    ("train", ["--raw-voxel-size", "inf,4,4"], ["voxel size"]),
    ("train", ["--raw-offset", "nan,0,0"], ["offset"]),
    ("train", ["--raw-offset", "a,b,c"], ["offset"]),
    ("train", ["--raw-level", "-1"], ["level"]),
    ("train", ["--raw-level", "2"], ["level"]),
    ("train", ["--context-level", "1"], ["level"]),
    ("train", ["--context-offset", "100000,0,0"], ["cover"]),
    ("predict", ["--block-shape", "0,0,0"], ["block_shape"]),
    ("predict", ["--block-shape", "-8"], ["block_shape"]),
    ("predict", ["--block-shape", "8,8"], ["block_shape"]),
    ("predict", ["--block-shape", "8,x,8"], ["block_shape"]),
    ("predict", ["--workers", "0"], ["workers"]),
    ("predict", ["--workers", "-3"], ["workers"]),
    ("predict", ["--workers", "2", "--scheduler", "tcp://localhost:1"], ["scheduler"]),
    ("predict", ["--raw-level", "3"], ["level"]),
    ("predict", ["--roi", "0:8,0:32,0:999"], ["roi"]),
    ("predict", ["--roi", "5:2,:,:"], ["roi"]),
    ("predict", ["--roi", "0:2,0:32"], ["roi"]),
    ("predict", ["--roi", "-1:2,:,:"], ["roi"]),
    ("predict", ["--roi", "a:b,:,:"], ["roi"]),
    ("predict", ["--planes", "ortho", "--batch-size", "-1"], ["batch_size"]),
    ("extract", ["--batch-size", "-2"], ["batch_size"]),
    ("extract", ["--batch-size", "100000"], ["batch_size"]),
    ("extract", ["--tile-size", "0"], ["tile_size"]),
    ("extract", ["--tile-size", "100"], ["tile_size"]),
    ("extract", ["--tile-size", "-1024"], ["tile_size"]),
    ("extract", ["--device", "tpu"], ["device"]),
]


@pytest.mark.parametrize("command, values, names", BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list)
                         else None)
def test_a_bad_value_is_one_line_naming_the_setting(inputs, command, values, names):
    code, err = dinofuse([*_commands(inputs)[command], *values])
    assert_one_line(code, err, names)


@pytest.mark.parametrize("argv, names", [
    (["demo", "--iterations", "0"], ["iterations"]),  # was silently the default
    (["demo", "--raw-shape", "2,2"], ["raw_shape"]),
    (["demo", "--raw-shape", "4,16,16"], ["wide"]),
    (["demo", "--raw-shape", "a"], ["raw-shape"]),
    (["check-backbone", "--size", "0"], ["size"]),
    (["check-backbone", "--size", "-512"], ["size"]),
    (["cache", "remove"], ["action"]),
    (["train"], ["required"]),
    ([], ["required"]),
])
def test_other_commands_refuse_in_one_line(argv, names):
    code, err = dinofuse(argv)
    assert_one_line(code, err, names)


def _labels(d, name, painted):
    labels = np.zeros((4, 64, 64), np.uint16)
    for i, k in enumerate(painted):
        labels[i % 4, 2 * i, :8] = k
    np.save(d / name, labels)
    return d / name


@pytest.mark.parametrize("painted, names", [
    ((1, 300), ["2-299 never painted"]),  # issue 15: a 300-class model with 298 classes nobody painted
    ((1, 2, 4), ["3 never painted"]),
    ((2, 3), ["1 never painted"]),
    ((7,), ["only class 7"]),
    ((), ["no painted voxels"]),
])
def test_labels_with_unpainted_classes_in_between_are_refused(inputs, painted, names):
    path = _labels(inputs, f"labels-{'-'.join(map(str, painted))}.npy", painted)
    argv = _commands(inputs)["train"]
    argv[argv.index("--labels") + 1] = path
    code, err = dinofuse(argv)
    assert_one_line(code, err, names)
    if len(painted) > 1:
        assert "renumber the labels to 1.." in err.lower()


def test_fine_tuning_may_leave_the_models_own_classes_unpainted():
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, 0, :3], labels[1, 5, :3] = 1, 4
    assert find_painted(labels, labels.shape, known_classes=4).num_classes == 4
    labels[1, 5, :3] = 6  # but not a gap beyond them
    with pytest.raises(InputError, match="5 never painted"):
        find_painted(labels, labels.shape, known_classes=4)


# -- generated values through the same layer ------------------------------------------------------------------

NUMBER_TEXT = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(
    repr), st.sampled_from(["", "nan", "-inf", "1e309", "0x10", "1_000", " 3 ", "1,2", "true", "½", "٣"]),
    st.text(max_size=6))
TRIPLE_TEXT = st.one_of(NUMBER_TEXT, st.lists(NUMBER_TEXT, min_size=0, max_size=4).map(",".join))
RANGE = st.one_of(st.just(""), st.integers(-3, 80).map(str))
ROI_TEXT = st.one_of(st.lists(st.tuples(RANGE, RANGE).map(":".join), min_size=1, max_size=4).map(",".join),
                     st.text(max_size=10))

OPTIONS = {  # option -> (command, strategy of its text)
    "--raw-voxel-size": ("train", TRIPLE_TEXT),
    "--context-voxel-size": ("extract", TRIPLE_TEXT),
    "--raw-offset": ("predict", TRIPLE_TEXT),
    "--context-offset": ("train", TRIPLE_TEXT),
    "--raw-level": ("train", NUMBER_TEXT),
    "--context-level": ("predict", NUMBER_TEXT),
    "--roi": ("predict", ROI_TEXT),
    "--block-shape": ("predict", TRIPLE_TEXT),
    "--workers": ("predict", NUMBER_TEXT),
    "--iterations": ("train", NUMBER_TEXT),
    "--learning-rate": ("train", NUMBER_TEXT),
    "--base-channels": ("train", NUMBER_TEXT),
    "--context-margin": ("train", NUMBER_TEXT),
    "--validation-share": ("train", NUMBER_TEXT),
    "--dice-weight": ("train", NUMBER_TEXT),
    "--edge-weight": ("train", NUMBER_TEXT),
    "--keep-weight": ("train", NUMBER_TEXT),
    "--tiles-per-step": ("train", NUMBER_TEXT),
    "--seed": ("train", NUMBER_TEXT),
    "--batch-size": ("extract", NUMBER_TEXT),
    "--tile-size": ("extract", NUMBER_TEXT),
}


@pytest.mark.parametrize("option", OPTIONS)
@FEW
@given(data=st.data())
def test_generated_option_values_work_or_are_one_line(inputs, option, data):
    command, strategy = OPTIONS[option]
    text = data.draw(strategy, label=option)
    code, err = dinofuse([*_commands(inputs)[command], f"{option}={text}"])
    if code != 0:
        assert_one_line(code, err)


# -- the engine's settings objects, directly ---------------------------------------------------------------------

ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=5),
                st.lists(st.integers(-5, 300), max_size=4), st.tuples(st.floats(), st.floats(), st.floats()),
                st.lists(st.floats(allow_nan=True), max_size=4).map(tuple))

SETTINGS = {
    TrainConfig: ["iterations", "learning_rate", "continue_lr_scale", "weight_decay", "tile_shape", "tiles_per_step",
                  "dice_weight", "edge_weight", "validation_share", "validate_every", "patience", "min_iterations",
                  "seed", "device"],
    NewModel: ["fusion", "base_channels", "intensity_stem", "context_margin_nm", "class_names"],
    PredictionSettings: ["tile_shape", "overlap", "block_shape", "workers"],
    ExtractionSettings: ["planes", "tile_size", "batch_size"],
}


@pytest.mark.parametrize("kind", SETTINGS, ids=lambda k: k.__name__)
@FEW
@given(data=st.data())
def test_settings_objects_construct_or_raise_the_projects_error(kind, data):
    name = data.draw(st.sampled_from(SETTINGS[kind]), label="setting")
    value = data.draw(ANY, label="value")
    try:
        kind(**{name: value})
    except DinofuseError as exc:
        assert name in str(exc) and "\n" not in str(exc)


@FEW
@given(name=st.sampled_from(["raw_channels", "num_classes", "base_channels", "fusion", "context_margin_nm",
                             "pooling", "stem_sigmas", "intensity_stem"]), value=ANY)
def test_unet_config_constructs_or_raises_value_error(name, value):
    try:
        UNetConfig(**({"raw_channels": 8, "context_channels": 8, "num_classes": 2} | {name: value}))
    except ValueError as exc:  # this config's documented refusal (new_model turns it into an InputError)
        assert name in str(exc)


@pytest.mark.parametrize("kind, values, name", [
    (PredictionSettings, {"tile_shape": (32, 64, 64), "overlap": (8, 64, 8)}, "overlap"),
    (PredictionSettings, {"tile_shape": 0}, "tile_shape"),
    (PredictionSettings, {"workers": True}, "workers"),
    (ExtractionSettings, {"planes": "yz"}, "planes"),
    (ExtractionSettings, {"batch_size": 2.0}, "batch_size"),
    (NewModel, {"class_names": "bg"}, "class_names"),
    (NewModel, {"intensity_stem": "no"}, "intensity_stem"),
    (TrainConfig, {"device": "gpu"}, "device"),
])
def test_settings_refusals_name_the_setting_and_what_works(kind, values, name):
    with pytest.raises(InputError, match=name) as caught:
        kind(**values)
    assert "expected" in str(caught.value) or "must" in str(caught.value)


# -- volumes of awkward shape and type ----------------------------------------------------------------------------

BASE = np.random.default_rng(1).integers(0, 200, (3, 40, 40))
AWKWARD_RAW = {
    "int64": BASE.astype(np.int64), "float64": BASE.astype(np.float64), "big-endian": BASE.astype(">u2"),
    "big-endian float": BASE.astype(">f4"), "fortran": np.asfortranarray(BASE.astype(np.uint8)),
    "non-contiguous": BASE.astype(np.uint8)[:, ::2, ::3], "one slice": BASE[:1].astype(np.uint8),
    "one pixel wide": BASE[:, :, :1].astype(np.uint8), "one voxel": BASE[:1, :1, :1].astype(np.float32),
    "float16": BASE.astype(np.float16), "constant": np.zeros((2, 32, 32), np.float32),
    "negative int8": (BASE - 100).astype(np.int8), "huge uint64": BASE.astype(np.uint64) << 60,
}


@pytest.mark.parametrize("name", AWKWARD_RAW)
def test_awkward_raw_volumes_are_extracted(tiny_backbone, tmp_path, name):
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import compute_features

    data = AWKWARD_RAW[name]
    entry = compute_features(Volume(data, (8, 4, 4), name="raw"), tiny_backbone, FeatureCache(tmp_path),
                             tile_size=96)
    features = entry.read()
    assert features.shape[1:] == (data.shape[0], -(-data.shape[1] // 16), -(-data.shape[2] // 16))
    assert np.isfinite(features).all()


@pytest.mark.parametrize("data, message", [
    (np.zeros((3, 8, 8), bool), "dtype bool"),
    (np.zeros((3, 8, 8), np.complex64), "dtype complex64"),
    (np.zeros((8, 8), np.uint8), "2D"),
    (np.zeros((2, 3, 8, 8), np.uint8), "4 dimensions"),
    (np.zeros((3, 8, 8, 3), np.uint8), "RGB"),
    (np.zeros((0, 8, 8), np.uint8), "non-empty"),
    (np.zeros((3, 8, 0), np.uint8), "non-empty"),
    (np.array(5.0), "0 dimensions"),
])
def test_unusable_raw_volumes_are_refused_clearly(data, message):
    with pytest.raises(DinofuseError, match=message):
        Volume(data, 4.0, name="raw")


def _two_classes(dtype, shape=(3, 8, 8)):
    labels = np.zeros(shape, dtype)
    labels[0, 0, 0], labels[-1, -1, -1] = 1, 2
    return labels


AWKWARD_LABELS = {
    "int64": _two_classes(np.int64), "big-endian": _two_classes(">i4"),
    "fortran": np.asfortranarray(_two_classes(np.uint16)), "non-contiguous": np.repeat(_two_classes(np.uint8), 2, 2)[..., ::2],
    "one slice": _two_classes(np.uint8, (1, 8, 8)), "one pixel wide": _two_classes(np.uint8, (3, 1, 8)),
    "uint64": _two_classes(np.uint64),
}


@pytest.mark.parametrize("name", AWKWARD_LABELS)
def test_awkward_labels_are_read(name):
    labels = AWKWARD_LABELS[name]
    painted = find_painted(labels, labels.shape)
    assert painted.num_classes == 2 and painted.counts == {1: 1, 2: 1}


def test_three_hundred_classes_all_painted_are_accepted():
    labels = np.arange(300, dtype=np.uint16).reshape(3, 10, 10) + 1  # values above 255, every class painted
    assert find_painted(labels, labels.shape).num_classes == 300


@pytest.mark.parametrize("labels, message", [
    (_two_classes(bool), "integers"),
    (_two_classes(np.float32), "integers"),
    (_two_classes(np.int16) - 3, "negative"),
    (np.where(_two_classes(np.uint16) == 2, 256, _two_classes(np.uint16)), "2-255 never painted"),
    (np.where(_two_classes(np.int64) == 2, 2**40, _two_classes(np.int64)), "never painted"),
])
def test_unusable_labels_are_refused_in_one_line(labels, message):
    with pytest.raises(InputError, match=message) as caught:
        find_painted(labels, labels.shape)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


# -- a few real command lines -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, values, names", [
    ("train", ["--iterations", "0"], ["iterations"]),
    ("predict", ["--block-shape", "0,0,0"], ["block_shape"]),
    ("extract", ["--batch-size", "-2"], ["batch_size"]),
    ("extract", ["--raw-voxel-size", "4,4"], ["voxel size"]),
])
def test_real_command_lines_refuse_in_one_line(inputs, command, values, names):
    result = subprocess.run([DINOFUSE, *map(str, _commands(inputs)[command]), *values], capture_output=True,
                            text=True, timeout=300)
    assert_one_line(result.returncode, result.stderr, names)
    assert not (inputs / "never").exists() and not (inputs / "never.zarr").exists()
