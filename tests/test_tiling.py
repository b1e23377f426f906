from itertools import product

import numpy as np
import pytest
import torch

from napari_dinofuse.errors import GeometryError
from napari_dinofuse.inference.tiling import (
    BlendAccumulator,
    Block,
    aligned_tiles,
    blending_weights,
    iter_blocks,
    normalize_roi,
    parse_roi,
    roi_to_str,
)

# -- blocks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, block, halo, roi",
    [
        ((7, 20, 13), (3, 8, 5), (1, 4, 2), None),
        ((5, 5, 5), 5, 0, None),
        ((4, 9, 30), (10, 4, 7), 3, None),  # block larger than an axis
        ((12, 16, 16), (4, 6, 5), (2, 2, 2), (slice(2, 11), slice(None, 9), slice(3, None))),
    ],
)
def test_block_cores_partition_the_roi(shape, block, halo, roi):
    blocks = iter_blocks(shape, block, halo, roi)
    count = np.zeros(shape, dtype=int)
    for b in blocks:
        count[b.core] += 1
    expected = np.zeros(shape, dtype=int)
    expected[normalize_roi(roi, shape)] = 1
    np.testing.assert_array_equal(count, expected)


def test_block_halos_are_clipped_to_the_volume_and_inner_locates_the_core():
    shape, halo = (7, 20, 13), (1, 4, 2)
    volume = np.arange(np.prod(shape)).reshape(shape)
    for b in iter_blocks(shape, (3, 8, 5), halo):
        for core, outer, h, n in zip(b.core, b.outer, halo, shape):
            assert outer.start == max(0, core.start - h)
            assert outer.stop == min(n, core.stop + h)
        np.testing.assert_array_equal(volume[b.outer][b.inner], volume[b.core])
        assert b.shape == volume[b.core].shape and b.outer_shape == volume[b.outer].shape


def test_block_halo_reaches_outside_roi_and_order_is_zyx():
    blocks = iter_blocks((10, 10, 10), 4, 2, roi=(slice(4, 8), slice(0, 10), slice(0, 10)))
    assert blocks[0].outer[0] == slice(2, 10)  # context beyond the ROI is real data
    starts = [tuple(s.start for s in b.core) for b in blocks]
    assert starts == sorted(starts)
    assert blocks[1].core[2] == slice(4, 8)  # x varies fastest


@pytest.mark.parametrize("bad", [dict(block_shape=0), dict(block_shape=(2, 2)), dict(halo=-1), dict(block_shape=True)])
def test_iter_blocks_rejects_bad_arguments(bad):
    kwargs = dict(shape=(4, 4, 4), block_shape=2, halo=0) | bad
    with pytest.raises(ValueError):
        iter_blocks(**kwargs)


# -- tiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("length, tile, overlap, align", [(100, 32, 8, 1), (333, 128, 32, 16), (50, 64, 16, 8),
                                                          (64, 64, 16, 8), (129, 32, 8, 16), (37, 8, 2, 4)])
def test_tiles_cover_every_voxel_with_aligned_starts_and_the_requested_overlap(length, tile, overlap, align):
    tiles = aligned_tiles(length, tile, overlap, align)
    covered = np.zeros(length, int)
    for start, stop in tiles:
        assert start % align == 0 and 0 <= start < stop <= length and stop - start <= tile
        covered[start:stop] += 1
    assert covered.min() >= 1 and tiles[0][0] == 0 and tiles[-1][1] == length
    for (_, stop), (start, _) in zip(tiles, tiles[1:]):
        assert stop - start >= min(overlap, stop - start)  # neighbours overlap by at least the request
        assert stop - start >= overlap or stop == length


@pytest.mark.parametrize("length, tile, overlap, align", [(544, 256, 32, 16), (72, 64, 8, 8), (333, 128, 32, 16),
                                                          (100, 32, 8, 1)])
def test_tiles_are_no_larger_than_their_number_needs(length, tile, overlap, align):
    """A block's voxels that two tiles cover are computed twice: tiles shrink to what their number needs."""
    tiles = aligned_tiles(length, tile, overlap, align)
    size = max(stop - start for start, stop in tiles)
    assert len(aligned_tiles(length, size - align, overlap, align)) > len(tiles)
    if (length, tile) == (544, 256):  # three tiles either way; at 256 they would overlap by 112 voxels
        assert len(tiles) == 3 and size == 208


def test_tiles_that_cannot_advance_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        aligned_tiles(100, 16, 8, 16)  # one step of 8 voxels cannot land on a 16-voxel grid


# -- blending ---------------------------------------------------------------------------


def test_blending_weights_positive_symmetric_and_one_in_the_middle():
    w = blending_weights((8, 16, 12), (2, 4, 4))
    assert w.dtype == np.float32 and w.shape == (8, 16, 12)
    assert w.min() > 0 and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])
    assert w[4, 8, 6] == 1.0
    assert w[0, 8, 6] < w[1, 8, 6] < w[2, 8, 6]
    assert np.all(blending_weights((4, 4, 4), 0) == 1)


