"""Sliding-window segmentation of a volume (or an ROI of it) with a :class:`FusedUNet3D`: running a plan.

:func:`predict` is a generator like extraction: it yields :class:`Progress` between tiles and returns its
sink. Memory is bounded by a few *blocks* (one computed, the next one's features read, the previous one's
results written meanwhile), never by the volume: the ROI is cut into blocks, each grown by a halo of
``overlap`` voxels; inside a block's grown (outer) region overlapping tiles are predicted and their softmax
probabilities blended with a raised-cosine window, and only the block's core goes to the sink.

Where the blocks and tiles go (and how they are aligned to the patch grid and the UNet's levels) is decided
beforehand by :func:`~napari_dinofuse.inference.plan.plan_prediction`; this module only carries a
:class:`~napari_dinofuse.inference.plan.PredictionPlan` out.

Outputs (names in the sink), all over the snapped ROI:

* ``labels`` (Z, Y, X): argmax + 1 (class index i is label value i + 1; 0 stays "unlabelled"), uint8 when
  it fits;
* ``probabilities`` (K, Z, Y, X) float16, blended softmax;
* ``uncertainty`` (Z, Y, X) float16: entropy / log K, 0 = certain, 1 = uniform;
* ``attention/level1..4`` float16, for "attention"-fusion models: the channel-mean gate of each encoder
  level at its own resolution, on the grid ``roi_grid.coarsen(config.level_factors[k - 1])``.

Sinks (where the outputs go) live in :mod:`~napari_dinofuse.inference.outputs`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from ..defaults import PREDICT_BLOCK, PREDICT_OVERLAP, PREDICT_TILE, PREDICTION_LABELS
from ..errors import MemoryRetryWarning
from ..features.backbone import PATCH_SIZE, resolve_device
from ..features.extract import BlockFeatures, FeatureSource
from ..modeling.unet import place
from ..precision import autocast
from ..progress import Progress, drive, within
from .outputs import MemorySink
from .plan import PredictionPlan, attention_names, label_dtype, plan_prediction, smaller_tiles
from .tiling import BlendAccumulator, Slices3, blending_weights, roi_to_str

__all__ = ["class_names_info", "predict", "predict_block", "predict_block_retrying", "predict_to_memory", "read_block"]


def read_block(model, source: FeatureSource, plan: PredictionPlan, index: int, dev: torch.device) -> BlockFeatures:
    """What block ``index``'s tiles read: its features and one context window around it, on ``dev``."""
    cfg = model.config
    return source.block(plan.blocks[index][1], dev, context=cfg.fusion != "none", intensity=cfg.intensity_stem,
                        margin_nm=cfg.context_margin_nm, halo=model.intensity_halo)


