"""Planning a prediction: where every block, tile and output goes, before anything is computed.

A :class:`PredictionPlan` is the whole layout of one prediction run: the snapped ROI and its output grids,
and the ROI cut into *blocks* (a core that partitions the ROI, grown by a halo of ``overlap`` voxels into an
outer region) with the overlapping *tiles* of each block's outer region. :func:`plan_prediction` makes one
from a model, its features and :class:`PredictionSettings`, refusing a mismatch before any slow work; it is
deterministic, so a dask worker rebuilding it gets exactly the driver's blocks. Running a plan is
:mod:`~napari_dinofuse.inference.predict`'s job.

Alignment. The ROI's y/x start is snapped *down* to the 16-pixel patch grid (the output covers the snapped
ROI: see :func:`snap_roi`). Blocks and tiles start, relative to the ROI start, on :func:`alignment` (the
deepest UNet level's grid in z, the patch grid in y/x), so each tile sits on the feature patch grid and on
every UNet level's grid: a tile's attention maps then land exactly on the ROI's level-k grid. Tiles may have
any size: the model's normalisation statistics are fixed, and each block's tiles share one context window.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING

import numpy as np

from ..defaults import NUM_LEVELS, PREDICT_BLOCK, PREDICT_OVERLAP, PREDICT_TILE, attention_array
from ..errors import InputError
from ..features.backbone import PATCH_SIZE
from ..geometry import Grid
from .tiling import Slices3, aligned_tiles, ints3, iter_blocks, normalize_roi, parse_roi

if TYPE_CHECKING:
    from ..features.extract import FeatureSource
    from ..modeling.unet import UNetConfig

__all__ = ["PredictionPlan", "PredictionSettings", "alignment", "attention_names", "label_dtype",
           "plan_prediction", "smaller_tiles", "snap_roi"]


@dataclass(frozen=True)
class PredictionSettings:
    """How a prediction is cut into tiles and blocks, and where it runs; validated on creation, so every driver
    refuses bad values before any slow work with the same message.

    ``tile_shape``, ``overlap`` and ``block_shape``: 1 or 3 (z, y, x) voxel counts. ``workers``: None runs in
    this process; N >= 1 runs blockwise on a local dask cluster of N processes.
    """

    tile_shape: tuple[int, int, int] = PREDICT_TILE
    overlap: tuple[int, int, int] = PREDICT_OVERLAP
    block_shape: tuple[int, int, int] = PREDICT_BLOCK
    workers: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("tile_shape", 1), ("overlap", 0), ("block_shape", 1)):
            try:
                object.__setattr__(self, name, ints3(getattr(self, name), name, minimum))
            except ValueError as exc:
                raise InputError(f"prediction setting {exc}") from None
        for axis, t, o in zip("zyx", self.tile_shape, self.overlap):
            if o >= t:
                raise InputError(f"prediction settings overlap = {self.overlap}, tile_shape = {self.tile_shape}: the "
                                 f"overlap along {axis} ({o}) must be smaller than the tile ({t}), e.g. a quarter of it")
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise InputError(f"prediction setting workers = {w!r}: expected a whole number >= 1 (leave it out "
                             "to predict in this process)")


@dataclass(frozen=True)
class PredictionPlan:
    """Where everything goes: the snapped ROI, its output grids, and the blocks with their tiles.

    Deterministic for a given model config, volume and settings, so a dask worker rebuilding it computes
    exactly the blocks the driver planned.
    """

    roi: Slices3
    roi_grid: Grid
    num_classes: int
    tile_shape: tuple[int, int, int]
    overlap: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    factors: tuple[tuple[int, int, int], ...]  # attention levels' voxel sizes in raw voxels; () without attention
    blocks: tuple  # (core, outer, tiles) per block, volume voxels
    align: tuple[int, int, int] = (8, PATCH_SIZE, PATCH_SIZE)  # see alignment()
    leading: int = 0  # the first `leading` blocks cover the region asked first (plan_prediction's `first`)

    @property
    def roi_start(self) -> np.ndarray:
        return np.array([s.start for s in self.roi])

    def outputs(self) -> list[tuple[str, tuple, np.dtype, Grid, tuple]]:
        """(name, shape, dtype, grid, chunks) of every output; chunks follow the blocks, so parallel
        block writers never share a chunk."""
        shape = self.roi_grid.shape
        found = [("labels", shape, label_dtype(self.num_classes), self.roi_grid, self.block_shape),
                 ("probabilities", (self.num_classes, *shape), np.dtype(np.float16), self.roi_grid,
                  (1, *self.block_shape)),
                 ("uncertainty", shape, np.dtype(np.float16), self.roi_grid, self.block_shape)]
        for name, f in zip(attention_names(), self.factors):
            found.append((name, tuple(-(-n // k) for n, k in zip(shape, f)), np.dtype(np.float16),
                          self.roi_grid.coarsen(f), tuple(b // k for b, k in zip(self.block_shape, f))))
        return found

    def level_regions(self, index: int, level: int) -> tuple[Slices3, Slices3]:
        """Where block ``index``'s core lies on attention level ``level``'s grid (0-based in ``factors``):
        (region of the level's output array, which is relative to the ROI; the same voxels in the block's
        level accumulator, which starts at the block's outer start). Cores start on every level's grid
        (see :func:`alignment`), so the blocks' regions partition the level's output."""
        core, outer, _ = self.blocks[index]
        f = self.factors[level]
        roi_start = self.roi_start
        rel = [(c.start - r, c.stop - r) for c, r in zip(core, roi_start)]
        out = tuple(slice(a // k, -(-b // k)) for (a, b), k in zip(rel, f))
        shift = [(o.start - r) // k for o, r, k in zip(outer, roi_start, f)]
        return out, tuple(slice(s.start - d, s.stop - d) for s, d in zip(out, shift))


def plan_prediction(model, source: FeatureSource, roi=None, *, tile_shape=PREDICT_TILE, overlap=PREDICT_OVERLAP,
                    block_shape=PREDICT_BLOCK, attention: bool = True, first=None) -> PredictionPlan:
    """Validate the settings against the model and the features, and cut the ROI into blocks and tiles.

    ``first`` (3 slices, volume voxels; e.g. the region in view): blocks stop at its faces (grown onto the
    alignment grid), its blocks come first (``PredictionPlan.leading`` of them) and the others follow nearest
    first, so a viewer can show it long before the whole ROI is done. Ignored when it would cover most of the
    ROI anyway (its extra block faces cost halos for little gain).
    """
    cfg = model.config
    raw_volume = source.raw
    roi = snap_roi(roi, raw_volume.shape)
    align = alignment(cfg)
    settings = PredictionSettings(tile_shape, overlap, block_shape)
    tile_shape, overlap = _round_up(settings.tile_shape, align), settings.overlap
    block_shape = _round_up(settings.block_shape, align)
    for t, o, a, axis in zip(tile_shape, overlap, align, "zyx"):
        if t - o < a:
            raise InputError(f"overlap {o} along {axis} leaves tiles of {t} no step: the overlap must be at most "
                             f"the tile size minus {a}")
    use_context = cfg.fusion != "none"
    if use_context and source.context is None:
        raise InputError(f"this model fuses context (fusion={cfg.fusion!r}) but no context volume was given")
    if source.channels[0] != cfg.raw_channels:
        raise InputError(f"the features have {source.channels[0]} channels but the model expects "
                         f"{cfg.raw_channels}: extract features with the backbone the model was trained on")
    if use_context and source.channels[1] != cfg.context_channels:
        raise InputError(f"the context features have {source.channels[1]} channels but the model expects "
                         f"{cfg.context_channels}")
    if cfg.patch_size != PATCH_SIZE:
        raise InputError(f"the model expects {cfg.patch_size}-pixel patches, the features have {PATCH_SIZE}")
    roi_start = np.array([s.start for s in roi])
    roi_stop = np.array([s.stop for s in roi])
    factors = cfg.level_factors if attention and cfg.fusion == "attention" else ()
    cut, leading = _blocks(raw_volume.shape, block_shape, overlap, roi, first, align)
    blocks = tuple(_plan_block(b, roi_start, raw_volume.shape, tile_shape, overlap, align) for b in cut)
    return PredictionPlan(roi, raw_volume.grid.crop(roi_start, roi_stop), cfg.num_classes, tile_shape, overlap,
                          block_shape, factors, blocks, align, leading)


def _blocks(shape, block_shape, overlap, roi: Slices3, first, align) -> tuple[list, int]:
    """The ROI's blocks, and how many of them (leading the list) cover ``first`` (see :func:`plan_prediction`)."""
    box = None if first is None else _first_box(normalize_roi(first, shape), roi, align)
    if box is None:
        return iter_blocks(shape, block_shape, overlap, roi), 0
    leading = iter_blocks(shape, block_shape, overlap, box)
    rest = [b for part in _box_difference(roi, box) for b in iter_blocks(shape, block_shape, overlap, part)]
    centre = np.array([(s.start + s.stop) / 2 for s in box])
    rest.sort(key=lambda b: float(np.abs(np.array([(c.start + c.stop) / 2 for c in b.core]) - centre).sum()))
    return leading + rest, len(leading)


def _first_box(first: Slices3, roi: Slices3, align) -> Slices3 | None:
    """``first`` clipped to the ROI and grown onto the alignment grid (relative to the ROI start); None if that
    is empty or covers more than half of the ROI."""
    box = []
    for f, r, a in zip(first, roi, align):
        lo, hi = max(f.start, r.start), min(f.stop, r.stop)
        if lo >= hi:
            return None
        box.append(slice(r.start + (lo - r.start) // a * a, min(r.stop, r.start + -(-(hi - r.start) // a) * a)))
    return tuple(box) if 2 * _voxels(box) <= _voxels(roi) else None


def _voxels(region: Slices3) -> int:
    return math.prod(s.stop - s.start for s in region)


def _box_difference(outer: Slices3, inner: Slices3) -> list[Slices3]:
    """Boxes that, with ``inner`` (inside ``outer``), partition ``outer``: the slabs before and after it
    along z, then along y within its z range, then along x within its z and y ranges."""
    parts = []
    for axis in range(3):
        o, i = outer[axis], inner[axis]
        head = tuple(inner[:axis])
        tail = tuple(outer[axis + 1:])
        for lo, hi in ((o.start, i.start), (i.stop, o.stop)):
            if lo < hi:
                parts.append((*head, slice(lo, hi), *tail))
    return parts


def smaller_tiles(plan: PredictionPlan) -> PredictionPlan | None:
    """``plan`` with its tiles halved in y/x (rounded up to the alignment), the overlap shrunk only where the
    tiles would otherwise have no step; None when they cannot shrink. Blocks (cores, outer regions) stay, so
    the outputs and the features already read do not change."""
    tile, overlap = list(plan.tile_shape), list(plan.overlap)
    for axis in (1, 2):
        a = plan.align[axis]
        tile[axis] = -(-(tile[axis] // 2) // a) * a
        overlap[axis] = min(overlap[axis], tile[axis] - a)
    if tile == list(plan.tile_shape):
        return None
    blocks = tuple((core, outer, _tiles(core, outer, tile, overlap, plan.align)) for core, outer, _ in plan.blocks)
    return dataclasses.replace(plan, tile_shape=tuple(tile), overlap=tuple(overlap), blocks=blocks)


def alignment(config: UNetConfig) -> tuple[int, int, int]:
    """Tile/block starts relative to the ROI start: on the deepest UNet level's grid, and y/x on the patch grid."""
    deepest = config.level_factors[-1]
    return deepest[0], math.lcm(PATCH_SIZE, deepest[1]), math.lcm(PATCH_SIZE, deepest[2])


def snap_roi(roi, shape) -> Slices3:
    """Concrete ROI slices with the y/x start moved down onto the 16-pixel patch grid.

    ``roi``: None (whole volume), 3 slices, or a ``"z0:z1,y0:y1,x0:x1"`` string. Features exist per patch,
    so a tile must start on a patch; growing the ROI (rather than shifting it) keeps every asked voxel.
    """
    roi = parse_roi(roi, shape) if isinstance(roi, str) else normalize_roi(roi, shape)
    z, y, x = roi
    return (z, slice(y.start // PATCH_SIZE * PATCH_SIZE, y.stop), slice(x.start // PATCH_SIZE * PATCH_SIZE, x.stop))


def attention_names() -> list[str]:
    return [attention_array(k) for k in range(1, NUM_LEVELS + 1)]


def label_dtype(num_classes: int) -> np.dtype:
    return np.min_scalar_type(num_classes)  # unsigned; uint8 up to 255 classes


def _round_up(values, multiples) -> tuple[int, int, int]:
    return tuple(-(-v // m) * m for v, m in zip(values, multiples))


def _plan_block(block, roi_start, shape, tile_shape, overlap, align):
    """(core, aligned outer region, tiles touching the core) of one block, in volume voxels."""
    outer = []
    for o, r, n, a in zip(block.outer, roi_start, shape, align):
        # Grow onto the grid. Near the volume start (an ROI starting at 0 < z < 8) that can begin before
        # the volume: those slices are edge-padded, so the ROI's first slices keep the context they have.
        outer.append(slice(r + (o.start - r) // a * a, min(n, r + -(-(o.stop - r) // a) * a)))
    return block.core, tuple(outer), _tiles(block.core, outer, tile_shape, overlap, align)


def _tiles(core, outer, tile_shape, overlap, align) -> list[Slices3]:
    """The tiles of ``outer`` (starts on ``align``) that touch ``core``."""
    per_axis = []
    for c, o, t, ov, a in zip(core, outer, tile_shape, overlap, align):
        tiles = [(o.start + lo, o.start + hi) for lo, hi in aligned_tiles(o.stop - o.start, t, ov, a)]
        per_axis.append([slice(lo, hi) for lo, hi in tiles if lo < c.stop and hi > c.start])
    return list(product(*per_axis))
