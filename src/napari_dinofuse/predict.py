"""Sliding-window segmentation of a volume (or an ROI of it) with a :class:`FusedUNet3D`.

:func:`predict` is a generator like extraction: it yields :class:`Progress` between tiles and returns its
sink. Memory is bounded by a few *blocks* (one computed, the next one's features read, the previous one's
results written meanwhile), never by the volume: the ROI is cut into blocks, each grown by a halo of
``overlap`` voxels; inside a block's grown (outer) region overlapping tiles are predicted and their softmax
probabilities blended with a raised-cosine window, and only the block's core goes to the sink.

Alignment. The ROI's y/x start is snapped *down* to the 16-pixel patch grid (the output covers the snapped
ROI: see :func:`snap_roi`). Blocks and tiles start, relative to the ROI start, on :func:`alignment` (the
deepest UNet level's grid in z, the patch grid in y/x), so each tile sits on the feature patch grid and on
every UNet level's grid: a tile's attention maps then land exactly on the ROI's level-k grid. Tiles may have
any size: the model's normalisation statistics are fixed, and each block's tiles share one context window.

Outputs (names in the sink), all over the snapped ROI:

* ``labels`` (Z, Y, X): argmax + 1 (class index i is label value i + 1; 0 stays "unlabelled"), uint8 when
  it fits;
* ``probabilities`` (K, Z, Y, X) float16, blended softmax;
* ``uncertainty`` (Z, Y, X) float16: entropy / log K, 0 = certain, 1 = uniform;
* ``attention/level1..4`` float16, for "attention"-fusion models: the channel-mean gate of each encoder
  level at its own resolution, on the grid ``roi_grid.coarsen(config.level_factors[k - 1])``.

Sinks (where the outputs go) live in :mod:`~napari_dinofuse.outputs`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import numpy as np
import torch

from .backbone import PATCH_SIZE, resolve_device
from .defaults import (
    NUM_LEVELS,
    PREDICT_BLOCK,
    PREDICT_OVERLAP,
    PREDICT_TILE,
    PREDICTION_LABELS,
    attention_array,
)
from .errors import InputError, MemoryRetryWarning
from .features import BlockFeatures, FeatureSource
from .geometry import Grid
from .modeling.unet import UNetConfig
from .outputs import MemorySink
from .progress import Progress, drive, within
from .tiling import (
    BlendAccumulator,
    aligned_tiles,
    blending_weights,
    ints3,
    iter_blocks,
    normalize_roi,
    parse_roi,
    roi_to_str,
)

__all__ = ["PredictionPlan", "PredictionSettings", "attention_names", "plan_prediction", "predict",
           "predict_block", "predict_to_memory", "read_block", "snap_roi"]

_Slices = tuple[slice, slice, slice]


def alignment(config: UNetConfig) -> tuple[int, int, int]:
    """Tile/block starts relative to the ROI start: on the deepest UNet level's grid, and y/x on the patch grid."""
    deepest = config.level_factors[-1]
    return deepest[0], math.lcm(PATCH_SIZE, deepest[1]), math.lcm(PATCH_SIZE, deepest[2])


def attention_names() -> list[str]:
    return [attention_array(k) for k in range(1, NUM_LEVELS + 1)]


