import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_dinofuse.geometry import Grid
from napari_dinofuse.modeling import ContextAttentionFusion, FusedUNet3D, UNetConfig, UNetOutput
from napari_dinofuse.modeling.filters import FilterBank, scale_sigmas
from napari_dinofuse.modeling.fusion import ChannelNorm
from napari_dinofuse.modeling.unet import ContextEncoder, ContextWindow, anisotropic_pooling

RAW_C, CTX_C, BASE = 12, 6, 4
FEAT_SHAPE = (5, 3, 2)  # patch grid (Z, Y/16, X/16)
OUT_SHAPE = (5, 40, 27)  # deliberately not multiples of 16
RAW_VOXEL = 4.0
TILE = Grid(OUT_SHAPE, RAW_VOXEL, (0.0, 0.0, 0.0))
# A context window at 16 nm reaching ~80 nm beyond the tile on every side: 6 x 4 x 3 patches of 16 voxels.
WINDOW = Grid((6, 64, 48), 16.0, (-40.0, -100.0, -120.0))


def make_model(fusion="attention", intensity_stem=False, num_classes=3, **kwargs):
    torch.manual_seed(0)
    cfg = UNetConfig(RAW_C, CTX_C, num_classes, base_channels=BASE, fusion=fusion, intensity_stem=intensity_stem,
                     **kwargs)
    return FusedUNet3D(cfg)


def make_window(batch=1, seed=2, image=None):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, CTX_C, WINDOW.shape[0], 4, 3, generator=g)
    if image is None:
        image = torch.rand(batch, 1, *WINDOW.shape, generator=g)
    return ContextWindow(feats, image, WINDOW, TILE)


def make_feats(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, RAW_C, *FEAT_SHAPE, generator=g), make_window(batch, seed + 1)


