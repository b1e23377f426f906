"""The DINOv3 backbone on random-initialised configs (real transformers code paths, no hub)."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from napari_dinofuse.errors import BackboneError
from napari_dinofuse.features.backbone import (
    NORMALIZATIONS,
    RandomBackboneWarning,
    intensity_range,
    load_backbone,
    normalization_for,
    resolve_device,
    to_unit_range,
)


def _load(spec, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        return load_backbone(spec, device="cpu", **kwargs)


def test_patch_grid_covers_odd_sizes(tiny_backbone):
    images = torch.rand(2, 37, 50)
    features = tiny_backbone.patch_features(images)
    assert features.shape == (2, 64, 3, 4)  # ceil(37/16), ceil(50/16)
    # The last pixel lies in the padded border patch: changing it must change that patch only.
    changed = images.clone()
    changed[:, -1, -1] = 1.0 - changed[:, -1, -1]
    diff = (tiny_backbone.patch_features(changed) - features).abs().amax(dim=1)
    assert diff[:, -1, -1].min() > 1e-4
    # Global attention mixes a little everywhere, but the changed patch dominates.
    assert (diff[:, -1, -1] > 5 * diff[:, 0, 0]).all()


def test_patch_grid_rejects_non_slices(tiny_backbone):
    with pytest.raises(ValueError, match="B, H, W"):
        tiny_backbone.patch_features(torch.rand(1, 1, 32, 32))


def test_random_specs_are_seeded_across_processes_and_announced():
    with pytest.warns(RandomBackboneWarning, match="NOT DINOv3"):
        backbone = load_backbone("random:tiny", device="cpu")
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from napari_dinofuse.features.backbone import load_backbone\n"
            "print(load_backbone('random:tiny', device='cpu').fingerprint())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == backbone.fingerprint()
    assert _load("random:vits16").fingerprint() != backbone.fingerprint()


def test_random_spec_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _load("random:tiny")
    assert torch.equal(torch.rand(3), expected)


def test_model_is_frozen_in_eval_mode_and_deterministic(tiny_backbone):
    assert not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())
    images = torch.rand(1, 48, 48)
    # In training mode RoPE jitter would make repeated calls differ.
    assert torch.equal(tiny_backbone.patch_features(images), tiny_backbone.patch_features(images))


def test_normalisation_follows_the_checkpoint():
    assert normalization_for("facebook/dinov3-vitl16-pretrain-sat493m") == "sat493m"
    assert normalization_for("facebook/dinov3-vits16-pretrain-lvd1689m") == "lvd1689m"
    sat = _load("random:tiny", normalization="sat493m")
    lvd = _load("random:tiny", normalization="lvd1689m")
    value = torch.full((1, 4, 4), 0.430)
    # The SAT mean of the red channel maps to zero; ImageNet's does not.
    assert sat.preprocess(value)[0, 0].abs().max() < 1e-6
    expected_lvd = (0.430 - NORMALIZATIONS["lvd1689m"][0][0]) / NORMALIZATIONS["lvd1689m"][1][0]
    assert torch.allclose(lvd.preprocess(value)[0, 0], torch.tensor(expected_lvd))
    assert not torch.equal(sat.patch_features(torch.rand(1, 32, 32)), lvd.patch_features(torch.rand(1, 32, 32)))


def test_local_folder_round_trip(tmp_path, tiny_backbone):
    folder = tmp_path / "my-dinov3-sat"
    _load("random:tiny", forward="transformers").model.save_pretrained(folder)
    mean, std = NORMALIZATIONS["sat493m"]
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    assert (folder / "model.safetensors").is_file()
    loaded = load_backbone(str(folder), device="cpu")
    assert loaded.spec.kind == "local" and not loaded.is_random
    assert loaded.normalization == "sat493m"  # read from the folder's preprocessor_config.json
    assert loaded.fingerprint() == tiny_backbone.fingerprint()
    images = torch.rand(1, 40, 40)
    reference = _load("random:tiny", normalization="sat493m").patch_features(images)
    assert torch.allclose(loaded.patch_features(images), reference, atol=1e-6)


def test_wrong_folders_get_actionable_errors(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(BackboneError, match="save_pretrained"):
        load_backbone(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BackboneError, match="not a DINOv3 ViT"):
        load_backbone(str(tmp_path), device="cpu")
    with pytest.raises(BackboneError, match="random:tiny"):
        load_backbone("random:huge", device="cpu")


def test_hub_unreachable_is_one_clear_error():
    code = ("from napari_dinofuse.features.backbone import load_backbone\n"
            "try:\n    load_backbone('facebook/dinov3-vitb16-pretrain-lvd1689m', device='cpu')\n"
            "except Exception as e:\n    print(type(e).__name__, '|', e)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    name, _, message = result.stdout.partition(" | ")
    assert name == "BackboneError"
    assert "cannot be reached" in message and "hf auth login" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused():
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(BackboneError, match="no CUDA"):
        resolve_device("cuda")


def test_intensity_ranges_by_dtype_and_percentile():
    assert intensity_range(np.zeros((2, 2, 2), np.uint8)) == (0.0, 255.0)
    assert intensity_range(np.zeros((2, 2, 2), np.uint16)) == (0.0, 65535.0)
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 10.0, size=(20, 50, 50)).astype(np.float32)
    data[0, 0, :5] = 1e6  # hot pixels must not squash the contrast
    low, high = intensity_range(data)
    assert 60 < low < 80 and 120 < high < 140
    unit = to_unit_range(data, low, high)
    assert unit.min() == 0.0 and unit.max() == 1.0 and 0.45 < unit.mean() < 0.55
    data[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        intensity_range(data)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_unit_range_is_the_same_for_every_dtype_and_leaves_the_input_alone(dtype):
    """Intensities travel in their own dtype and are scaled in a copy: the user's array (often what the tile
    is a view of) never changes, whatever its dtype, and the values are (x - low) / (high - low), clipped."""
    data = (np.arange(4 * 5 * 6) % 200).reshape(4, 5, 6).astype(dtype)
    before = data.copy()
    unit = to_unit_range(data[1:3], 20.0, 180.0)
    assert np.array_equal(data, before)
    expected = np.clip((data[1:3].astype(np.float64) - 20.0) / 160.0, 0, 1)
    assert unit.dtype == torch.float32 and np.allclose(unit.numpy(), expected, atol=1e-6)
    tensor = torch.from_numpy(before)
    assert torch.equal(to_unit_range(tensor, 20.0, 180.0), to_unit_range(before, 20.0, 180.0))
    assert np.array_equal(tensor.numpy(), data)


def test_bf16_weights_keep_the_fingerprint_and_the_features(tiny_backbone):
    # What CUDA gets by default ("auto"); on the CPU only when asked for.
    bf16 = _load("random:tiny", precision="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in bf16.model.buffers())  # RoPE frequencies stay fp32
    assert bf16.fingerprint() == tiny_backbone.fingerprint()  # one model, one cache entry, whatever precision
    assert tiny_backbone.precision == "fp32" and "(bf16, fused)" in bf16.describe()
    images = torch.rand(2, 48, 64)
    ref, out = tiny_backbone.patch_features(images), bf16.patch_features(images)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(out, ref, dim=1).min() > 0.99
    with pytest.raises(BackboneError, match="precision"):
        _load("random:tiny", precision="fp8")


def _odd_vit():
    """A ViT unlike the random:* ones: gated MLP, no key bias, layer scales far from 1."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(3)
    config = DINOv3ViTConfig(patch_size=16, num_register_tokens=2, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=96, use_gated_mlp=True, hidden_act="silu",
                             key_bias=False, layerscale_value=1.0)
    model = DINOv3ViTModel(config)
    for layer in model.model.layer:  # layer scales that matter (the fused forward folds them into weights)
        for scale in (layer.layer_scale1, layer.layer_scale2):
            scale.lambda1.data.uniform_(0.1, 2.0)
    return model


