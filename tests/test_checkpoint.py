import copy
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import napari_dinofuse
from napari_dinofuse.geometry import Grid
from napari_dinofuse.modeling import FusedUNet3D, UNetConfig, checkpoint
from napari_dinofuse.modeling.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    ModelInfo,
    check_backbone_compatible,
    load_model,
    read_training_log,
    save_model,
)
from napari_dinofuse.modeling.unet import ContextWindow

OUT_SHAPE = (2, 8, 8)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = UNetConfig(**(dict(raw_channels=8, context_channels=8, num_classes=3, base_channels=4) | overrides))
    return FusedUNet3D(cfg).eval()


def make_info(model, **overrides):
    fields = dict(
        unet=model.config,
        class_names=["mito", "er", "nucleus"][: model.config.num_classes],
        backbone="random:tiny",
        normalization="percentile",
        backbone_dim=8,
        raw_voxel_size=(8, 4, 4),
        context_voxel_size=(32.0, 16.0, 16.0),
        planes="ortho",
        feature_tile_size=1024,
        intensity_mode="dtype",
        extra={"note": "painted by A.", "intensity_range": np.array([0.5, 99.5])},
    )
    return ModelInfo(**(fields | overrides))


def logits(model):
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(1, 8, 2, 1, 1, generator=g)
    window = ContextWindow(torch.randn(1, 8, 2, 1, 1, generator=g), torch.rand(1, 1, 2, 16, 16, generator=g),
                           Grid((2, 16, 16), 8.0), Grid(OUT_SHAPE, 4.0, (2.0, 10.0, 10.0)))
    intensity = torch.rand(1, 1, *(n + 2 * h for n, h in zip(OUT_SHAPE, model.intensity_halo)), generator=g)
    with torch.no_grad():
        return model(raw, window, out_shape=OUT_SHAPE, intensity=intensity).logits


def entries(path):
    return sorted(p.name for p in path.iterdir())


def as_before_format_6(model):
    """``model`` as formats 3-5 predicted: without the context head's logits, with equal class shares."""
    old = copy.deepcopy(model)
    old.config.context_evidence = False
    old.class_prior.fill_(1 / old.config.num_classes)
    return old


def _save(folder, model):
    model.class_prior.copy_(torch.tensor([0.7, 0.2, 0.1]))  # as estimated after training
    save_model(folder, model, make_info(model), training_log=[{"epoch": 0, "loss": 1.5}])
    return folder, model


@pytest.fixture
def saved(tmp_path):
    return _save(tmp_path / "model", make_model())


@pytest.fixture
def saved_before_9(tmp_path):
    """A model as formats 3-6 built them (the patch features at level 0, no level-1 head, the context head's
    logits added whole), saved without the keys formats 9 and 10 added; the tests set its format_version."""
    folder, model = _save(tmp_path / "format 6 model", make_model(feature_level=0, context_evidence_scale=1.0))
    config = json.loads((folder / "config.json").read_text())
    del config["unet"]["feature_level"], config["unet"]["context_evidence_scale"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model


# -- round trip -------------------------------------------------------------------------


def test_round_trip_gives_bitwise_equal_logits_and_info(saved):
    folder, model = saved
    loaded, info = load_model(folder)
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))
    assert info.to_dict() == make_info(model).to_dict()
    assert info.package_version == napari_dinofuse.__version__
    assert info.raw_voxel_size == (8.0, 4.0, 4.0)
    assert info.extra["intensity_range"] == [0.5, 99.5]
    assert info.label_names() == {1: "mito", 2: "er", 3: "nucleus"}
    assert read_training_log(folder) == [{"epoch": 0, "loss": 1.5}]


def test_files_are_safetensors_and_json_only(saved, monkeypatch):
    folder, model = saved
    assert entries(folder) == ["config.json", "model.safetensors", "training_log.json"]
    raw = (folder / "model.safetensors").read_bytes()
    # Neither torch's zip nor a pickle stream (0x80 + protocol 2-5; a safetensors header length may start
    # with 0x80 itself, so the protocol byte is what tells them apart).
    assert not raw.startswith(b"PK") and not (raw[0] == 0x80 and 2 <= raw[1] <= 5)
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["dinofuse_format_version"] == str(FORMAT_VERSION)
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    json.loads((folder / "training_log.json").read_text())

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be needed")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(torch.serialization, "load", no_pickle)
    loaded, _ = load_model(folder)
    assert torch.equal(logits(loaded), logits(model))