def predict_block(model, source: FeatureSource, plan: PredictionPlan, index: int, dev: torch.device,
                  features: BlockFeatures | None = None
                  ) -> Generator[Progress, None, list[tuple[str, Slices3, np.ndarray]]]:
    """Compute block ``index`` of ``plan`` (the model already in eval mode on ``dev``).

    ``features``: the block's :func:`read_block` if already read (None: read here). Yields progress after each
    tile; returns ``(name, region relative to the ROI, array)`` for every output.
    """
    core, outer, tiles = plan.blocks[index]
    overlap, roi_start = plan.overlap, plan.roi_start
    with_attention = bool(plan.factors)
    outer_start = np.array([s.start for s in outer])  # z may be < 0: see plan._plan_block
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
    results = [("labels", region, labels.astype(label_dtype(plan.num_classes))),
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
            block_shape=PREDICT_BLOCK, attention: bool = True, device="auto", sink=None, class_names=None,
            first=None) -> Generator[Progress, None, object]:
    """Segment ``roi`` of ``source.raw`` (None: all of it) with ``model``; returns the finished ``sink``.

    The output covers :func:`~napari_dinofuse.inference.plan.snap_roi` of ``roi`` (y/x start moved down to a
    multiple of 16), on the grid ``source.raw.grid.crop(start, stop)`` of that snapped ROI. ``tile_shape`` and
    ``block_shape`` are rounded up to multiples of (8, 16, 16); ``overlap`` is both the tiles' overlap and the
    blocks' halo. Closing the generator stops at a tile boundary and aborts the sink (nothing is marked complete).
    Host work overlaps the device: block i+1's features are read while block i's tiles run, and block i-1's
    results are written meanwhile. If the device runs out of memory, the block is retried once with tiles
    halved in y/x (see :func:`smaller_tiles`), kept for the rest of the run; a second time raises.
    ``model`` is moved to ``device`` and left there; its train/eval mode is restored. ``class_names`` (of label
    values 1..K) are stored with the output, so a saved prediction opens with its classes named.

    ``first`` (3 slices, volume voxels; e.g. the region in view) is computed first (see
    :func:`~napari_dinofuse.inference.plan.plan_prediction`); once it is in the sink, one step carries the sink
    as ``Progress.partial``, so a viewer can show it while the rest is computed.
    """
    plan = plan_prediction(model, source, roi, tile_shape=tile_shape, overlap=overlap, block_shape=block_shape,
                           attention=attention, first=first)
    named = class_names_info(class_names, plan.num_classes)
    dev = resolve_device(device)
    sink = sink if sink is not None else MemorySink()
    total = sum(len(tiles) for _, _, tiles in plan.blocks)
    was_training = model.training
    done, shrunk, count = 0, False, len(plan.blocks)
    try:
        yield Progress(0, total, f"predicting {total} tile(s) over {roi_to_str(plan.roi)}")
        place(model, dev).eval()
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
                if index + 1 == plan.leading and index + 1 < count:
                    written.result()
                    left = sum(len(tiles) for _, _, tiles in plan.blocks[index + 1:])
                    yield Progress(done, done + left, "the region asked first is shown; predicting the rest",
                                   partial=sink)
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


def predict_block_retrying(model, source: FeatureSource, plan: PredictionPlan, index: int, dev: torch.device,
                           features: BlockFeatures | None = None, shrunk: bool = False, done: int = 0,
                           message: str = "") -> Generator[Progress, None, tuple[list, PredictionPlan]]:
    """:func:`predict_block`, and if ``dev`` runs out of memory (and the plan has not ``shrunk`` already), once more
    with tiles halved in y/x (:func:`smaller_tiles`), with a warning. Yields progress as ``done`` + tiles of
    the rest of the run (``plan``'s blocks from ``index`` on, recounted after a retry); returns (the block's
    results, the plan that computed them: the caller keeps the smaller tiles for its next blocks)."""
    while True:
        total = done + sum(len(tiles) for _, _, tiles in plan.blocks[index:])
        try:
            return (yield from within(predict_block(model, source, plan, index, dev, features), done, total,
                                      message)), plan
        except torch.OutOfMemoryError:
            smaller = None if shrunk else smaller_tiles(plan)
            if smaller is None:
                raise
        # Out of the except clause, so the failed tiles' tensors (held by its traceback) are freed.
        warnings.warn(f"out of {dev.type} memory with tiles of {plan.tile_shape}: continuing with tiles of "
                      f"{smaller.tile_shape}, overlap {smaller.overlap} (set smaller tiles to avoid the retry)",
                      MemoryRetryWarning, stacklevel=2)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        plan, shrunk = smaller, True


def _host(tensor: torch.Tensor) -> np.ndarray:
    return tensor.cpu().numpy()


def _run_tile(model, features: BlockFeatures, tile: Slices3, with_attention: bool):
    """Softmax (K, z, y, x) and channel-mean attention maps [(1, ceil(z/f), ...)] of one tile, float32
    tensors on the block's device."""
    size = tuple(s.stop - s.start for s in tile)
    dev = features.device
    # Run at whole patches: trilinear upsampling of gy patches onto exactly 16*gy pixels puts each patch
    # feature on its own pixels; a clipped size would stretch the features. Crop the result instead.
    gy, gx = (-(-n // PATCH_SIZE) for n in size[1:])
    full = (size[0], gy * PATCH_SIZE, gx * PATCH_SIZE)
    inputs = features.tile(tile, full_yx=full[1:])  # z before the volume: edge-padded
    with torch.inference_mode(), autocast(dev):
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
