"""Volumes in world coordinates (napari's pixel-centre convention) and resampling between grids."""

import numpy as np
import pytest
import torch

from napari_dinofuse.errors import GeometryError
from napari_dinofuse.geometry import Grid, Volume, read_boxes, resample, resample_batch
from napari_dinofuse.modeling.unet import crop_to_reads, cut_boxes


def _blob(grid: Grid, centre_nm, sigma_nm: float) -> np.ndarray:
    """A Gaussian landmark rendered at voxel centres (what a microscope at that grid would see)."""
    axes = np.meshgrid(*(grid.axis_centres(a) for a in range(3)), indexing="ij")
    d2 = sum((ax - c) ** 2 for ax, c in zip(axes, centre_nm))
    return np.exp(-d2 / (2 * sigma_nm**2)).astype(np.float32)


def test_landmark_lands_at_its_world_position_after_resampling():
    # A 4 nm raw field, off-centre inside a 16x wider 64 nm context (as in a real acquisition).
    raw = Grid((32, 128, 128), voxel_size=4.0, offset=(2_000.0, 9_000.0, 5_000.0))
    context = Grid((48, 160, 128), voxel_size=64.0, offset=(30.0, 30.0, 30.0))
    landmark = np.array([2_050.0, 9_300.0, 5_210.0])  # inside the raw field, away from its centre
    context_values = _blob(context, landmark, sigma_nm=80.0)

    on_raw = resample(context_values, context, raw)
    peak = raw.index_to_world(np.unravel_index(np.argmax(on_raw), raw.shape))
    assert np.all(np.abs(peak - landmark) <= 32.0), (peak, landmark)  # within half a context voxel

    # The reference design's alignment (resize the whole context crop onto the raw crop) misses it.
    naive_index = np.array(np.unravel_index(np.argmax(context_values), context.shape)) / np.array(context.shape)
    naive_peak = raw.index_to_world(naive_index * np.array(raw.shape))
    assert np.any(np.abs(naive_peak - landmark) > 100.0)  # tens of raw voxels off


def test_linear_resampling_reproduces_a_linear_field_exactly():
    src = Grid((6, 10, 12), voxel_size=(40.0, 64.0, 64.0), offset=(10.0, -100.0, 50.0))
    dst = Grid((18, 50, 60), voxel_size=(8.0, 4.0, 4.0), offset=(60.0, 20.0, 200.0))  # inside src centres
    coeff = np.array([0.5, -0.25, 2.0])

    def field(grid):
        axes = np.meshgrid(*(grid.axis_centres(a) for a in range(3)), indexing="ij")
        return sum(c * ax for c, ax in zip(coeff, axes)) + 7.0

    out = resample(np.stack([field(src), -field(src)]), src, dst)  # channels ride along
    assert out.shape == (2, *dst.shape)
    assert np.allclose(out[0], field(dst), rtol=1e-5, atol=1e-2)
    assert np.allclose(out[1], -field(dst), rtol=1e-5, atol=1e-2)


def test_torch_and_numpy_resampling_agree():
    src = Grid((4, 8, 8), 64.0)
    dst = Grid((16, 40, 40), 8.0, offset=(-20.0, 10.0, 30.0))
    values = np.random.default_rng(1).random((3, 4, 8, 8), dtype=np.float32)
    expected = resample(values, src, dst)
    got = resample(torch.from_numpy(values), src, dst)
    assert isinstance(got, torch.Tensor)
    assert np.allclose(got.numpy(), expected, atol=1e-6)