def test_training_log_is_strict_json(tmp_path):
    model = make_model()
    log = [{"epoch": np.int64(1), "loss": np.float32(0.25), "dice": float("nan"),
            "per_class": torch.tensor([1.0, 2.0])}]
    save_model(tmp_path / "m", model, make_info(model), training_log=log)
    text = (tmp_path / "m" / "training_log.json").read_text()
    assert "NaN" not in text
    assert read_training_log(tmp_path / "m") == [{"epoch": 1, "loss": 0.25, "dice": None, "per_class": [1.0, 2.0]}]


def test_resave_over_existing_folder_replaces_it(saved):
    folder, _ = saved
    other = make_model(seed=5, num_classes=2)
    save_model(folder, other, make_info(other, class_names=["bg", "fg"]))
    loaded, info = load_model(folder)
    assert info.class_names == ["bg", "fg"]
    assert torch.equal(logits(loaded), logits(other))
    assert read_training_log(folder) == []
    assert entries(folder.parent) == ["model"]


def test_save_refuses_a_folder_holding_other_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "volume.tif").write_bytes(b"precious")
    model = make_model()
    with pytest.raises(CheckpointError, match="not a dinofuse model folder"):
        save_model(tmp_path / "data", model, make_info(model))
    assert (tmp_path / "data" / "volume.tif").read_bytes() == b"precious"


def test_save_checks_info_matches_model(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="does not match"):
        save_model(tmp_path / "m", model, make_info(make_model(num_classes=2), class_names=["a", "b"]))
    assert not (tmp_path / "m").exists()


# -- atomic save ------------------------------------------------------------------------


def _assert_previous_intact(folder, model):
    loaded, info = load_model(folder)
    assert torch.equal(logits(loaded), logits(model))
    assert info.class_names == ["mito", "er", "nucleus"]
    assert entries(folder.parent) == ["model"]  # no temp or aside folders left behind


def test_crash_while_writing_weights_keeps_previous_model(saved, monkeypatch):
    folder, model = saved

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    other = make_model(seed=3)
    with pytest.raises(OSError, match="disk full"):
        save_model(folder, other, make_info(other))
    _assert_previous_intact(folder, model)


def test_crash_while_swapping_in_rolls_back(saved, monkeypatch):
    folder, model = saved
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1: old model aside, 2: new model in
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    other = make_model(seed=3)
    with pytest.raises(OSError, match="rename failed"):
        save_model(folder, other, make_info(other))
    monkeypatch.setattr(os, "replace", real_replace)
    _assert_previous_intact(folder, model)


def test_process_death_between_renames_is_recovered(saved):
    folder, model = saved
    # State a killed save leaves: previous model aside, new one (maybe partial) in a temp folder.
    os.replace(folder, folder.with_name(".model.old-dead0000"))
    partial = folder.with_name(".model.tmp-dead0000")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    loaded, _ = load_model(folder)
    assert torch.equal(logits(loaded), logits(model))
    other = make_model(seed=3)
    save_model(folder, other, make_info(other))  # also clears the stale temp folder
    assert entries(folder.parent) == ["model"]
    assert torch.equal(logits(load_model(folder)[0]), logits(other))


# -- errors -----------------------------------------------------------------------------


def test_missing_folder_and_missing_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not a dinofuse model folder: .*no such folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a dinofuse model folder: .*missing config.json, model.safetensors"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a dinofuse model folder"):
        read_training_log(tmp_path / "empty")
    folder, _ = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_model(folder)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_newer_format_says_who_wrote_it_and_what_to_do(saved):
    folder, _ = saved
    _edit_config(folder, format_version=FORMAT_VERSION + 1, package_version="9.3.0")
    with pytest.raises(CheckpointError, match=rf"napari-dinofuse 9\.3\.0 .*format {FORMAT_VERSION + 1}.*upgrade"):
        load_model(folder)


@pytest.mark.parametrize("version, what", [(1, "a GroupNorm UNet"), (2, "a BatchNorm UNet"),
                                           (7, "an experiment whose attention gates read the class evidence"),
                                           (8, "an experiment whose filter banks gave the Hessian's eigenvalues")])
