"""Planning a prediction: blocks, tiles and output regions (no model is run, no features are computed)."""

from types import SimpleNamespace

import numpy as np
import pytest

from napari_dinofuse.geometry import Volume
from napari_dinofuse.inference.plan import plan_prediction, smaller_tiles
from napari_dinofuse.modeling.unet import UNetConfig

SHAPE = (20, 80, 96)
SMALL = {"tile_shape": (16, 48, 48), "overlap": (8, 32, 32), "block_shape": (16, 512, 64)}
# A plan reads only the model's config, the volumes' geometry and the features' channel counts.
MODEL = SimpleNamespace(config=UNetConfig(raw_channels=64, context_channels=64, num_classes=3, base_channels=4,
                                          fusion="attention", intensity_stem=False))
SOURCE = SimpleNamespace(raw=Volume(np.zeros(SHAPE, np.uint8), 4.0, (100.0, -40.0, 12.0), name="raw"),
                         context=Volume(np.zeros((4, 10, 10), np.uint8), 64.0, (64.0, -96.0, -64.0), name="context"),
                         channels=(64, 64))


@pytest.mark.parametrize("roi, first", [(None, None), ((slice(3, 17), slice(20, 71), slice(5, 90)), None),
                                       (None, (slice(9, 12), slice(33, 40), slice(50, 60)))])
def test_blocks_cover_every_attention_level_exactly_once(roi, first):
    """Each block writes its core's part of every attention level: together the parts partition each level's
    output (a gap would leave zeros in the map, an overlap a seam where the later block wins), and each part
    lies inside the block's own level accumulator; also when a region asked first cuts the blocks."""
    plan = plan_prediction(MODEL, SOURCE, roi, first=first, **SMALL)
    assert len(plan.blocks) > 1 and plan.factors
    outputs = {name: shape for name, shape, *_ in plan.outputs()}
    for level, factors in enumerate(plan.factors):
        covered = np.zeros(outputs[f"attention/level{level + 1}"], int)
        for index, (_, outer, _) in enumerate(plan.blocks):
            out, local = plan.level_regions(index, level)
            covered[out] += 1
            accumulator = [-(-(s.stop - s.start) // k) for s, k in zip(outer, factors)]
            assert all(0 <= s.start < s.stop <= n for s, n in zip(local, accumulator)), (index, local)
            assert [s.stop - s.start for s in out] == [s.stop - s.start for s in local]
        assert (covered == 1).all(), (level, np.unique(covered))


def test_smaller_tiles_keep_the_blocks_and_leave_a_step():
    plan = plan_prediction(MODEL, SOURCE, None, tile_shape=(16, 64, 64), overlap=(8, 48, 48), block_shape=(16, 512, 64))
    smaller = smaller_tiles(plan)
    assert smaller.tile_shape == (16, 32, 32) and smaller.overlap == (8, 16, 16)  # 48 would leave no step
    assert [b[:2] for b in smaller.blocks] == [b[:2] for b in plan.blocks]  # cores and outer regions
    for _, outer, tiles in smaller.blocks:
        assert all(o.start <= s.start and s.stop <= o.stop and s.stop - s.start <= t
                   for tile in tiles for s, o, t in zip(tile, outer, smaller.tile_shape))
    assert smaller_tiles(smaller_tiles(smaller)) is None  # 16: the patch size


def _centre(region):
    return np.array([(s.start + s.stop) / 2 for s in region])


def test_the_region_asked_first_is_planned_first_then_nearest_first():
    """The view's blocks lead (so the viewer can show it early), they cover the asked region and no more than
    its alignment needs, every voxel of the ROI is still in exactly one core, and the rest follows nearest
    first (a user looking there sees the neighbourhood fill in next)."""
    shape = (64, 128, 128)
    source = SimpleNamespace(raw=Volume(np.zeros(shape, np.uint8), 4.0, (0.0, 0.0, 0.0), name="raw"),
                             context=SOURCE.context, channels=(64, 64))
    first = (slice(21, 30), slice(40, 70), slice(0, 128))
    plan = plan_prediction(MODEL, source, None, first=first, tile_shape=(16, 48, 48), overlap=(8, 32, 32),
                           block_shape=(16, 64, 64))
    assert plan.leading >= 1
    align = plan.align
    covered = np.zeros(shape, int)
    for core, _, _ in plan.blocks:
        covered[core] += 1
        assert all(c.start % a == 0 for c, a in zip(core, align)), core  # on every level's grid
    assert (covered == 1).all()
    lead = np.zeros(shape, bool)
    for core, _, _ in plan.blocks[:plan.leading]:
        lead[core] = True
    assert lead[first].all()
    expected = (slice(16, 32), slice(32, 80), slice(0, 128))  # the asked region grown onto the alignment grid
    assert lead.sum() == lead[expected].size and lead[expected].all()
    centre = _centre(expected)
    distances = [np.abs(_centre(core) - centre).sum() for core, _, _ in plan.blocks[plan.leading:]]
    assert distances == sorted(distances)


def test_a_region_asked_first_that_covers_most_of_the_roi_changes_nothing():
    """Its extra block faces would cost halos for little gain: the plan is the one without it."""
    plain = plan_prediction(MODEL, SOURCE, None, **SMALL)
    most = plan_prediction(MODEL, SOURCE, None, first=(slice(0, 20), slice(0, 60), slice(0, 96)), **SMALL)
    assert most.leading == 0 and most.blocks == plain.blocks