def _blend(field, tile, overlap):
    acc = BlendAccumulator(field.shape[1:], field.shape[0])
    per_axis = [aligned_tiles(n, t, o) for n, t, o in zip(field.shape[1:], tile, overlap)]
    for t in product(*[[slice(a, b) for a, b in axis] for axis in per_axis]):
        acc.add(t, torch.from_numpy(field[(slice(None), *t)]), blending_weights(tuple(s.stop - s.start for s in t),
                                                                                 overlap))
    return acc.result().numpy()


def test_blending_reconstructs_a_constant_field():
    field = np.full((2, 13, 40, 29), 0.7, dtype=np.float32)
    field[1] = -3.0
    np.testing.assert_allclose(_blend(field, (6, 16, 16), (2, 6, 5)), field, rtol=0, atol=1e-6)


def test_blending_reconstructs_a_smooth_field_when_tiles_agree():
    z, y, x = np.meshgrid(np.arange(9), np.arange(30), np.arange(21), indexing="ij")
    field = (np.sin(z / 3.0 + y / 7.0)[None] * np.cos(x / 5.0)[None]).astype(np.float32)
    np.testing.assert_allclose(_blend(field, (4, 12, 10), (2, 4, 3)), field, rtol=0, atol=1e-6)


def test_blending_averages_disagreeing_tiles_with_their_weights():
    acc = BlendAccumulator((1, 1, 6), 1)
    acc.add((slice(0, 1), slice(0, 1), slice(0, 4)), torch.full((1, 1, 1, 4), 1.0), np.full((1, 1, 4), 3.0, np.float32))
    acc.add((slice(0, 1), slice(0, 1), slice(2, 6)), torch.full((1, 1, 1, 4), 5.0), np.ones((1, 1, 4), np.float32))
    np.testing.assert_allclose(acc.result()[0, 0, 0].numpy(), [1, 1, 2, 2, 5, 5])


def test_accumulator_region_with_origin_clips_tiles_and_leaves_uncovered_voxels_zero():
    acc = BlendAccumulator((2, 4, 4), 2, origin=(10, 10, 10))
    values = torch.arange(1, 2 * 4 * 4 * 4 + 1, dtype=torch.float32).reshape(2, 4, 4, 4)
    ones = np.ones((4, 4, 4), np.float32)
    acc.add((slice(9, 13), slice(8, 12), slice(12, 16)), values, ones)  # partly outside the region
    acc.add((slice(0, 4), slice(0, 4), slice(0, 4)), values, ones)  # entirely outside: ignored
    out = acc.result().numpy()
    np.testing.assert_array_equal(out[:, :, :2, 2:], values.numpy()[:, 1:3, 2:4, 0:2])
    assert (out[:, :, 2:, :] == 0).all() and (out[:, :, :, :2] == 0).all()
    np.testing.assert_array_equal(acc.result((slice(0, 1), slice(0, 2), slice(2, 4))).numpy(), out[:, :1, :2, 2:])


def test_accumulator_rejects_wrong_value_shape():
    acc = BlendAccumulator((4, 4, 4), 3)
    with pytest.raises(ValueError, match="shape"):
        acc.add((slice(0, 2), slice(0, 2), slice(0, 2)), torch.zeros((2, 2, 2, 2)), np.ones((2, 2, 2), np.float32))


# -- ROI strings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0:10,:,5:", (slice(0, 10), slice(0, 20), slice(5, 30))),
        (" 2 : 3 , 0:20 , :30 ", (slice(2, 3), slice(0, 20), slice(0, 30))),
        (":,:,:", (slice(0, 10), slice(0, 20), slice(0, 30))),
    ],
)
def test_parse_roi_accepts_good_strings(text, expected):
    roi = parse_roi(text, (10, 20, 30))
    assert roi == expected
    assert parse_roi(roi_to_str(roi), (10, 20, 30)) == roi


@pytest.mark.parametrize(
    "text, message",
    [
        ("0:10,:", "2 range"),
        ("0:10,:,:,:", "4 range"),
        ("", "1 range"),
        ("0:10,a:b,:", "bad y range"),
        ("-1:5,:,:", "bad z range"),
        ("0:10,5,:", "bad y range"),
        ("0:10,:,0:2:1", "bad x range"),
        ("0:11,:,:", "past the volume"),
        ("5:5,:,:", "empty"),
        ("6:2,:,:", "empty"),
    ],
)
def test_parse_roi_rejects_bad_strings(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_roi(text, (10, 20, 30))
    assert isinstance(info.value, GeometryError)  # drivers show it as one line


def test_roi_to_str_keeps_open_ends():
    assert roi_to_str((slice(0, 10), slice(None), slice(5, None))) == "0:10,:,5:"


def test_block_inner_for_hand_built_block():
    b = Block(core=(slice(4, 8),) * 3, outer=(slice(2, 10),) * 3)
    assert b.inner == (slice(2, 6),) * 3