def ceil_div(a, b):
    return -(-a // b)


# -- fusion ------------------------------------------------------------------------------


def test_fusion_is_residual_gate():
    torch.manual_seed(0)
    fusion = ContextAttentionFusion(8).eval()
    raw, ctx = torch.randn(2, 8, 3, 4, 5), torch.randn(2, 8, 3, 4, 5)
    fused, att = fusion(raw, ctx)
    assert att.shape == raw.shape
    assert att.min() >= 0 and att.max() <= 1
    torch.testing.assert_close(fused, raw + raw * att)
    fused0, _ = fusion(torch.zeros_like(raw), ctx)
    assert torch.count_nonzero(fused0) == 0


# -- pooling follows the voxel size ----------------------------------------------------------


def test_anisotropic_pooling_never_pools_thick_z_early():
    assert anisotropic_pooling((4, 4, 4)) == ((2, 2, 2),) * 4
    # 40 nm sections, 5 nm pixels: y/x pool alone until they reach 40 nm, then all axes.
    assert anisotropic_pooling((40, 5, 5)) == ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert anisotropic_pooling((8, 4, 4)) == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    cfg = UNetConfig(RAW_C, CTX_C, 3, pooling=anisotropic_pooling((40, 5, 5)))
    assert cfg.level_factors == ((1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8))
    assert cfg.size_multiple == (2, 16, 16)


def test_anisotropic_model_keeps_every_slice_at_every_level():
    model = make_model(pooling=anisotropic_pooling((40, 5, 5))).eval()
    raw, window = make_feats()
    with torch.no_grad():
        out = model(raw, window, OUT_SHAPE)
    assert out.logits.shape == (1, 3, *OUT_SHAPE)
    for att, f in zip(out.attention, ((1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8))):
        assert att.shape[2:] == tuple(ceil_div(s, k) for s, k in zip(OUT_SHAPE, f))
        assert att.shape[2] == OUT_SHAPE[0]  # z never pooled below one slice per level


def test_filter_bank_responses_depend_only_on_the_neighbourhood():
    """Given its halo of real data, a tile's filter responses equal the whole image's over that tile."""
    bank = FilterBank(scale_sigmas((8, 4, 4)))
    assert bank.halo == (7, 13, 13) and bank.channels == 10  # z: half the sigmas in voxels
    image = torch.rand(1, 1, 40, 60, 50)
    whole = bank(image)  # the inner part of the image: its shape minus the halo on both sides
    h = bank.halo
    tile = image[:, :, 5:5 + 20 + 2 * h[0], 3:3 + 24 + 2 * h[1], 7:7 + 16 + 2 * h[2]]
    torch.testing.assert_close(bank(tile), whole[:, :, 5:25, 3:27, 7:23])
    # Smooth intensities: a bright slab gives a positive gradient magnitude at its faces, none inside.
    slab = torch.zeros(1, 1, 30, 40, 40)
    slab[..., 20:, :] = 1.0
    out = bank(slab)
    assert out[0, 3, :, 6, 5] .abs().max() > 0.05  # gradient magnitude near the face (y = 6 + 13 = 19)
    assert out[0, 3, :, 0, 5].abs().max() < 1e-3  # far from it


def _filter_bank_reference(bank: FilterBank, image: np.ndarray) -> np.ndarray:
    """The bank's responses (unstandardised) in plain numpy/scipy, one scale and one axis at a time."""
    from scipy.ndimage import correlate1d

    from napari_dinofuse.modeling.filters import _gaussian

    inner = tuple(slice(h, n - h) for h, n in zip(bank.halo, image.shape))
    out = [image[inner]]
    for axes in bank.sigmas:
        g = image.astype(np.float64)
        for a, sigma in enumerate(axes):
            g = correlate1d(g, _gaussian(sigma).double().numpy(), axis=a, mode="nearest")
        laplace, grad2 = 0, 0
        for a in range(3):
            after, before = np.roll(g, -1, axis=a), np.roll(g, 1, axis=a)  # wraps only outside `inner`
            laplace = laplace + after - 2 * g + before
            grad2 = grad2 + (0.5 * (after - before)) ** 2
        scale = max(axes)
        out += [g[inner], laplace[inner] * scale**2, np.sqrt(grad2[inner]) * scale]
    return np.stack(out)


@pytest.mark.parametrize("voxel_size", [(8, 4, 4), (40, 5, 5), (64, 64, 64)])
def test_filter_bank_computes_smoothing_laplacian_and_gradient_per_scale(voxel_size):
    bank = FilterBank(scale_sigmas(voxel_size))
    image = np.random.default_rng(0).random([n + 2 * h for n, h in zip((6, 20, 17), bank.halo)])
    expected = _filter_bank_reference(bank, image)
    got = bank(torch.from_numpy(image).float()[None, None])[0].double().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())