def test_a_retired_model_format_is_refused_with_what_to_do(saved, version, what):
    """Formats 1 (GroupNorm: tile-dependent), 2 (BatchNorm) and 7-8 (reverted experiments) hold other layers:
    refused, never misread."""
    folder, _ = saved
    _edit_config(folder, format_version=version, package_version="0.1.0")
    with pytest.raises(CheckpointError, match=rf"format {version}: {what}.*fine-tune a new model") as info:
        load_model(folder)
    assert "\n" not in str(info.value)


def test_a_format_3_model_loads_and_predicts_as_it_did(saved_before_9):
    """Format 3 saved no input statistics (its inputs ran unstandardised): it loads with identity ones."""
    folder, model = saved_before_9
    weights = folder / "model.safetensors"
    statistics = ("stem.0.mean", "stem.0.std", "context_encoder.feature_mean", "context_encoder.feature_std")
    state = {k: v for k, v in load_file(weights).items()
             if not k.endswith(statistics) and not k.startswith("context_head.") and k != "class_prior"}
    assert len(state) == len(model.state_dict()) - 9  # the two stems' and the context features' statistics,
    # the context head (format 5) and the class shares (format 6)
    save_file(state, weights, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    for key in ("planes", "feature_tile_size", "intensity_mode"):  # format 3 kept these in "extra"
        del config[key]
    config["extra"] = {"planes": "ortho", "tile_size": 1024, "intensity_mode": "dtype", "note": "painted by A."}
    (folder / "config.json").write_text(json.dumps(config))
    _edit_config(folder, format_version=3)
    _drop_context_evidence(folder)
    loaded, info = load_model(folder)
    assert torch.equal(logits(loaded), logits(as_before_format_6(model)))
    assert (info.planes, info.feature_tile_size, info.intensity_mode) == ("ortho", 1024, "dtype")
    assert info.extra == {"note": "painted by A."}
    calibrated = make_model(feature_level=0)
    for stats in (calibrated.intensity_stem[0].std, calibrated.context_encoder.feature_std):
        stats.fill_(2.0)  # the statistics do reach the output
        assert not torch.equal(logits(calibrated), logits(model))
        stats.fill_(1.0)


def _drop_context_evidence(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["unet"]["context_evidence"]  # formats 3-5 had no such key
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("version", [4, 5])
def test_a_format_4_or_5_model_loads_and_predicts_as_it_did(saved_before_9, version):
    """Format 4 had no context head, formats 4-5 no class shares and no context head logits in predictions."""
    folder, model = saved_before_9
    weights = folder / "model.safetensors"
    dropped = ("context_head.", "class_prior") if version == 4 else ("class_prior",)
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith(dropped)}, weights,
              metadata={"format": "pt"})
    _edit_config(folder, format_version=version)
    _drop_context_evidence(folder)
    loaded, _ = load_model(folder)
    before = as_before_format_6(model)
    if version == 5:  # its own context head, which it trained but did not predict with
        torch.testing.assert_close(loaded.context_head.weight, model.context_head.weight)
    assert torch.equal(logits(loaded), logits(before))
    assert not torch.equal(logits(before), logits(model))  # what format 6 changed does change predictions
    assert not loaded.config.context_evidence
    assert loaded.context_head.weight.shape[0] == model.config.num_classes  # fine-tuning it again works


def test_a_format_6_model_loads_with_the_features_at_level_0_and_predicts_as_it_did(saved_before_9, saved):
    """Format 6 added the patch features at level 0 and had no level-1 head: it loads so (its weights fit no
    other) and predicts as it did; format 9 models keep their features at level 1."""
    folder, model = saved_before_9
    _edit_config(folder, format_version=6)
    loaded, _ = load_model(folder)
    assert loaded.config.feature_level == 0 and loaded.region_head is None
    assert torch.equal(logits(loaded), logits(model))
    new_folder, new = saved
    reloaded = load_model(new_folder)[0]
    assert reloaded.config.feature_level == 1 and torch.equal(logits(reloaded), logits(new))


