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


@pytest.mark.parametrize("roi", [None, (slice(3, 17), slice(20, 71), slice(5, 90))])
def test_blocks_cover_every_attention_level_exactly_once(roi):
    """Each block writes its core's part of every attention level: together the parts partition each level's
    output (a gap would leave zeros in the map, an overlap a seam where the later block wins), and each part
    lies inside the block's own level accumulator."""
    plan = plan_prediction(MODEL, SOURCE, roi, **SMALL)
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