def test_filter_bank_keeps_float32_precision_under_bf16_autocast():
    """On a GPU the stems run under bf16 autocast: a Laplacian computed in bf16 is mostly rounding noise."""
    bank = FilterBank(scale_sigmas((8, 4, 4)))
    image = torch.rand(1, 1, *(n + 2 * h for n, h in zip((4, 24, 24), bank.halo)))
    bank.calibrate([image])  # standardised responses, as a model's
    exact = bank(image.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = bank(image.bfloat16())
    assert fast.dtype == torch.bfloat16
    # Per channel, relative to its spread: about the input's and the output's own bf16 rounding, no more.
    error = (fast.double() - exact).abs().amax((0, 2, 3, 4)) / exact.std((0, 2, 3, 4))
    assert error.max() < 0.05, error


# -- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["attention", "concat", "none"])
def test_logits_and_attention_shapes_for_odd_sizes(fusion):
    model = make_model(fusion).eval()
    raw, window = make_feats()
    with torch.no_grad():
        out = model(raw, window if fusion != "none" else None, out_shape=OUT_SHAPE)
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
    raw, window = make_feats()
    with torch.no_grad():
        for feats, proj in ((raw, model.raw_proj), (window.features, model.context_encoder.proj)):
            fast = model.project_and_upsample(feats, proj, OUT_SHAPE)
            slow = proj(F.interpolate(feats, size=OUT_SHAPE, mode="trilinear", align_corners=False))
            assert fast.shape == (1, proj.out_channels, *OUT_SHAPE)
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


# -- the context branch ----------------------------------------------------------------------


def test_context_beyond_the_tile_steers_the_gates():
    """Context voxels outside the tile's own extent change its attention: the branch sees past the tile."""
    model = make_model().eval()
    raw, window = make_feats()
    image = window.image.clone()
    # Window voxels 3-5 (y) lie at -100 + 16 * [3..5] = -52..-20 nm: entirely before the tile (y >= -2 nm).
    image[:, :, :, 3:6, :] = 1 - image[:, :, :, 3:6, :]
    with torch.no_grad():
        a = model(raw, window, OUT_SHAPE)
        b = model(raw, window._replace(image=image), OUT_SHAPE)
    # (Not every level: a random 4-channel level has a single hidden gate unit, which may be a dead ReLU.)
    assert max(float((x - y).abs().max()) for x, y in zip(a.attention, b.attention)) > 0  # bitwise equal if unread
    assert not torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("pooling, shape, cut", [
    (((2, 2, 2), (1, 2, 2)), (12, 64, 64), [False, True, True]),  # the sample's 64 nm windows: z within reach
    (((1, 2, 2), (1, 2, 2)), (24, 96, 80), [True, True, True]),
    (((2, 2, 2), (2, 2, 2)), (48, 48, 72), [False, False, True]),
    (((1, 2, 2), (1, 2, 2)), (24, 66, 80), [True, False, True]),  # y: not whole pooling cells, so kept whole
])
def test_the_context_encoder_around_what_is_read_gives_the_whole_windows_values(pooling, shape, cut):
    """The context encoder runs on a box around the voxels sampling will read (plus its reach): on those voxels
    it gives what it gives on the whole window, wherever they lie (at the window's faces too), and in a wide
    window the box is smaller: on the sample a training tile reads 3 x 4 x 4 of its 12 x 64 x 64 window."""
    torch.manual_seed(0)
    encoder = ContextEncoder(CTX_C, 4, True, pooling, 16, scale_sigmas((64.0, 64.0, 64.0))).eval()
    g = torch.Generator().manual_seed(3)
    batch = 4
    feats = torch.randn(batch, CTX_C, shape[0], ceil_div(shape[1], 16), ceil_div(shape[2], 16), generator=g)
    window = ContextWindow(feats, torch.rand(batch, 1, *shape, generator=g), Grid(shape, 64.0, (0.0, 0.0, 0.0)),
                           TILE)
    size = np.array([3, 4, 4])
    rng = np.random.default_rng(0)
    low = np.stack([np.zeros(3, int), np.array(shape) - size, (np.array(shape) - size) // 2,  # faces, centre
                    rng.integers(0, np.array(shape) - size + 1)])  # and anywhere
    high = low + size
    with torch.no_grad():
        whole = encoder(window)[0]
        part, start = encoder(window, (low, high))
    for b in range(batch):
        lo, hi = low[b] - start[b], high[b] - start[b]
        assert (lo >= 0).all() and (hi <= part.shape[2:]).all()
        torch.testing.assert_close(part[b, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],
                                   whole[b, :, low[b, 0]:high[b, 0], low[b, 1]:high[b, 1], low[b, 2]:high[b, 2]])
    assert [p < n for p, n in zip(part.shape[2:], shape)] == cut


def test_gates_follow_world_coordinates_not_window_extent():
    """The same context, read through a window cropped far from the tile (on the pooling lattice), gives the
    tile the same gates; the gates move with the world position of the window. Without the context stem, whose
    filter halo (13 voxels at sigma 4) would add to the encoder's reach (21 window voxels, +1 for sampling)."""
    model = make_model(context_stem=False).eval()
    raw, window = make_feats()
    big = ContextWindow(window.features, window.image, WINDOW, TILE)
    # Drop the last patch (16 voxels) of y: the features' interpolation changes from window voxel 40 (half a
    # patch before the cut), and the encoder reaches ~22 voxels (+1 for sampling onto the tile).
    cropped_grid = Grid((6, 48, 48), 16.0, WINDOW.offset)
    cropped = ContextWindow(window.features[:, :, :, :3], window.image[:, :, :, :48], cropped_grid, TILE)
    with torch.no_grad():
        a = model(raw, big, OUT_SHAPE).attention
        b = model(raw, cropped, OUT_SHAPE).attention
    # Rows y < 32 raw voxels (128 nm) sit at window voxels < 14.3: > 25 voxels before 40.
    for k, (x, y) in enumerate(zip(a, b)):
        rows = 32 // 2**k
        torch.testing.assert_close(x[..., :rows, :], y[..., :rows, :], atol=1e-5, rtol=1e-5)
    # Shift the whole window (data and grid) by one window voxel: the gates change (world coordinates matter).
    moved = ContextWindow(window.features, window.image,
                          Grid(WINDOW.shape, 16.0, np.add(WINDOW.offset, (0, 16.0, 0))), TILE)
    with torch.no_grad():
        c = model(raw, moved, OUT_SHAPE).attention
    assert max(float((x - y).abs().max()) for x, y in zip(a, c)) > 1e-4  # a random model: small gates


# -- training ----------------------------------------------------------------------------


def test_backward_reaches_projection_context_branch_fusion_and_head():
    model = make_model("attention")
    raw, window = make_feats()
    target = torch.randint(0, 3, (1, *OUT_SHAPE))
    F.cross_entropy(model(raw, window, out_shape=OUT_SHAPE).logits, target).backward()
    checked = {
        "raw_proj": model.raw_proj,
        "context_encoder": model.context_encoder,
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
    raw, window = make_feats()
    other = make_window(seed=9)
    with torch.no_grad():
        for fusion in ("attention", "concat"):
            fused = make_model(fusion).eval()
            assert not torch.equal(fused(raw, window, OUT_SHAPE).logits, fused(raw, other, OUT_SHAPE).logits)
        none = make_model("none").eval()
        torch.testing.assert_close(none(raw, window, OUT_SHAPE).logits, none(raw, other, OUT_SHAPE).logits)
        torch.testing.assert_close(none(raw, None, OUT_SHAPE).logits, none(raw, window, OUT_SHAPE).logits)


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_context_head_reads_the_context_alone_on_the_tile_grid(fusion):
    """The auxiliary head that trains the context branch: one logit per class and tile voxel, from the context
    only (another raw tile leaves it as it was, another context changes it), and not computed unless asked."""
    model = make_model(fusion).eval()
    raw, window = make_feats()
    other_raw, _ = make_feats(seed=7)
    with torch.no_grad():
        out = model(raw, window, OUT_SHAPE, auxiliary=True)
        assert out.context_logits.shape == out.logits.shape
        torch.testing.assert_close(model(other_raw, window, OUT_SHAPE, auxiliary=True).context_logits,
                                   out.context_logits)
        assert not torch.equal(model(raw, make_window(seed=9), OUT_SHAPE, auxiliary=True).context_logits,
                               out.context_logits)
        assert model(raw, window, OUT_SHAPE).context_logits is None
    assert make_model("none").context_head is None


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_missing_context_raises(fusion):
    raw, _ = make_feats()
    with pytest.raises(ValueError, match="context"):
        make_model(fusion)(raw, None, OUT_SHAPE)


def test_output_does_not_depend_on_the_batch_or_the_mode():
    """Per-voxel normalisation: a tile's output does not depend on what else is in the batch, nor (see
    test_predict / test_train) on the tile's extent, and training computes exactly what inference does (but
    for the context head's evidence, which training adds whole)."""
    model = make_model("attention").eval()
    assert any(isinstance(m, ChannelNorm) for m in model.modules())
    assert not any(isinstance(m, (nn.GroupNorm, nn.InstanceNorm3d, nn.modules.batchnorm._BatchNorm))
                   for m in model.modules())
    raw, window = make_feats(batch=2)
    with torch.no_grad():
        both = model(raw, window, OUT_SHAPE)
        for i in range(2):
            one = window._replace(features=window.features[i:i + 1], image=window.image[i:i + 1])
            single = model(raw[i:i + 1], one, OUT_SHAPE)
            torch.testing.assert_close(both.logits[i:i + 1], single.logits, atol=1e-5, rtol=1e-4)
            for a_both, a_single in zip(both.attention, single.attention):
                torch.testing.assert_close(a_both[i:i + 1], a_single, atol=1e-5, rtol=1e-4)
        model.config.context_evidence_scale = 1.0
        whole = model(raw, window, OUT_SHAPE).logits
        torch.testing.assert_close(model.train()(raw, window, OUT_SHAPE).logits, whole)


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_tiles_with_their_own_windows_get_what_each_gets_alone(fusion):
    """Training batches tiles from different places, each with its own context window; windows of one shape run
    the context branch together. Each tile must still see its own window at its own place in the world."""
    model = make_model(fusion, context_evidence=True).eval()
    raw = make_feats(batch=4)[0]
    placed = [make_window(seed=s) for s in (2, 3, 4, 5)]
    placed[1] = placed[1]._replace(grid=Grid(WINDOW.shape, 16.0, (-40.0, -60.0, -88.0)))  # same shape, moved
    placed[2] = placed[2]._replace(features=placed[2].features[:, :, :, :3], image=placed[2].image[:, :, :, :48],
                                   grid=Grid((6, 48, 48), 16.0, (-40.0, -100.0, -120.0)))  # another shape
    placed[3] = placed[3]._replace(grid=Grid(WINDOW.shape, 16.0, (-24.0, -90.0, -100.0)))  # the first shape again
    with torch.no_grad():
        together = model(raw, placed, OUT_SHAPE, auxiliary=True)
        for i, window in enumerate(placed):
            alone = model(raw[i:i + 1], window, OUT_SHAPE, auxiliary=True)
            torch.testing.assert_close(together.logits[i:i + 1], alone.logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(together.context_logits[i:i + 1], alone.context_logits, atol=1e-5, rtol=1e-4)
            for a_together, a_alone in zip(together.attention, alone.attention):
                torch.testing.assert_close(a_together[i:i + 1], a_alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together.logits[0], together.logits[1])  # the moved window changed tile 1
    assert not torch.allclose(together.logits[0], together.logits[3])


def test_channels_last_on_the_cpu_changes_speed_not_results(monkeypatch):
    """On a CPU the UNet's convs run channels-last (15 % faster training steps): a placed model keeps its conv
    weights so and computes what a contiguous one computes, forward and backward; moved to another device
    type, its weights go back to the contiguous layout (the save format is contiguous either way)."""
    from napari_dinofuse.modeling import unet as unet_module

    raw, window = make_feats(batch=2)
    outputs = {}
    for layout in ("contiguous", "channels last"):
        if layout == "contiguous":
            monkeypatch.setattr(unet_module, "CHANNELS_LAST_DEVICES", set())
        else:
            monkeypatch.undo()
        model = unet_module.place(make_model("attention", intensity_stem=True), "cpu")
        conv = model.encoders[1][0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels last")
        intensity = torch.rand(2, 1, *(n + 2 * h for n, h in zip(OUT_SHAPE, model.intensity_halo)),
                               generator=torch.Generator().manual_seed(5))
        out = model(raw, window, OUT_SHAPE, intensity=intensity)
        out.logits.square().mean().backward()
        outputs[layout] = (out.logits.detach(), conv.grad.clone())
    torch.testing.assert_close(*[o[0] for o in outputs.values()], atol=1e-4, rtol=1e-4)  # float sums reordered
    grads = [o[1] for o in outputs.values()]  # sums over every voxel, in another order: to its scale
    torch.testing.assert_close(*grads, atol=1e-4 * float(grads[0].abs().max()), rtol=1e-4)
    monkeypatch.setattr(unet_module, "CHANNELS_LAST_DEVICES", set())  # as a device without it: contiguous again
    assert unet_module.place(model, "cpu").encoders[1][0].weight.is_contiguous()


def test_intensity_stem():
    model = make_model("none", intensity_stem=True).eval()
    raw, _ = make_feats()
    g = torch.Generator().manual_seed(3)
    halo = model.intensity_halo
    assert halo == (13, 13, 13)  # the filter bank's widest Gaussian (sigma 4: radius 12) and a difference
    with_halo = tuple(n + 2 * h for n, h in zip(OUT_SHAPE, halo))
    i1, i2 = torch.rand(1, 1, *with_halo, generator=g), torch.rand(1, 1, *with_halo, generator=g)
    with torch.no_grad():
        out1 = model(raw, out_shape=OUT_SHAPE, intensity=i1).logits
        out2 = model(raw, out_shape=OUT_SHAPE, intensity=i2).logits
    assert out1.shape == (1, 3, *OUT_SHAPE)
    assert not torch.allclose(out1, out2)
    with pytest.raises(ValueError, match="intensity"):
        model(raw, out_shape=OUT_SHAPE)
    with pytest.raises(ValueError, match="halo"):
        model(raw, out_shape=OUT_SHAPE, intensity=torch.rand(1, 1, *OUT_SHAPE))


@pytest.mark.parametrize("feature_level", [0, 1])
def test_the_patch_features_join_the_encoder_at_their_level(feature_level):
    """At level 1 (the default with the intensity stem) the patch features never reach level 0: what level 0
    computes, and its short path to the logits, follow the intensities alone, so a patch feature cannot paint
    its whole 16-voxel patch as membrane there; the features still reach the logits (level 1's short path and
    the decoder). At level 0 (formats 3-6) they are added to the intensities at every voxel."""
    model = make_model("attention", intensity_stem=True, feature_level=feature_level).eval()
    assert (model.region_head is not None) == (feature_level == 1)
    raw, window = make_feats()
    other_raw = make_feats(seed=7)[0]
    g = torch.Generator().manual_seed(3)
    intensity = torch.rand(1, 1, *(n + 2 * h for n, h in zip(OUT_SHAPE, model.intensity_halo)), generator=g)
    level0 = []
    model.encoders[0].register_forward_hook(lambda module, args, out: level0.append(out))
    with torch.no_grad():
        logits = [model(r, window, OUT_SHAPE, intensity=intensity).logits for r in (raw, other_raw)]
    assert not torch.allclose(*logits)
    assert torch.equal(*level0) == (feature_level == 1)


# -- config ------------------------------------------------------------------------------


def test_config_json_round_trip_and_validation():
    cfg = UNetConfig(1024, 384, 4, base_channels=32, fusion="concat", intensity_stem=True,
                     pooling=anisotropic_pooling((40, 5, 5)), context_margin_nm=2048.0)
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
    with pytest.raises(ValueError, match="pooling"):
        UNetConfig(RAW_C, CTX_C, 2, pooling=((3, 2, 2),) * 4)
    with pytest.raises(ValueError, match="context_margin_nm"):
        UNetConfig(RAW_C, CTX_C, 2, context_margin_nm=-1.0)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="context_evidence_scale must be a number in"):
            UNetConfig(RAW_C, CTX_C, 2, context_evidence_scale=bad)
    assert UNetConfig(RAW_C, CTX_C, 2).feature_level == 1  # with the intensity stem
    assert UNetConfig(RAW_C, CTX_C, 2, intensity_stem=False).feature_level == 0  # level 0 needs an input
    with pytest.raises(ValueError, match="feature_level=1 needs the intensity stem"):
        UNetConfig(RAW_C, CTX_C, 2, intensity_stem=False, feature_level=1)
    for bad in (2, True, 1.0):
        with pytest.raises(ValueError, match="feature_level must be 0 or 1"):
            UNetConfig(RAW_C, CTX_C, 2, feature_level=bad)


def test_channel_norm_normalises_each_voxel_over_its_channels_only():
    """LayerNorm over channels at every voxel: a voxel's output ignores every other voxel; statistics in fp32."""
    layer = ChannelNorm(8)
    x = torch.randn(2, 8, 3, 4, 5) * 3 + 1
    with torch.no_grad():
        expected = F.layer_norm(x.movedim(1, -1), (8,)).movedim(-1, 1)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        changed = x.clone()
        changed[:, :, 0] += 100  # other voxels, other scale
        torch.testing.assert_close(layer(changed)[:, :, 1:], layer(x)[:, :, 1:])
        half = layer(x.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.05, rtol=0.02)


def test_channel_norm_in_bf16_on_a_cpu_gives_fp32s_values_rounded():
    """bf16 activations on a bf16 CPU (predictions under autocast) are normalised as in fp32 and rounded once, by
    a kernel without casts around it; training through bf16 (mixed precision) keeps fp32's parameter gradients."""
    layer = ChannelNorm(16)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.2, 0.2)
    x = (torch.randn(2, 16, 6, 20, 20) * 3 + 1).contiguous(memory_format=torch.channels_last_3d).bfloat16()
    reference = F.layer_norm(x.float().movedim(1, -1), (16,), layer.weight, layer.bias, layer.eps).movedim(-1, 1)
    rounded = reference.detach().bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last_3d)
    assert (y == rounded).float().mean() > 0.999  # the rest one bf16 step apart (fp32 sums in another order)
    torch.testing.assert_close(y.float(), rounded.float(), atol=0.016, rtol=0.008)

    upstream = torch.randn(x.shape).bfloat16()
    reference.backward(upstream.float())
    expected = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x.requires_grad_(True)).backward(upstream)
    torch.testing.assert_close(layer.weight.grad, expected[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(layer.bias.grad, expected[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_the_context_heads_logits_and_the_class_shares_reach_the_prediction(fusion):
    """Predictions add the context head's logits (context_evidence) times context_evidence_scale and, at inference
    only, log(share * K): a class estimated to fill 10 % of the volume loses ground to one filling 80 %, but
    training (equal shares in the strokes, the context head's logits whole) never sees that correction."""
    model = make_model(fusion).eval()
    raw, window = make_feats()
    with torch.no_grad():
        out = model(raw, window, OUT_SHAPE, auxiliary=True)
        model.config.context_evidence = False
        without = model(raw, window, OUT_SHAPE).logits
        assert model.config.context_evidence_scale == 0.75
        torch.testing.assert_close(out.logits, without + 0.75 * out.context_logits)
        model.config.context_evidence = True
        model.config.context_evidence_scale = 1.0
        torch.testing.assert_close(model(raw, window, OUT_SHAPE).logits, without + out.context_logits)
        model.train()
        torch.testing.assert_close(model(raw, window, OUT_SHAPE).logits, without + out.context_logits)
        model.config.context_evidence_scale = 0.75  # training adds them whole whatever the scale
        torch.testing.assert_close(model(raw, window, OUT_SHAPE).logits, without + out.context_logits)
        model.eval()
        shares = torch.tensor([0.8, 0.1, 0.1])
        model.class_prior.copy_(shares)
        corrected = model(raw, window, OUT_SHAPE).logits
        torch.testing.assert_close(corrected, out.logits + (shares * 3).log().view(1, -1, 1, 1, 1))
        assert (corrected.argmax(1) == 0).sum() > (out.logits.argmax(1) == 0).sum()
        model.train()
        torch.testing.assert_close(model(raw, window, OUT_SHAPE).logits, without + out.context_logits)


def test_training_can_leave_the_context_evidence_out_per_tile():
    """Tiles that ``evidence_keep`` marks 0 get exactly what a model without the context head's evidence gives
    (training drops it on some tiles, TrainConfig.context_dropout); the others get it added."""
    model = make_model("attention", num_classes=3).train()
    raw, window = make_feats(batch=2)
    with torch.no_grad():
        out = model(raw, window, OUT_SHAPE, auxiliary=True)
        model.config.context_evidence = False
        without = model(raw, window, OUT_SHAPE).logits
        model.config.context_evidence = True
        kept = model(raw, window, OUT_SHAPE, evidence_keep=torch.tensor([False, True])).logits
    torch.testing.assert_close(kept[0], without[0])
    torch.testing.assert_close(kept[1], out.logits[1])
    assert not torch.allclose(kept[0], out.logits[0])
