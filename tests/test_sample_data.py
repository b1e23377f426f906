"""The synthetic EM sample: one world at two resolutions, with a class pair that needs the context."""

from functools import cache

import numpy as np
import pytest
from scipy import ndimage

from napari_dinofuse.errors import GeometryError
from napari_dinofuse.geometry import Grid
from napari_dinofuse.synthetic.sample import CLASS_NAMES, CONTEXT_DEPENDENT_CLASSES, make_sample

MITO, GRANULE = CONTEXT_DEPENDENT_CLASSES
SEEDS = (0, 1, 2)


@cache
def sample(seed: int):
    """Default-size sample, rendered once per seed (~2 s each)."""
    return make_sample(seed)


@pytest.fixture(scope="module")
def rerendered():
    """Seed 0 rendered afresh (not from the cache)."""
    return make_sample(0)


def _block_mean(data: np.ndarray, k: int = 16) -> np.ndarray:
    z, y, x = (n // k for n in data.shape)
    return data[: z * k, : y * k, : x * k].astype(np.float64).reshape(z, k, y, k, x, k).mean(axis=(1, 3, 5))


def _sides(gt: np.ndarray):
    """The raw split by the membrane class: (voxels on the granules' side, on the mitochondria's side)."""
    parts, _ = ndimage.label(gt != 2)
    nucleus = np.isin(parts, np.unique(parts[gt == GRANULE]))
    cytoplasm = np.isin(parts, np.unique(parts[gt == MITO]))
    return nucleus, cytoplasm


def test_raw_and_context_sit_on_the_promised_grids():
    s = sample(0)
    assert s.raw.name == "raw" and s.context.name == "context"
    assert s.raw.shape == (32, 256, 256) and s.raw.dtype == np.uint8
    assert s.raw.voxel_size == (4.0, 4.0, 4.0)
    assert s.context.voxel_size == (64.0, 64.0, 64.0) and s.context.dtype == np.uint8
    assert s.ground_truth.shape == s.raw.shape and s.ground_truth.dtype == np.uint8
    assert s.class_names == CLASS_NAMES

    # Overlaid in napari (scale/translate), the raw lies inside the context, centred, 16x narrower in y/x.
    assert s.context.grid.covers(s.raw.grid)
    s.context.require_covers(s.raw)
    raw_lo, raw_hi = s.raw.grid.bounds
    ctx_lo, ctx_hi = s.context.grid.bounds
    np.testing.assert_allclose((ctx_hi - ctx_lo)[1:] / (raw_hi - raw_lo)[1:], 16.0, rtol=0.02)
    np.testing.assert_allclose((ctx_lo + ctx_hi) / 2, (raw_lo + raw_hi) / 2, atol=32.0)
    assert ctx_lo[0] <= raw_lo[0] - 64.0 and ctx_hi[0] >= raw_hi[0] + 64.0  # z covered with margin


def test_same_seed_gives_the_same_sample(rerendered):
    fresh = rerendered
    cached = sample(0)
    np.testing.assert_array_equal(fresh.raw.data, cached.raw.data)
    np.testing.assert_array_equal(fresh.context.data, cached.context.data)
    np.testing.assert_array_equal(fresh.ground_truth, cached.ground_truth)
    assert fresh.raw.grid == cached.raw.grid and fresh.context.grid == cached.context.grid


def test_other_seed_gives_another_world():
    a, b = sample(0), sample(1)
    assert np.mean(a.ground_truth != b.ground_truth) > 0.02  # organelles elsewhere, not just new noise
    assert np.mean(a.context.data != b.context.data) > 0.5


def test_ground_truth_labels_every_voxel_with_a_named_class():
    assert CLASS_NAMES[1:] == ("background", "membrane", "mitochondrion", "nuclear granule")
    assert CONTEXT_DEPENDENT_CLASSES == (3, 4)
    gt = sample(0).ground_truth
    assert set(np.unique(gt).tolist()) == {1, 2, 3, 4}  # 0 (unpainted) never appears


@pytest.mark.parametrize("seed", SEEDS)
def test_raw_straddles_the_envelope_so_both_context_classes_appear(seed):
    gt = sample(seed).ground_truth
    counts = np.bincount(gt.ravel(), minlength=5)
    assert counts[MITO] > 2000 and counts[GRANULE] > 2000
    # The envelope cuts the raw in two: granules on one side only, mitochondria on the other only.
    nucleus, cytoplasm = _sides(gt)
    assert not np.any(nucleus & cytoplasm)
    assert nucleus.mean() > 0.15 and cytoplasm.mean() > 0.15


def test_both_context_classes_appear_for_many_seeds_and_smaller_fields():
    for seed in range(3, 9):
        s = make_sample(seed, raw_shape=(4, 128, 128))
        counts = np.bincount(s.ground_truth.ravel(), minlength=5)
        assert np.all(counts[1:] > 100), (seed, counts)
        assert s.context.grid.covers(s.raw.grid)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_context_is_the_block_average_of_the_same_world(seed):
    s = sample(seed)
    blocks = _block_mean(s.raw.data)  # 16^3 raw voxels = one 64 nm context voxel
    coarse = s.raw.grid.coarsen(16)
    ctx = s.context.resample_onto(coarse)
    r = np.corrcoef(blocks.ravel(), ctx.ravel())[0, 1]
    assert r > 0.9
    assert abs(float(np.mean(ctx - blocks))) < 4.0  # same brightness, not just correlated
    # Alignment matters: one context voxel off in world coordinates and the match is gone.
    shifted = Grid(coarse.shape, coarse.voxel_size, (coarse.offset[0], coarse.offset[1], coarse.offset[2] + 64.0))
    r_shifted = np.corrcoef(blocks.ravel(), s.context.resample_onto(shifted).ravel())[0, 1]
    assert r_shifted < r - 0.2


def test_thin_membranes_darken_the_context_instead_of_aliasing_away():
    s = sample(0)
    gt = s.ground_truth
    blocks = gt.reshape(2, 16, 16, 16, 16, 16).transpose(0, 2, 4, 1, 3, 5).reshape(2, 16, 16, -1)
    membrane = (blocks == 2).mean(-1)
    organelle = np.isin(blocks, CONTEXT_DEPENDENT_CLASSES).any(-1)
    ctx = s.context.resample_onto(s.raw.grid.coarsen(16))
    envelope = (membrane > 0.05) & ~organelle  # context voxels the ~30 nm envelope passes through
    plain = (membrane == 0) & ~organelle
    assert envelope.sum() >= 10
    assert ctx[plain].mean() - ctx[envelope].mean() > 10.0


def test_mitochondria_and_granules_look_alike_up_close():
    mean = {MITO: [], GRANULE: []}
    pooled = {MITO: [0.0, 0], GRANULE: [0.0, 0]}
    for seed in SEEDS:
        s = sample(seed)
        raw, gt = s.raw.data.astype(np.float64), s.ground_truth
        for k in (MITO, GRANULE):
            values = raw[gt == k]
            mean[k].append(values.mean())
            pooled[k][0] += values.sum()
            pooled[k][1] += values.size
        # Far from the envelope, nucleoplasm and cytoplasm share grey level: only position tells them apart.
        nucleus, cytoplasm = _sides(gt)
        far = ndimage.distance_transform_edt(gt != 2, sampling=4.0) > 250.0
        background = (gt == 1) & far
        assert abs(raw[background & nucleus].mean() - raw[background & cytoplasm].mean()) < 4.0
        assert raw[background].mean() - raw[np.isin(gt, (MITO, GRANULE))].mean() > 50.0  # dark organelles
    for m, g in zip(mean[MITO], mean[GRANULE]):
        assert abs(m - g) < 6.0
    assert abs(pooled[MITO][0] / pooled[MITO][1] - pooled[GRANULE][0] / pooled[GRANULE][1]) < 3.0


def test_scribbles_are_sparse_correct_strokes_of_every_class():
    s = sample(0)
    gt = s.ground_truth
    painted = s.scribbles()
    assert painted.shape == gt.shape and painted.dtype == np.uint8
    on = painted > 0
    assert 0.001 < on.mean() < 0.01
    np.testing.assert_array_equal(painted[on], gt[on])  # never a wrong class
    for k in np.unique(gt):
        voxels = painted == k
        assert voxels.sum() >= 300, k
        planes = np.unique(np.nonzero(voxels)[0])
        assert len(planes) <= 3  # strokes in a few sections, as a user paints
        # Strokes, not scattered dots: a few connected pieces per plane.
        assert max(ndimage.label(voxels[z])[1] for z in planes) <= 12
    np.testing.assert_array_equal(painted, s.scribbles())
    assert not np.array_equal(painted, s.scribbles(seed=1))
    assert (s.scribbles(fraction=0.006) > 0).sum() > 2 * on.sum()


def test_corrections_are_strokes_of_the_true_class_where_the_prediction_is_wrong():
    s = sample(0)
    gt = s.ground_truth
    prediction = gt.copy()
    prediction[:, :, : gt.shape[2] // 2] = 1  # everything in the left half called background
    fixes = s.corrections(prediction)
    on = fixes > 0
    assert on.any()
    np.testing.assert_array_equal(fixes[on], gt[on])  # the true class
    assert np.all(prediction[on] != gt[on])  # only where the prediction is wrong
    assert not np.any(fixes == 1)  # background was never mistaken: nothing to correct
    assert set(np.unique(fixes[on])) == set(np.unique(gt[prediction != gt]))
    assert not s.corrections(gt).any()  # a right prediction needs no correction


def test_impossible_layouts_are_refused_with_a_clear_error():
    with pytest.raises(GeometryError, match="does not cover"):
        make_sample(0, context_shape=(1, 20, 20))
    with pytest.raises(GeometryError, match="at least"):
        make_sample(0, raw_shape=(8, 64, 64))