@pytest.mark.parametrize("make", [_odd_vit, lambda: _load("random:vits16", forward="transformers").model])
def test_fused_forward_computes_what_transformers_does(make):
    import copy

    from napari_dinofuse.features.backbone import Backbone, BackboneSpec

    model = make()
    spec = BackboneSpec("random", "test")
    reference = Backbone(copy.deepcopy(model), spec, "lvd1689m", torch.device("cpu"), forward="transformers")
    fused = Backbone(copy.deepcopy(model), spec, "lvd1689m", torch.device("cpu"))
    assert fused.forward == "fused" and fused.fingerprint() == reference.fingerprint()
    images = torch.rand(2, 70, 93)  # padded, non-square: the RoPE tables follow the grid
    ref = reference.patch_features(images)
    out = fused.patch_features(images)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    bf16 = Backbone(copy.deepcopy(model), spec, "lvd1689m", torch.device("cpu"), precision="bf16")
    assert torch.nn.functional.cosine_similarity(bf16.patch_features(images), ref, dim=1).min() > 0.99


def test_compile_failure_falls_back_to_the_eager_forward_with_one_warning(monkeypatch, tiny_backbone):
    from napari_dinofuse.features import backbone as backbone_module

    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError("Compiler: cc not found")
        return run

    monkeypatch.setattr(backbone_module.torch, "compile", broken_compile)
    compiled = _load("random:tiny", compile=True)
    assert "compiled" in compiled.describe()
    images = torch.rand(3, 32, 48)
    with pytest.warns(backbone_module.CompileFallbackWarning, match="cc not found"):
        out = compiled.patch_features(images)
    assert torch.equal(out, tiny_backbone.patch_features(images))
    with warnings.catch_warnings():
        warnings.simplefilter("error", backbone_module.CompileFallbackWarning)  # said once, not per batch
        compiled.patch_features(images)
    assert "compiled" not in compiled.describe()