def test_a_format_9_model_loads_with_the_context_evidence_whole_and_predicts_as_it_did(tmp_path, saved):
    """Format 9 added the context head's logits whole; format 10 scales them (UNetConfig.context_evidence_scale)."""
    folder, model = _save(tmp_path / "format 9 model", make_model(context_evidence_scale=1.0))
    _edit_config(folder, format_version=9)
    config = json.loads((folder / "config.json").read_text())
    del config["unet"]["context_evidence_scale"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(folder)
    assert loaded.config.context_evidence_scale == 1.0
    assert torch.equal(logits(loaded), logits(model))
    new_folder, new = saved
    reloaded = load_model(new_folder)[0]
    assert reloaded.config.context_evidence_scale == new.config.context_evidence_scale == 0.75
    assert torch.equal(logits(reloaded), logits(new)) and not torch.equal(logits(new), logits(model))


def test_older_unsupported_format(saved):
    folder, _ = saved
    _edit_config(folder, format_version=0, package_version="0.0.1")
    with pytest.raises(CheckpointError, match=r"0\.0\.1.*no longer reads.*re-train"):
        load_model(folder)


def test_other_package_version_with_same_format_loads(saved):
    folder, model = saved
    _edit_config(folder, package_version="0.9.0")
    loaded, info = load_model(folder)
    assert info.package_version == "0.9.0"
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "corrupt config.json"),
        ("[1, 2]", "corrupt config.json.*not a JSON object"),
        ('{"format_version": "1"}', "corrupt config.json.*format_version"),
        (f'{{"format_version": {FORMAT_VERSION}, "unet": {{}}}}', "invalid config.json.*missing keys"),
    ],
)
def test_corrupt_config(saved, content, message):
    folder, _ = saved
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_invalid_config_values(saved):
    folder, _ = saved
    _edit_config(folder, class_names=["only-one"])
    with pytest.raises(CheckpointError, match="invalid config.json.*1 class names for a model with 3 classes"):
        load_model(folder)


def test_corrupt_training_log(saved):
    folder, _ = saved
    (folder / "training_log.json").write_text('[{"epoch": ')
    with pytest.raises(CheckpointError, match="corrupt training_log.json"):
        read_training_log(folder)


def test_corrupt_weights_file(saved):
    folder, _ = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        load_model(folder)


def test_weights_shape_mismatch(saved):
    folder, _ = saved
    _edit_config(folder, unet={"num_classes": 2}, class_names=["a", "b"])
    expected = r"do not match.*shape mismatch.*head\.weight \(3, 4, 1, 1, 1\) vs \(2, 4, 1, 1, 1\)"
    with pytest.raises(CheckpointError, match=expected):
        load_model(folder)


def test_weights_missing_and_unexpected_keys(saved):
    folder, _ = saved
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state.pop("head.bias")
    state["stray.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing head\.bias; unexpected stray\.weight"):
        load_model(folder)


def test_weights_unexpected_keys_from_other_fusion(saved):
    folder, _ = saved
    _edit_config(folder, unet={"fusion": "none"})
    with pytest.raises(CheckpointError, match=r"unexpected context_encoder\.coarse\.0\.weight, .*more\)"):
        load_model(folder)


# -- backbone compatibility -------------------------------------------------------------


def test_backbone_width_mismatch_is_an_error():
    model = make_model()
    info = make_info(model, backbone="facebook/dinov3-vitl16-pretrain-lvd1689m", backbone_dim=1024)
    with pytest.raises(CheckpointError) as err:
        check_backbone_compatible(info, "facebook/dinov3-vits16-pretrain-lvd1689m", 384)
    assert str(err.value) == (
        "model trained on 1024-d features, backbone facebook/dinov3-vits16-pretrain-lvd1689m gives 384-d: "
        "use --backbone facebook/dinov3-vitl16-pretrain-lvd1689m"
    )


def test_backbone_spec_mismatch_is_a_warning():
    info = make_info(make_model())
    assert check_backbone_compatible(info, "random:tiny", 8) is None
    warning = check_backbone_compatible(info, "/models/other-vit", 8)
    assert "random:tiny" in warning and "/models/other-vit" in warning


def test_model_info_validation():
    model = make_model()
    with pytest.raises(ValueError, match="2 class names"):
        make_info(model, class_names=["a", "b"])
    with pytest.raises(ValueError, match="raw_voxel_size"):
        make_info(model, raw_voxel_size=(8, 0, 4))
    with pytest.raises(ValueError, match="backbone_dim"):
        make_info(model, backbone_dim=0)
    with pytest.raises(ValueError, match="planes"):
        make_info(model, planes=["xy", "xz"])
    info = make_info(model, context_voxel_size=None, extra={"note": "painted by A."})
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