def snap_roi(roi, shape) -> _Slices:
    """Concrete ROI slices with the y/x start moved down onto the 16-pixel patch grid.

    ``roi``: None (whole volume), 3 slices, or a ``"z0:z1,y0:y1,x0:x1"`` string. Features exist per patch,
    so a tile must start on a patch; growing the ROI (rather than shifting it) keeps every asked voxel.
    """
    roi = parse_roi(roi, shape) if isinstance(roi, str) else normalize_roi(roi, shape)
    z, y, x = roi
    return (z, slice(y.start // PATCH_SIZE * PATCH_SIZE, y.stop), slice(x.start // PATCH_SIZE * PATCH_SIZE, x.stop))


def _round_up(values, multiples) -> tuple[int, int, int]:
    return tuple(-(-v // m) * m for v, m in zip(values, multiples))


def _label_dtype(num_classes: int) -> np.dtype:
    return np.min_scalar_type(num_classes)  # unsigned; uint8 up to 255 classes


# -- prediction -------------------------------------------------------------------------------------


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

    roi: _Slices
    roi_grid: Grid
    num_classes: int
    tile_shape: tuple[int, int, int]
    overlap: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    factors: tuple[tuple[int, int, int], ...]  # attention levels' voxel sizes in raw voxels; () without attention
    blocks: tuple  # (core, outer, tiles) per block, volume voxels
    align: tuple[int, int, int] = (8, PATCH_SIZE, PATCH_SIZE)  # see alignment()

    @property
    def roi_start(self) -> np.ndarray:
        return np.array([s.start for s in self.roi])

    def outputs(self) -> list[tuple[str, tuple, np.dtype, Grid, tuple]]:
        """(name, shape, dtype, grid, chunks) of every output; chunks follow the blocks, so parallel
        block writers never share a chunk."""
        shape = self.roi_grid.shape
        found = [("labels", shape, _label_dtype(self.num_classes), self.roi_grid, self.block_shape),
                 ("probabilities", (self.num_classes, *shape), np.dtype(np.float16), self.roi_grid,
                  (1, *self.block_shape)),
                 ("uncertainty", shape, np.dtype(np.float16), self.roi_grid, self.block_shape)]
        for name, f in zip(attention_names(), self.factors):
            found.append((name, tuple(-(-n // k) for n, k in zip(shape, f)), np.dtype(np.float16),
                          self.roi_grid.coarsen(f), tuple(b // k for b, k in zip(self.block_shape, f))))
        return found

    def level_regions(self, index: int, level: int) -> tuple[_Slices, _Slices]:
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
                    block_shape=PREDICT_BLOCK, attention: bool = True) -> PredictionPlan:
    """Validate the settings against the model and the features, and cut the ROI into blocks and tiles."""
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
    blocks = tuple(_plan_block(b, roi_start, raw_volume.shape, tile_shape, overlap, align)
                   for b in iter_blocks(raw_volume.shape, block_shape, overlap, roi))
    return PredictionPlan(roi, raw_volume.grid.crop(roi_start, roi_stop), cfg.num_classes, tile_shape, overlap,
                          block_shape, factors, blocks, align)


def read_block(model, source: FeatureSource, plan: PredictionPlan, index: int, dev: torch.device) -> BlockFeatures:
    """What block ``index``'s tiles read: its features and one context window around it, on ``dev``."""
    cfg = model.config
    return source.block(plan.blocks[index][1], dev, context=cfg.fusion != "none", intensity=cfg.intensity_stem,
                        margin_nm=cfg.context_margin_nm, halo=model.intensity_halo)


def predict_block(model, source: FeatureSource, plan: PredictionPlan, index: int, dev: torch.device,
                  features: BlockFeatures | None = None
                  ) -> Generator[Progress, None, list[tuple[str, _Slices, np.ndarray]]]:
    """Compute block ``index`` of ``plan`` (the model already in eval mode on ``dev``).

    ``features``: the block's :func:`read_block` if already read (None: read here). Yields progress after each
    tile; returns ``(name, region relative to the ROI, array)`` for every output.
    """
    core, outer, tiles = plan.blocks[index]
    overlap, roi_start = plan.overlap, plan.roi_start
    with_attention = bool(plan.factors)
    outer_start = np.array([s.start for s in outer])  # z may be < 0: see _plan_block
    outer_shape = [s.stop - s.start for s in outer]
    real_start = np.maximum(outer_start, 0)  # voxels before the volume are never kept
    # Blending happens on the device: a tile's probabilities never leave it, only the block's result does.
    probs_acc = BlendAccumulator([s.stop - a for s, a in zip(outer, real_start)], plan.num_classes, dev,
                             origin=real_start)
    # Level-k coordinates relative to the outer start (both lie on the level grid).
    att_accs = [BlendAccumulator([-(-n // k) for n, k in zip(outer_shape, f)], 1, dev) for f in plan.factors]
    # The block's features are read once and kept on the device; tiles are sliced from them.
    features = features if features is not None else read_block(model, source, plan, index, dev)
    for i, tile in enumerate(tiles):
        probs, maps = _run_tile(model, features, tile, with_attention)
        probs_acc.add(tile, probs, _window(tuple(probs.shape[1:]), overlap))
        for acc, f, att in zip(att_accs, plan.factors, maps):
            lo = [(t.start - o) // k for t, o, k in zip(tile, outer_start, f)]
            acc.add(tuple(slice(a, a + n) for a, n in zip(lo, att.shape[1:])), att,
                    _window(tuple(att.shape[1:]), tuple(o // k for o, k in zip(overlap, f))))
        yield Progress(i + 1, len(tiles), "tiles")

    inner = tuple(slice(c.start - o, c.stop - o) for c, o in zip(core, real_start))
    region = tuple(slice(c.start - r, c.stop - r) for c, r in zip(core, roi_start))
    # The block's outputs are computed where it was blended; only fp16 / integer results are copied back.
    probs = probs_acc.result(inner)
    probs16 = probs.half()
    # Argmax of the stored fp16 values (first maximum, like numpy), so labels agree with the saved probabilities.
    probs16_host = _host(probs16)
    if probs16.device.type == "cpu":  # torch's argmax over dim 0 is ~4x slower than numpy's on a CPU
        labels = np.argmax(probs16_host, axis=0) + 1
    else:
        labels = _host((torch.argmax(probs16, dim=0) + 1).to(torch.int32))
    results = [("labels", region, labels.astype(_label_dtype(plan.num_classes))),
               ("probabilities", region, probs16_host),
               ("uncertainty", region, _host(_normalised_entropy(probs).half()))]
    for level, (name, acc) in enumerate(zip(attention_names(), att_accs)):
        out, sub = plan.level_regions(index, level)
        results.append((name, out, _host(acc.result(sub)[0].half())))
    return results


@lru_cache(maxsize=32)
def _window(shape, overlap) -> np.ndarray:
    return blending_weights(shape, overlap)


def predict(model, source: FeatureSource, roi=None, *, tile_shape=PREDICT_TILE, overlap=PREDICT_OVERLAP,
            block_shape=PREDICT_BLOCK, attention: bool = True, device="auto", sink=None, class_names=None
            ) -> Generator[Progress, None, object]:
    """Segment ``roi`` of ``source.raw`` (None: all of it) with ``model``; returns the finished ``sink``.

    The output covers :func:`snap_roi` of ``roi`` (y/x start moved down to a multiple of 16), on the grid
    ``source.raw.grid.crop(start, stop)`` of that snapped ROI. ``tile_shape`` and ``block_shape`` are
    rounded up to multiples of (8, 16, 16); ``overlap`` is both the tiles' overlap and the blocks' halo.
    Closing the generator stops at a tile boundary and aborts the sink (nothing is marked complete).
    Host work overlaps the device: block i+1's features are read while block i's tiles run, and block i-1's
    results are written meanwhile. If the device runs out of memory, the block is retried once with tiles
    halved in y/x (see :func:`_smaller_tiles`), kept for the rest of the run; a second time raises.
    ``model`` is moved to ``device`` and left there; its train/eval mode is restored. ``class_names`` (of label
    values 1..K) are stored with the output, so a saved prediction opens with its classes named.
    """
    plan = plan_prediction(model, source, roi, tile_shape=tile_shape, overlap=overlap, block_shape=block_shape,
                           attention=attention)
    named = class_names_info(class_names, plan.num_classes)
    dev = resolve_device(device)
    sink = sink if sink is not None else MemorySink()
    total = sum(len(tiles) for _, _, tiles in plan.blocks)
    was_training = model.training
    done, shrunk, count = 0, False, len(plan.blocks)
    try:
        yield Progress(0, total, f"predicting {total} tile(s) over {roi_to_str(plan.roi)}")
        model.eval().to(dev)
        for name, shape, dtype, grid, chunks in plan.outputs():
            sink.create(name, shape, dtype, grid, chunks)
        sink.set_info(roi=roi_to_str(plan.roi), num_classes=plan.num_classes, labels=PREDICTION_LABELS,
                      **named)
        # One thread each: reads stay one block ahead and writes at most one block behind (memory stays bounded
        # by a few blocks), and the sink gets its writes in block order. Leaving the `with` (an error, a cancel)
        # waits for both threads, so the sink is aborted only once nothing writes to it any more.
        with ThreadPoolExecutor(1, "dinofuse-read") as reader, ThreadPoolExecutor(1, "dinofuse-write") as writer:
            ahead, written = reader.submit(read_block, model, source, plan, 0, dev), None
            for index in range(count):
                features = ahead.result()  # a failed read surfaces here
                if index + 1 < count:
                    ahead = reader.submit(read_block, model, source, plan, index + 1, dev)
                results, used = yield from predict_block_retrying(model, source, plan, index, dev, features,
                                                                  shrunk, done, f"block {index + 1}/{count}")
                plan, shrunk = used, shrunk or used is not plan
                done += len(plan.blocks[index][2])
                if written is not None:
                    written.result()  # a failed write surfaces here
                written = writer.submit(_write, sink, results)
            written.result()
        sink.finish()
    except BaseException:  # GeneratorExit (cancel) included: never leave a half-written output looking done
        sink.abort()
        raise
    finally:
        model.train(was_training)
    return sink


def class_names_info(class_names, num_classes: int) -> dict:
    """The prediction store's ``class_names`` entry (names of label values 1..K, so a saved prediction opens
    with them); {} for None."""
    if class_names is None:
        return {}
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model of {num_classes} classes")
    return {"class_names": names}


def predict_to_memory(model, source: FeatureSource, roi=None, **kwargs) -> MemorySink:
    """:func:`predict` run to the end into a :class:`MemorySink`."""
    return drive(predict(model, source, roi, sink=MemorySink(), **kwargs))


def _write(sink, results) -> None:
    for name, region, array in results:
        sink.write(name, region, array)


def _plan_block(block, roi_start, shape, tile_shape, overlap, align):
    """(core, aligned outer region, tiles touching the core) of one block, in volume voxels."""
    outer = []
    for o, r, n, a in zip(block.outer, roi_start, shape, align):
        # Grow onto the grid. Near the volume start (an ROI starting at 0 < z < 8) that can begin before
        # the volume: those slices are edge-padded, so the ROI's first slices keep the context they have.
        outer.append(slice(r + (o.start - r) // a * a, min(n, r + -(-(o.stop - r) // a) * a)))
    return block.core, tuple(outer), _tiles(block.core, outer, tile_shape, overlap, align)


def _tiles(core, outer, tile_shape, overlap, align) -> list[_Slices]:
    """The tiles of ``outer`` (starts on ``align``) that touch ``core``."""
    per_axis = []
    for c, o, t, ov, a in zip(core, outer, tile_shape, overlap, align):
        tiles = [(o.start + lo, o.start + hi) for lo, hi in aligned_tiles(o.stop - o.start, t, ov, a)]
        per_axis.append([slice(lo, hi) for lo, hi in tiles if lo < c.stop and hi > c.start])
    return list(product(*per_axis))


def predict_block_retrying(model, source: FeatureSource, plan: PredictionPlan, index: int, dev: torch.device,
                           features: BlockFeatures | None = None, shrunk: bool = False, done: int = 0,
                           message: str = "") -> Generator[Progress, None, tuple[list, PredictionPlan]]:
    """:func:`predict_block`, and if ``dev`` runs out of memory (and the plan has not ``shrunk`` already), once more
    with tiles halved in y/x (:func:`_smaller_tiles`), with a warning. Yields progress as ``done`` + tiles of
    the rest of the run (``plan``'s blocks from ``index`` on, recounted after a retry); returns (the block's
    results, the plan that computed them: the caller keeps the smaller tiles for its next blocks)."""
    while True:
        total = done + sum(len(tiles) for _, _, tiles in plan.blocks[index:])
        try:
            return (yield from within(predict_block(model, source, plan, index, dev, features), done, total,
                                      message)), plan
        except torch.OutOfMemoryError:
            smaller = None if shrunk else _smaller_tiles(plan)
            if smaller is None:
                raise
        # Out of the except clause, so the failed tiles' tensors (held by its traceback) are freed.
        warnings.warn(f"out of {dev.type} memory with tiles of {plan.tile_shape}: continuing with tiles of "
                      f"{smaller.tile_shape}, overlap {smaller.overlap} (set smaller tiles to avoid the retry)",
                      MemoryRetryWarning, stacklevel=2)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        plan, shrunk = smaller, True


def _smaller_tiles(plan: PredictionPlan) -> PredictionPlan | None:
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


def _host(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy()


def _run_tile(model, features: BlockFeatures, tile: _Slices, with_attention: bool):
    """Softmax (K, z, y, x) and channel-mean attention maps [(1, ceil(z/f), ...)] of one tile, float32
    tensors on the block's device."""
    size = tuple(s.stop - s.start for s in tile)
    dev = features.device
    # Run at whole patches: trilinear upsampling of gy patches onto exactly 16*gy pixels puts each patch
    # feature on its own pixels; a clipped size would stretch the features. Crop the result instead.
    gy, gx = (-(-n // PATCH_SIZE) for n in size[1:])
    full = (size[0], gy * PATCH_SIZE, gx * PATCH_SIZE)
    inputs = features.tile(tile, full_yx=full[1:])  # z before the volume: edge-padded
    with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                                enabled=dev.type == "cuda"):
        out = model(inputs.raw, inputs.context, out_shape=full, intensity=inputs.intensity)
        logits = out.logits[0, :, :size[0], :size[1], :size[2]].float()
        probs = torch.softmax(logits, dim=0)
        maps = []
        if with_attention:
            for att, f in zip(out.attention, model.config.level_factors):
                z, y, x = (-(-n // k) for n, k in zip(size, f))
                maps.append(att[0, :, :z, :y, :x].float().mean(0, keepdim=True))
    return probs, maps


def _normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over axis 0 divided by log K: 0 for a sure voxel, 1 for a uniform one."""
    entropy = -(probs * probs.clamp(1e-12, 1.0).log()).sum(dim=0) / math.log(probs.shape[0])
    return entropy.clamp_(0.0, 1.0)
