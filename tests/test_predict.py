"""Blockwise sliding-window prediction (random tiny ViT + random tiny UNet: real code paths, fake weights)."""

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

import napari_dinofuse.inference.predict as predict_module
from napari_dinofuse.errors import InputError, MemoryRetryWarning
from napari_dinofuse.features.cache import FeatureCache
from napari_dinofuse.features.extract import FeatureSource, compute_features
from napari_dinofuse.geometry import Volume
from napari_dinofuse.inference.outputs import MemorySink, ZarrSink
from napari_dinofuse.inference.plan import plan_prediction, snap_roi
from napari_dinofuse.inference.predict import predict, predict_block, predict_to_memory
from napari_dinofuse.io import open_volume
from napari_dinofuse.modeling.unet import FusedUNet3D, UNetConfig, UNetOutput
from napari_dinofuse.progress import drive

SHAPE = (20, 80, 96)
VOXEL = (4.0, 4.0, 4.0)
OFFSET = (100.0, -40.0, 12.0)
SMALL = {"tile_shape": (16, 48, 48), "overlap": (8, 32, 32), "block_shape": (16, 512, 64)}
BIG = {"tile_shape": (32, 96, 96), "overlap": (8, 32, 32), "block_shape": (64, 512, 512)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small convolutions: with 2 threads on a busy 2-core machine, OpenMP waits dominate (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_backbone):
    rng = np.random.default_rng(0)
    # Smooth-ish structure (blocks of 8 voxels) so features and predictions vary over space, not just noise.
    coarse = rng.integers(0, 256, (3, 10, 12), dtype=np.uint8)
    raw_data = np.kron(coarse, np.ones((8, 8, 8), np.uint8))[:SHAPE[0]]
    raw_data = np.clip(raw_data.astype(int) + rng.integers(-20, 21, SHAPE), 0, 255).astype(np.uint8)
    raw = Volume(raw_data, VOXEL, OFFSET, name="raw")
    ctx = Volume(rng.integers(0, 256, (4, 10, 10), dtype=np.uint8), 64.0, (64.0, -96.0, -64.0), name="context")
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    return FeatureSource(raw, compute_features(raw, tiny_backbone, cache),
                         ctx, compute_features(ctx, tiny_backbone, cache))


def _model(fusion="attention", intensity_stem=False):
    """A random tiny UNet (per-voxel normalisation: its activations, labels and gates vary over the volume)."""
    torch.manual_seed(0)
    return FusedUNet3D(UNetConfig(raw_channels=64, context_channels=64, num_classes=3, base_channels=4,
                                  fusion=fusion, intensity_stem=intensity_stem)).eval()


class _LogitAttention(nn.Module):
    """Level-k "attention" = 2^(k-1)-pooled probability of class 1: spatially varied and as tile-independent
    as the logits (the random gates are nearly constant), so it shows whether maps land on the right voxels."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.intensity_halo = inner, inner.config, inner.intensity_halo

    def forward(self, raw, context=None, out_shape=None, intensity=None):
        out = self.inner(raw, context, out_shape, intensity)
        base = torch.softmax(out.logits, 1)[:, :1]
        size = base.shape[2:]
        base = F.pad(base, [p for n in reversed(size) for p in (0, -n % 8)], mode="replicate")  # as the UNet
        maps = [F.avg_pool3d(base, 2**k) if k else base for k in range(4)]
        return UNetOutput(out.logits, tuple(m[:, :, :-(-size[0] // 2**k), :-(-size[1] // 2**k),
                                              :-(-size[2] // 2**k)] for k, m in enumerate(maps)))


class _Pointwise(nn.Module):
    """Stands in for the UNet where predict's placement, halos and blending are under test: a voxel's logits
    come from its own (interpolated) features alone, so nothing but predict itself can depend on the tiling."""

    intensity_halo = (0, 0, 0)  # reads no intensities

    def __init__(self):
        super().__init__()
        self.config = UNetConfig(raw_channels=64, context_channels=64, num_classes=3, base_channels=4,
                                 intensity_stem=False)
        torch.manual_seed(0)
        self.proj = nn.Conv3d(64, 3, kernel_size=1)
        with torch.no_grad():
            self.proj.weight.mul_(3.0)  # distinct classes

    def forward(self, raw, context=None, out_shape=None, intensity=None):
        return UNetOutput(FusedUNet3D.project_and_upsample(raw, self.proj, out_shape))


@pytest.fixture(scope="module")
def model():
    return _LogitAttention(_Pointwise())


@pytest.fixture(scope="module")
def whole(model, source):
    return predict_to_memory(model, source, device="cpu", **BIG)


@pytest.fixture(scope="module")
def real(source):
    """The real UNet over the whole volume."""
    return predict_to_memory(_model(), source, device="cpu", **BIG)


def _close(a, b, labels_a, labels_b, mean=0.01, worst=0.1, agree=0.98):
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
    assert diff.mean() < mean and diff.max() < worst, (diff.mean(), diff.max())
    assert (labels_a == labels_b).mean() > agree


def test_outputs_shapes_dtypes_and_consistency(real, source):
    out = real
    a = out.arrays
    assert out.complete
    assert a["labels"].shape == SHAPE and a["labels"].dtype == np.uint8
    assert a["probabilities"].shape == (3, *SHAPE) and a["probabilities"].dtype == np.float16
    assert a["uncertainty"].shape == SHAPE and a["uncertainty"].dtype == np.float16
    labels, probs = a["labels"], a["probabilities"].astype(np.float32)
    assert set(np.unique(labels)) <= {1, 2, 3} and len(np.unique(labels)) > 1
    assert np.array_equal(labels, np.argmax(a["probabilities"], axis=0) + 1)
    assert np.allclose(probs.sum(0), 1.0, atol=3e-3)
    u = a["uncertainty"].astype(np.float32)
    assert u.min() >= 0 and u.max() <= 1 and u.std() > 0
    assert out.grids["labels"] == source.raw.grid


def test_tile_and_block_size_do_not_change_the_result(model, source, whole):
    # One whole-volume tile vs 16x48x48 tiles in 6 blocks. Not exact: the UNet's receptive field exceeds a
    # tile, and blending only damps what each tile's borders get wrong. Measured: mean 0.002, max 0.06,
    # 99.5% same labels; without overlap (below) mean 0.022, max 0.38, 92% same labels.
    small = predict_to_memory(model, source, device="cpu", **SMALL)
    _close(whole.arrays["probabilities"], small.arrays["probabilities"], whole.arrays["labels"],
           small.arrays["labels"])
    for k in range(1, 5):  # attention maps blend onto their level grids just as well
        a, b = whole.arrays[f"attention/level{k}"], small.arrays[f"attention/level{k}"]
        a, b = a.astype(np.float32), b.astype(np.float32)
        assert a.std() > 0.05 and np.abs(a - b).mean() < 0.01 and np.abs(a - b).max() < 0.1  # measured 0.06
    # Without overlap, tiles meet at hard seams: several times the error of blended overlaps.
    seams = predict_to_memory(model, source, device="cpu", tile_shape=(16, 48, 48), overlap=0,
                              block_shape=(16, 512, 64))
    err = [np.abs(s.arrays["probabilities"].astype(np.float32) - whole.arrays["probabilities"]).mean()
           for s in (small, seams)]
    assert 5 * err[0] < err[1]


def test_the_region_asked_first_is_shown_before_the_rest_and_changes_nothing(model, source, whole):
    """With the region in view asked first, one step hands over the sink once that region is written and nothing
    else is (what a viewer shows then), and the finished prediction is the one without it."""
    first = (slice(2, 5), slice(0, 80), slice(10, 30))
    steps, shown = predict(model, source, device="cpu", sink=MemorySink(), first=first, **SMALL), []
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            sink = finished.value
            break
        if step.partial is not None:
            shown.append((step.partial, step.partial.arrays["labels"].copy()))
    assert len(shown) == 1 and shown[0][0] is sink
    early = shown[0][1]
    box = (slice(0, 8), slice(0, 80), slice(0, 32))  # the asked region grown onto the blocks' grid
    assert (early[box] > 0).all()
    early[box] = 0
    assert not early.any()  # the rest is not computed yet
    _close(whole.arrays["probabilities"], sink.arrays["probabilities"], whole.arrays["labels"],
           sink.arrays["labels"])


def test_the_real_unet_does_not_depend_on_the_tile(real, source):
    """Per-voxel normalisation and one context window per block: the attention maps do not depend on
    the tiling at all, and the labels only through the tiles' zero-padded borders, which blending damps. A
    random UNet has many near-ties between classes (measured 32x64x64 tiles vs one whole-volume tile: mean
    0.005, max 0.17, 96.9% same labels, attention max 0.0005; GroupNorm: 0.017, 0.28, 94%); the trained
    model's agreement is checked in test_train."""
    a = real
    b = predict_to_memory(_model(), source, device="cpu", tile_shape=(32, 64, 64), overlap=(8, 32, 32))
    _close(a.arrays["probabilities"], b.arrays["probabilities"], a.arrays["labels"], b.arrays["labels"],
           mean=0.01, worst=0.25, agree=0.96)
    for k in range(1, 5):
        diff = np.abs(a.arrays[f"attention/level{k}"].astype(np.float32) - b.arrays[f"attention/level{k}"])
        assert diff.max() < 0.002


def test_attention_maps_live_on_their_level_grids(real, source):
    roi_grid = source.raw.grid
    for k in range(1, 5):
        f = 2 ** (k - 1)
        att = real.arrays[f"attention/level{k}"]  # the UNet's own gates, channel mean
        grid = real.grids[f"attention/level{k}"]
        assert att.dtype == np.float16 and att.shape == tuple(-(-n // f) for n in SHAPE) == grid.shape
        assert 0 <= att.min() and att.max() <= 1 and att.astype(np.float32).std() > 0
        assert grid.voxel_size == tuple(v * f for v in VOXEL)
        if all(n % f == 0 for n in SHAPE):  # same physical extent as the ROI
            assert np.allclose(grid.bounds[0], roi_grid.bounds[0]) and np.allclose(grid.bounds[1], roi_grid.bounds[1])
        else:
            assert np.allclose(grid.bounds[0], roi_grid.bounds[0])


def test_roi_matches_the_whole_volume_crop(model, source, whole):
    # z starts at 3: the halo before it reaches out of the volume, which must not spoil the first slices
    # (measured mean 0.005, max 0.03; 0.1 mean on the first slice before edge padding was added).
    roi = (slice(3, 17), slice(21, 70), slice(40, 90))
    part = predict_to_memory(model, source, roi, device="cpu", **SMALL)
    snapped = snap_roi(roi, SHAPE)
    assert snapped == (slice(3, 17), slice(16, 70), slice(32, 90))  # y/x starts on the 16-pixel grid
    assert part.arrays["labels"].shape == (14, 54, 58)
    grid = part.grids["labels"]
    assert grid.offset == (100.0 + 3 * 4, -40.0 + 16 * 4, 12.0 + 32 * 4) and grid.voxel_size == VOXEL
    _close(part.arrays["probabilities"], whole.arrays["probabilities"][(slice(None), *snapped)],
           part.arrays["labels"], whole.arrays["labels"][snapped])
    # Level grids of an ROI are relative to the ROI: level 2 starts half a voxel further along.
    g2 = part.grids["attention/level2"]
    assert np.allclose(g2.offset, np.array(grid.offset) + 2.0) and part.arrays["attention/level2"].shape == (7, 27, 29)
    # The string form does the same.
    assert predict_to_memory(model, source, "3:17,21:70,40:90", device="cpu", **BIG).arrays["labels"].shape == \
        (14, 54, 58)


def test_fusion_none_needs_no_context_and_has_no_attention(source):
    plain = FeatureSource(source.raw, source.raw_features)
    out = predict_to_memory(_model("none"), plain, device="cpu", **BIG)
    assert out.arrays["labels"].shape == SHAPE
    assert not any(name.startswith("attention") for name in out.arrays)
    with pytest.raises(InputError, match="context"):
        predict_to_memory(_model("attention"), plain, device="cpu", **BIG)


def test_intensity_stem_model_runs_on_clipped_tiles(source):
    roi = (slice(0, 9), slice(0, 41), slice(0, 37))  # sizes off the patch grid: the image is padded
    out = predict_to_memory(_model("concat", intensity_stem=True), source, roi, device="cpu", **BIG)
    assert out.arrays["probabilities"].shape == (3, 9, 41, 37)
    assert np.allclose(out.arrays["probabilities"].astype(np.float32).sum(0), 1.0, atol=3e-3)


def test_zarr_output_opens_with_its_geometry(tmp_path, model, source, whole):
    out = tmp_path / "OUT.zarr"
    roi = (slice(2, 20), slice(16, 80), slice(0, 96))
    drive(predict(model, source, roi, device="cpu", sink=ZarrSink(out), **BIG))
    labels = open_volume(out / "labels")
    assert labels.shape == (18, 64, 96) and labels.voxel_size == VOXEL
    assert labels.offset == (100.0 + 2 * 4, -40.0 + 16 * 4, 12.0)
    assert (np.asarray(labels.data) == whole.arrays["labels"][roi]).mean() > 0.98
    level2 = open_volume(out / "attention" / "level2")
    assert level2.voxel_size == (8.0, 8.0, 8.0) and level2.shape == (9, 32, 48)
    assert np.allclose(level2.offset, np.array(labels.offset) + 2.0)
    probs = zarr.open_group(str(out / "probabilities"), mode="r")
    image = probs.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in image["axes"]] == ["c", "z", "y", "x"] and probs["0"].shape == (3, 18, 64, 96)
    assert image["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, *VOXEL]
    assert [p.name for p in tmp_path.iterdir()] == ["OUT.zarr"]  # no partial folder left

    # Re-running replaces the output (here with a smaller ROI).
    drive(predict(model, source, (slice(0, 8), slice(0, 32), slice(0, 32)), device="cpu",
                       sink=ZarrSink(out), **BIG))
    assert open_volume(out / "labels").shape == (8, 32, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["OUT.zarr"]


def test_cancel_stops_early_and_leaves_no_output(tmp_path, model, source):
    out = tmp_path / "OUT.zarr"
    gen = predict(model, source, device="cpu", sink=ZarrSink(out), **SMALL)
    events = [next(gen) for _ in range(4)]
    total = events[0].total
    gen.close()
    assert events[-1].done == 3 < total
    assert list(tmp_path.iterdir()) == []  # neither OUT.zarr nor a .OUT.zarr.partial-* folder


def test_cancel_keeps_a_previous_output_and_refuses_foreign_paths(tmp_path, model, source):
    out = tmp_path / "OUT.zarr"
    drive(predict(model, source, (slice(0, 8), slice(0, 32), slice(0, 32)), device="cpu",
                       sink=ZarrSink(out), **BIG))
    gen = predict(model, source, device="cpu", sink=ZarrSink(out), **SMALL)
    next(gen), next(gen)
    gen.close()
    assert open_volume(out / "labels").shape == (8, 32, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["OUT.zarr"]
    foreign = tmp_path / "raw.zarr"
    foreign.mkdir()
    with pytest.raises(InputError, match="not a dinofuse prediction"):
        ZarrSink(foreign)


def test_a_full_disk_mid_prediction_keeps_the_previous_output_and_the_next_run_works(tmp_path, model, source,
                                                                                     monkeypatch):
    out = tmp_path / "OUT.zarr"
    drive(predict(model, source, (slice(0, 8), slice(0, 32), slice(0, 32)), device="cpu",
                  sink=ZarrSink(out), **BIG))
    original, writes = ZarrSink.write, []

    def full_disk(self, name, region, array):
        writes.append(name)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        return original(self, name, region, array)

    monkeypatch.setattr(ZarrSink, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        drive(predict(model, source, device="cpu", sink=ZarrSink(out), **SMALL))
    assert open_volume(out / "labels").shape == (8, 32, 32)  # the previous prediction, still whole
    assert [p.name for p in tmp_path.iterdir()] == ["OUT.zarr"]  # nothing half-written beside it
    monkeypatch.setattr(ZarrSink, "write", original)
    drive(predict(model, source, device="cpu", sink=ZarrSink(out), **SMALL))
    assert open_volume(out / "labels").shape == source.raw.shape


@pytest.mark.parametrize("roi", [None, (slice(3, 17), slice(20, 71), slice(5, 90))])
def test_block_reads_equal_the_per_tile_reads(source, roi):
    """Raw features and intensities read once per block and sliced per tile equal one-tile reads (incl. slices
    before the volume, edge-padded, and intensity tiles padded to whole patches); every tile of a block shares
    the block's context window, placed on the tile's own voxel grid."""
    plan = plan_prediction(_model("concat", intensity_stem=True), source, roi, **SMALL)
    assert any(outer[0].start < 0 for _, outer, _ in plan.blocks) == (roi is not None)
    halo = (3, 5, 5)
    for _, outer, tiles in plan.blocks:
        block = source.block(outer, "cpu", context=True, intensity=True, halo=halo)
        for tile in tiles:
            full_yx = tuple(-(-(s.stop - s.start) // 16) * 16 for s in tile[1:])
            got = block.tile(tile, full_yx=full_yx)
            want = source.tile(tile, intensity=True, full_yx=full_yx, halo=halo)
            assert tuple(got.intensity.shape[2:]) == (tile[0].stop - tile[0].start + 6, full_yx[0] + 10,
                                                      full_yx[1] + 10)
            for g, w in ((got.raw, want.raw), (got.intensity, want.intensity)):
                assert g.dtype == torch.float32
                np.testing.assert_array_equal(g.numpy(), w.numpy())
            assert got.context.grid == block.context[2] and got.context.grid.covers(want.context.target)
            assert got.context.target == want.context.target == source.raw.grid.crop(
                [s.start for s in tile], [tile[0].stop, tile[1].start + full_yx[0], tile[2].start + full_yx[1]])
    # Before the volume, and beyond it, intensities repeat the edge (as np.pad(mode="edge")).
    one = source.tile((slice(-2, 4), slice(0, 16), slice(0, 16)), intensity=True, halo=(1, 2, 2)).intensity
    expected = np.pad(source.raw.data[:5, :18, :18].astype(np.float32), [(3, 0), (2, 0), (2, 0)], mode="edge")
    np.testing.assert_allclose(one[0, 0].numpy(), (expected - source.low) / (source.high - source.low), atol=1e-6)


def test_the_context_window_reaches_the_margin(source):
    """The window holds the context within the margin of the tile on every side (clipped to the context)."""
    tile = (slice(4, 12), slice(16, 48), slice(32, 64))
    target = source.raw.grid.crop([s.start for s in tile], [s.stop for s in tile])
    ctx = source.context.grid
    for margin in (0.0, 100.0, 300.0):
        window = ctx.crop(*zip(*[(s.start, s.stop) for s in source.context_window(target, margin)]))
        lo, hi = target.bounds
        want_lo, want_hi = np.maximum(lo - margin, ctx.bounds[0]), np.minimum(hi + margin, ctx.bounds[1])
        assert np.all(window.bounds[0] <= want_lo + 1e-6) and np.all(window.bounds[1] >= want_hi - 1e-6)
    whole = source.context_window(target, None)
    assert tuple(s.stop - s.start for s in whole) == ctx.shape
    with pytest.raises(InputError, match="margin"):
        source.context_window(target, -5.0)


def test_widened_windows_of_same_shape_tiles_are_alike(source, tiny_backbone, tmp_path):
    """Training widens every tile's context window to ``window_shape`` so that a step runs the context branch once
    for all its tiles: wherever a tile lies, its own window fits in that shape, the widened one still holds it, and
    has that shape unless the context ends first."""
    ctx = Volume(np.random.default_rng(1).integers(0, 256, (16, 48, 48), dtype=np.uint8), 64.0, (40.0, -1000.0, -900.0),
                 name="wide context")
    wide = FeatureSource(source.raw, source.raw_features, ctx,
                         compute_features(ctx, tiny_backbone, FeatureCache(tmp_path)))
    tile = (8, 32, 32)
    for margin in (0.0, 100.0, 1024.0):
        size = wide.window_shape(tile, margin)
        alike = 0
        for z in range(0, SHAPE[0] - tile[0] + 1, 3):
            for y in range(0, SHAPE[1] - tile[1] + 1, 16):
                for x in range(0, SHAPE[2] - tile[2] + 1, 16):
                    target = wide.raw.grid.crop((z, y, x), (z + tile[0], y + tile[1], x + tile[2]))
                    own = wide.context_window(target, margin)
                    widened = wide.context_window(target, margin, at_least=size)
                    assert all(o.stop - o.start <= n for o, n in zip(own, size)), (margin, own, size)
                    assert all(w.start == o.start and w.stop >= o.stop for w, o in zip(widened, own))
                    spans = [w.stop - w.start for w in widened]
                    assert all(s == n or w.stop == c for s, n, w, c in zip(spans, size, widened, ctx.shape))
                    alike += spans == list(size)
        assert alike > 0
    assert wide.window_shape(tile, None) is None


def _serial(model, source, **settings):
    """predict()'s outputs computed block after block on this thread: the reference for the overlapped run."""
    plan = plan_prediction(model, source, None, **settings)
    sink = MemorySink()
    for name, shape, dtype, grid, chunks in plan.outputs():
        sink.create(name, shape, dtype, grid, chunks)
    for index in range(len(plan.blocks)):
        for name, region, array in drive(predict_block(model, source, plan, index, torch.device("cpu"))):
            sink.write(name, region, array)
    return sink


def test_overlapped_reads_and_writes_give_the_serial_result(source, monkeypatch):
    """Reads run on one thread, one block ahead, and writes on another, in block order: bit for bit the serial
    result (the real UNet with context and intensities, so every read path runs in the reader thread)."""
    model = _model("attention", intensity_stem=True)
    settings = {**SMALL, "tile_shape": (16, 64, 64)}
    serial = _serial(model, source, **settings)
    threads, written = set(), []
    read, write = FeatureSource.block, MemorySink.write

    def logged_read(self, *args, **kwargs):
        threads.add(("read", threading.current_thread().name.split("_")[0]))
        return read(self, *args, **kwargs)

    def logged_write(self, name, region, array):
        threads.add(("write", threading.current_thread().name.split("_")[0]))
        written.append((name, region))
        return write(self, name, region, array)

    monkeypatch.setattr(FeatureSource, "block", logged_read)
    monkeypatch.setattr(MemorySink, "write", logged_write)
    out = predict_to_memory(model, source, device="cpu", **settings)
    assert threads == {("read", "dinofuse-read"), ("write", "dinofuse-write")}
    plan = plan_prediction(model, source, None, **settings)
    assert [r for name, r in written if name == "labels"] == [
        tuple(slice(c.start, c.stop) for c in core) for core, _, _ in plan.blocks]  # block order
    assert out.complete and out.arrays.keys() == serial.arrays.keys()
    for name, array in serial.arrays.items():
        np.testing.assert_array_equal(out.arrays[name], array, err_msg=name)


def test_a_failed_read_surfaces_and_leaves_no_output(tmp_path, model, source, monkeypatch):
    read, calls = FeatureSource.block, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk gone")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(FeatureSource, "block", failing)
    with pytest.raises(OSError, match="disk gone"):
        drive(predict(model, source, device="cpu", sink=ZarrSink(tmp_path / "OUT.zarr"), **SMALL))
    assert list(tmp_path.iterdir()) == []


def _out_of_memory_above(monkeypatch, size):
    """_run_tile raises torch.OutOfMemoryError for tiles larger than ``size`` in y or x; returns the raises."""
    run, raised = predict_module._run_tile, []

    def limited(model, features, tile, with_attention):
        if max(tile[1].stop - tile[1].start, tile[2].stop - tile[2].start) > size:
            raised.append(tile)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return run(model, features, tile, with_attention)

    monkeypatch.setattr(predict_module, "_run_tile", limited)
    return raised


def test_out_of_memory_retries_the_block_once_with_smaller_tiles(model, source, monkeypatch):
    """Tiles of 96 in y/x run out of memory: the first block is retried with tiles of 48 (the overlap, 32,
    still leaves a step), which the rest of the run keeps; the blocks and outputs stay those of the plan. The
    blocks' halos (the first overlap) are kept too, so the result is exactly a run with tiles of 48 from the start."""
    direct = predict_to_memory(model, source, device="cpu", **SMALL)
    raised = _out_of_memory_above(monkeypatch, 48)
    with pytest.warns(MemoryRetryWarning, match=r"tiles of \(16, 48, 48\)") as caught:
        retried = predict_to_memory(model, source, device="cpu", **{**SMALL, "tile_shape": (16, 96, 96)})
    assert len(raised) == 1 and len(caught) == 1
    assert retried.complete and retried.arrays.keys() == direct.arrays.keys()
    for name, array in direct.arrays.items():
        np.testing.assert_array_equal(retried.arrays[name], array, err_msg=name)


def test_a_second_out_of_memory_raises_and_leaves_no_output(tmp_path, model, source, monkeypatch):
    raised = _out_of_memory_above(monkeypatch, 16)
    with pytest.warns(MemoryRetryWarning), pytest.raises(torch.OutOfMemoryError):
        drive(predict(model, source, device="cpu", sink=ZarrSink(tmp_path / "OUT.zarr"),
                      **{**SMALL, "tile_shape": (16, 96, 96)}))
    assert len(raised) == 2  # the tile of 96, then the retry's tile of 48
    assert list(tmp_path.iterdir()) == []


def test_a_cancel_waits_for_the_write_in_flight_before_aborting(tmp_path, model, source, monkeypatch):
    """Block 1's results are written while block 2 runs: a cancel then lets that write end before the sink is
    aborted (never deleting a folder under a running write) and leaves nothing."""
    events, write, abort = [], ZarrSink.write, ZarrSink.abort

    def slow_write(self, name, region, array):
        time.sleep(0.05)
        write(self, name, region, array)
        events.append("write")

    def logged_abort(self):
        events.append("abort")
        abort(self)

    monkeypatch.setattr(ZarrSink, "write", slow_write)
    monkeypatch.setattr(ZarrSink, "abort", logged_abort)
    gen = predict(model, source, device="cpu", sink=ZarrSink(tmp_path / "OUT.zarr"), **SMALL)
    while not next(gen).message.startswith("block 2/"):
        pass
    gen.close()
    assert events == ["write"] * (3 + 4) + ["abort"]  # block 1's labels, probabilities, uncertainty, 4 levels
    assert list(tmp_path.iterdir()) == []

