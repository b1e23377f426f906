import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_dinofuse.modeling import ContextAttentionFusion, FusedUNet3D, UNetConfig, UNetOutput

RAW_C, CTX_C, BASE = 12, 6, 4
FEAT_SHAPE = (5, 3, 2)  # patch grid (Z, Y/16, X/16)
OUT_SHAPE = (5, 40, 27)  # deliberately not multiples of 16


def make_model(fusion="attention", intensity_stem=False, num_classes=3):
    torch.manual_seed(0)
    cfg = UNetConfig(RAW_C, CTX_C, num_classes, base_channels=BASE, fusion=fusion, intensity_stem=intensity_stem)
    return FusedUNet3D(cfg)


def make_feats(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, RAW_C, *FEAT_SHAPE, generator=g)
    ctx = torch.randn(batch, CTX_C, *FEAT_SHAPE, generator=g)
    return raw, ctx


def ceil_div(a, b):
    return -(-a // b)


# -- fusion ------------------------------------------------------------------------------


def test_fusion_is_residual_gate():
    torch.manual_seed(0)
    fusion = ContextAttentionFusion(8)
    raw, ctx = torch.randn(2, 8, 3, 4, 5), torch.randn(2, 8, 3, 4, 5)
    fused, att = fusion(raw, ctx)
    assert att.shape == raw.shape
    assert att.min() >= 0 and att.max() <= 1
    torch.testing.assert_close(fused, raw + raw * att)
    fused0, _ = fusion(torch.zeros_like(raw), ctx)
    assert torch.count_nonzero(fused0) == 0


# -- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["attention", "concat", "none"])
def test_logits_and_attention_shapes_for_odd_sizes(fusion):
    model = make_model(fusion).eval()
    raw, ctx = make_feats()
    with torch.no_grad():
        out = model(raw, ctx if fusion != "none" else None, out_shape=OUT_SHAPE)
    assert isinstance(out, UNetOutput)
    assert out.logits.shape == (1, 3, *OUT_SHAPE)
    assert torch.isfinite(out.logits).all()
    if fusion != "attention":
        assert out.attention == ()
        return
    assert len(out.attention) == 4
    for k, att in enumerate(out.attention):
        f = 2**k
        assert att.shape == (1, BASE * f, *(ceil_div(s, f) for s in OUT_SHAPE))
        assert att.min() >= 0 and att.max() <= 1


def test_default_out_shape_is_patch_upsampled():
    model = make_model("none").eval()
    raw = torch.randn(1, RAW_C, 2, 1, 2)
    with torch.no_grad():
        out = model(raw)
    assert out.logits.shape == (1, 3, 2, 16, 32)


# -- projection / upsampling -------------------------------------------------------------


def test_project_then_upsample_equals_upsample_then_project():
    model = make_model("attention")
    raw, ctx = make_feats()
    with torch.no_grad():
        for feats, proj in ((raw, model.raw_proj), (ctx, model.context_proj)):
            fast = model.project_and_upsample(feats, proj, OUT_SHAPE)
            slow = proj(F.interpolate(feats, size=OUT_SHAPE, mode="trilinear", align_corners=False))
            assert fast.shape == (1, BASE, *OUT_SHAPE)
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


# -- training ----------------------------------------------------------------------------


def test_backward_reaches_projection_fusion_and_head():
    model = make_model("attention")
    raw, ctx = make_feats()
    target = torch.randint(0, 3, (1, *OUT_SHAPE))
    F.cross_entropy(model(raw, ctx, out_shape=OUT_SHAPE).logits, target).backward()
    checked = {
        "raw_proj": model.raw_proj,
        "context_proj": model.context_proj,
        "head": model.head,
        **{f"fusions.{k}": m for k, m in enumerate(model.fusions)},
    }
    for name, module in checked.items():
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname}"
            assert p.grad.abs().sum() > 0, f"{name}.{pname} gradient is zero"


# -- behaviour ---------------------------------------------------------------------------


def test_context_changes_logits_only_when_fused():
    raw, ctx = make_feats()
    ctx2 = torch.randn_like(ctx)
    with torch.no_grad():
        att = make_model("attention").eval()
        assert not torch.allclose(att(raw, ctx, OUT_SHAPE).logits, att(raw, ctx2, OUT_SHAPE).logits)
        none = make_model("none").eval()
        torch.testing.assert_close(none(raw, ctx, OUT_SHAPE).logits, none(raw, ctx2, OUT_SHAPE).logits)
        torch.testing.assert_close(none(raw, None, OUT_SHAPE).logits, none(raw, ctx, OUT_SHAPE).logits)


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_missing_context_raises(fusion):
    raw, _ = make_feats()
    with pytest.raises(ValueError, match="context"):
        make_model(fusion)(raw, None, OUT_SHAPE)


def test_batch_size_free():
    model = make_model("attention").eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    raw, ctx = make_feats(batch=2)
    with torch.no_grad():
        both = model(raw, ctx, OUT_SHAPE)
        for i in range(2):
            single = model(raw[i : i + 1], ctx[i : i + 1], OUT_SHAPE)
            torch.testing.assert_close(both.logits[i : i + 1], single.logits, atol=1e-5, rtol=1e-4)
            for a_both, a_single in zip(both.attention, single.attention):
                torch.testing.assert_close(a_both[i : i + 1], a_single, atol=1e-5, rtol=1e-4)


def test_intensity_stem():
    model = make_model("none", intensity_stem=True).eval()
    raw, _ = make_feats()
    g = torch.Generator().manual_seed(3)
    i1, i2 = torch.rand(1, 1, *OUT_SHAPE, generator=g), torch.rand(1, 1, *OUT_SHAPE, generator=g)
    with torch.no_grad():
        out1 = model(raw, out_shape=OUT_SHAPE, intensity=i1).logits
        out2 = model(raw, out_shape=OUT_SHAPE, intensity=i2).logits
    assert out1.shape == (1, 3, *OUT_SHAPE)
    assert not torch.allclose(out1, out2)
    with pytest.raises(ValueError, match="intensity"):
        model(raw, out_shape=OUT_SHAPE)


# -- config ------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    cfg = UNetConfig(1024, 384, 4, base_channels=32, fusion="concat", intensity_stem=True)
    restored = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert FusedUNet3D(UNetConfig(RAW_C, CTX_C, 2, base_channels=BASE)).config.fusion == "attention"
    with pytest.raises(ValueError, match="fusion"):
        UNetConfig(RAW_C, CTX_C, 2, fusion="cross")
    with pytest.raises(ValueError, match="fusion"):
        UNetConfig.from_dict({**cfg.to_dict(), "fusion": "cross"})
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({**cfg.to_dict(), "depth": 5})
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(RAW_C, CTX_C, 1)
    with pytest.raises(ValueError, match="base_channels"):
        UNetConfig(RAW_C, CTX_C, 2, base_channels=0)