def test_torch_resampling_carries_leading_axes_and_gradients():
    """The context branch's maps are resampled in training: batch and channel axes ride along, the values'
    dtype is kept, and gradients reach the window (checked against finite differences)."""
    src = Grid((3, 5, 4), (40.0, 64.0, 64.0), offset=(0.0, 30.0, -10.0))
    dst = Grid((7, 9, 11), (16.0, 20.0, 24.0), offset=(-30.0, 40.0, 0.0))  # partly beyond the last centres
    values = torch.from_numpy(np.random.default_rng(2).random((2, 3, 3, 5, 4)))
    got = resample(values.half(), src, dst, check_coverage=False)
    assert got.dtype == torch.float16 and got.shape == (2, 3, *dst.shape)
    expected = resample(values.numpy(), src, dst, check_coverage=False)
    assert np.allclose(got.float().numpy(), expected, atol=2e-3)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: resample(v, src, dst, check_coverage=False), (values,))


def test_batch_resampling_places_each_element_on_its_own_grids():
    """Training samples every tile's gates from its own context window in one call; so do predictions, by another
    kernel (matrices: no gradients), with the same values."""
    values = torch.rand(3, 2, 4, 6, 5, dtype=torch.float64)
    sources = [Grid((4, 6, 5), 16.0, (0.0, 0.0, 0.0)), Grid((4, 6, 5), 16.0, (8.0, -20.0, 4.0)),
               Grid((4, 6, 5), (16.0, 12.0, 12.0), (0.0, 0.0, 0.0))]
    targets = [Grid((5, 7, 3), 4.0, (10.0, 2.0, 30.0)), Grid((5, 7, 3), 6.0, (0.0, 0.0, 0.0)),
               Grid((5, 7, 3), 4.0, (-8.0, 40.0, 12.0))]
    out = resample_batch(values, sources, targets)
    assert out.shape == (3, 2, 5, 7, 3) and out.dtype == torch.float64
    for b in range(3):
        expected = resample(values[b].numpy(), sources[b], targets[b], check_coverage=False)
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-12)
    trained = resample_batch(values.clone().requires_grad_(True), sources, targets)  # training's own kernel
    torch.testing.assert_close(trained.detach(), out, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        resample_batch(values, sources, targets[:2] + [Grid((5, 7, 4), 4.0)])
    with pytest.raises(GeometryError, match="source grids"):
        resample_batch(values, sources[:2] + [Grid((4, 6, 6), 16.0)], targets)


def test_cutting_values_to_what_resampling_reads_changes_nothing():
    """The gates are pointwise, so they are computed only on the part of a context window that sampling reads."""
    values = torch.rand(3, 2, 20, 24, 22, dtype=torch.float64)
    sources = [Grid((20, 24, 22), 64.0, (0.0, 0.0, 0.0)), Grid((20, 24, 22), 64.0, (-600.0, 30.0, -100.0)),
               Grid((20, 24, 22), 64.0, (-1200.0, -1400.0, -1300.0))]  # the last one's tile at its far corner
    tiles = [Grid((16, 32, 32), 4.0, (600.0, 700.0, 650.0)), Grid((16, 32, 32), 4.0, (10.0, 500.0, 200.0)),
             Grid((16, 32, 32), 4.0, (0.0, 0.0, 0.0))]
    targets = [tiles, [t.coarsen((1, 8, 8)) for t in tiles]]
    cut, grids = crop_to_reads(values, sources, *read_boxes(sources, targets))
    assert cut.shape[:2] == (3, 2) and all(g.shape == cut.shape[2:] for g in grids)
    assert np.prod(cut.shape[2:]) < np.prod(values.shape[2:]) / 100
    for level in targets:
        torch.testing.assert_close(resample_batch(cut, grids, level), resample_batch(values, sources, level),
                                   rtol=0, atol=1e-12)
    wide = [Grid((40, 40, 40), 100.0, (-2000.0, -2000.0, -2000.0))] * 3  # reads every window whole: no cut
    assert crop_to_reads(values, sources, *read_boxes(sources, [wide]))[0] is values


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_cut_boxes_backward_is_autograds_own(layout):
    """The boxes' cut has a backward of its own (one gradient filled for the batch): it must give what slicing
    each element gives, overlapping boxes and the values' layout included."""
    values = torch.rand(3, 4, 6, 9, 8, dtype=torch.float64).contiguous(memory_format=layout)
    start, size = np.array([[0, 0, 0], [2, 5, 3], [1, 3, 3]]), (4, 4, 5)
    weights = torch.rand(3, 4, *size, dtype=torch.float64)
    grads = []
    for cut in (cut_boxes, lambda v, a, n: torch.cat([v[b:b + 1, :, z:z + n[0], y:y + n[1], x:x + n[2]]
                                                      for b, (z, y, x) in enumerate(a)])):
        leaf = values.clone().requires_grad_(True)
        out = cut(leaf, start, size)
        (out * weights).sum().backward()
        grads.append((out.detach(), leaf.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert grads[0][1].stride() == values.stride()


def test_nearest_resampling_keeps_label_values():
    src = Grid((2, 4, 4), 64.0)
    labels = np.arange(32, dtype=np.uint8).reshape(2, 4, 4)
    out = resample(labels, src, Grid((8, 16, 16), 16.0, offset=(-24.0, -24.0, -24.0)), mode="nearest")
    assert out.dtype == np.uint8 and set(np.unique(out)) == set(range(32))


def test_napari_pixel_centre_convention():
    raw = Grid((16, 16, 16), 4.0)
    coarse = raw.coarsen(16)  # one 64 nm voxel over sixteen 4 nm voxels
    assert coarse.voxel_size == (64.0, 64.0, 64.0)
    assert coarse.offset == (30.0, 30.0, 30.0)  # napari translate: centre of the 16 raw voxels
    assert np.allclose(coarse.bounds[0], raw.bounds[0]) and np.allclose(coarse.bounds[1], raw.bounds[1])
    assert raw.crop((1, 2, 3), (5, 6, 7)).offset == (4.0, 8.0, 12.0)


def test_context_that_misses_the_raw_is_a_clear_error():
    raw = Volume(np.zeros((8, 64, 64), np.uint8), voxel_size=4.0, offset=(0.0, 0.0, 1_000.0), name="raw")
    context = Volume(np.zeros((4, 16, 16), np.uint8), voxel_size=64.0, name="context")
    with pytest.raises(GeometryError, match="context does not cover raw") as info:
        context.require_covers(raw)
    assert "x 998..1254 nm" in str(info.value)  # both extents are shown, so the user can fix them
    shifted = Volume(context.data, voxel_size=64.0, offset=(0.0, 0.0, 1_000.0), name="context")
    shifted.require_covers(raw)
    with pytest.raises(GeometryError, match="does not cover"):
        context.resample_onto(raw.grid)


@pytest.mark.parametrize(
    "data, voxel_size, message",
    [
        (np.zeros((64, 64)), 4.0, "2D"),
        (np.zeros((4, 64, 64, 3)), 4.0, "RGB"),
        (np.zeros((2, 4, 64, 64)), 4.0, "4 dimensions"),
        (np.zeros((4, 64, 64)), (4.0, 0.0, 4.0), "positive"),
        (np.zeros((4, 64, 64)), (4.0, -1.0, 4.0), "positive"),
        (np.zeros((4, 64, 64)), (4.0, float("nan"), 4.0), "finite"),
        (np.zeros((4, 64, 64)), (4.0, 4.0), "3 values"),
        (np.zeros((4, 64, 64), bool), 4.0, "dtype"),
    ],
)
def test_bad_volumes_are_refused(data, voxel_size, message):
    with pytest.raises(GeometryError, match=message):
        Volume(data, voxel_size=voxel_size, name="raw")


def test_volume_accepts_lazy_arrays_without_loading_them():
    import dask.array as da

    lazy = da.zeros((200, 2048, 2048), dtype=np.uint16, chunks=(16, 512, 512))
    volume = Volume(lazy, voxel_size=(8.0, 4.0, 4.0), name="big")
    assert volume.data is lazy and volume.shape == (200, 2048, 2048) and volume.dtype == np.uint16
