"""Splitting (z, y, x) volumes into blocks and tiles, and blending overlapping tiles.

Two decompositions, for two jobs:

* **Blocks** (:func:`iter_blocks`): non-overlapping *cores* that partition a region exactly, each
  grown by a halo of context into an *outer* block. A blockwise (e.g. dask) run reads ``outer``,
  computes, and writes only ``inner`` of its result into ``core``, so no voxel is written twice.
* **Tiles** (:func:`aligned_tiles`, per axis): overlapping windows for sliding-window inference, their starts
  on a grid (the UNet's deepest level, the patch grid). Overlapping predictions are blended with a weight
  window that falls off towards tile faces (:func:`blending_weights`), in :class:`BlendAccumulator`::

      acc = BlendAccumulator(shape, channels, device)
      for tile in tiles:
          acc.add(tile, predict(volume[tile]), blending_weights(tile_shape, overlap))  # sum(w * p), sum(w)
      out = acc.result(region)                                                        # sum(w * p) / sum(w)

  Because every weight is strictly positive, every covered voxel gets a well-defined average,
  including voxels at the volume edge that only one tile covers.

Slices are always concrete here (``start``/``stop`` ints, step 1), in voxel indices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GeometryError

__all__ = [
    "BlendAccumulator",
    "Block",
    "aligned_tiles",
    "blending_weights",
    "iter_blocks",
    "normalize_roi",
    "parse_roi",
    "roi_to_str",
    "tile_overlap",
]

Slices3 = tuple[slice, slice, slice]
_AXES = ("z", "y", "x")


def ints3(value, name: str, minimum: int) -> tuple[int, int, int]:
    """One int for all axes, or three (z, y, x); GeometryError (a ValueError) otherwise."""
    values = (value,) * 3 if np.ndim(value) == 0 else tuple(value)
    if len(values) != 3:
        raise GeometryError(f"{name} needs 1 or 3 integers (z, y, x), got {value!r}")
    out = []
    for v in values:
        # bool is an int subclass, but a True tile size is a bug.
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise GeometryError(f"{name} must be integers >= {minimum}, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _shape3(shape) -> tuple[int, int, int]:
    return ints3(shape, "shape", 1)


def _slices_shape(slices: Sequence[slice]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in slices)


# -- regions of interest -----------------------------------------------------------------


def normalize_roi(roi: Sequence[slice] | None, shape) -> Slices3:
    """Concrete, validated slices for ``roi`` (None: the whole volume).

    Open ends (``None``) become 0 / the axis length; negative indices, steps, empty ranges and
    ranges past the volume are refused (GeometryError, a ValueError) rather than silently clipped.
    """
    shape = _shape3(shape)
    if roi is None:
        return tuple(slice(0, n) for n in shape)
    roi = tuple(roi)
    if len(roi) != 3 or not all(isinstance(s, slice) for s in roi):
        raise GeometryError(f"an ROI needs 3 slices (z, y, x), got {roi!r}")
    out = []
    for s, n, axis in zip(roi, shape, _AXES):
        if s.step not in (None, 1):
            raise GeometryError(f"ROI {axis} range {s!r} has a step; only contiguous ranges are supported")
        start = 0 if s.start is None else int(s.start)
        stop = n if s.stop is None else int(s.stop)
        if start < 0 or stop < 0:
            raise GeometryError(f"ROI {axis} range {start}:{stop} is negative; use indices from 0 to {n}")
        if stop > n:
            raise GeometryError(f"ROI {axis} range {start}:{stop} runs past the volume ({axis} size {n})")
        if start >= stop:
            raise GeometryError(f"ROI {axis} range {start}:{stop} is empty")
        out.append(slice(start, stop))
    return tuple(out)


_RANGE = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")


def parse_roi(text: str, shape) -> Slices3:
    """Parse ``"z0:z1,y0:y1,x0:x1"`` (non-negative ints, open ends allowed: ``"0:10,:,5:"``)."""
    hint = "expected z0:z1,y0:y1,x0:x1 with non-negative integers, either end may be left out (e.g. 0:10,:,5:)"
    parts = str(text).split(",")
    if len(parts) != 3:
        raise GeometryError(f"ROI {text!r} has {len(parts)} range(s): {hint}")
    slices = []
    for part, axis in zip(parts, _AXES):
        match = _RANGE.match(part)
        if match is None:
            raise GeometryError(f"ROI {text!r}: bad {axis} range {part.strip()!r}: {hint}")
        start, stop = (int(g) if g else None for g in match.groups())
        slices.append(slice(start, stop))
    return normalize_roi(slices, shape)


def roi_to_str(roi: Sequence[slice]) -> str:
    """Inverse of :func:`parse_roi` (open ends stay open)."""
    def bound(v):
        return "" if v is None else str(int(v))

    return ",".join(f"{bound(s.start)}:{bound(s.stop)}" for s in roi)


# -- blocks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One block of a blockwise run.

    ``core``: the voxels this block (alone) writes. ``outer``: ``core`` grown by the halo and
    clipped to the volume, i.e. what it reads. ``inner``: where ``core`` sits inside ``outer``.
    """

    core: Slices3
    outer: Slices3

    @property
    def inner(self) -> Slices3:
        return tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(self.core, self.outer))

    @property
    def shape(self) -> tuple[int, int, int]:
        return _slices_shape(self.core)

    @property
    def outer_shape(self) -> tuple[int, int, int]:
        return _slices_shape(self.outer)


def iter_blocks(shape, block_shape, halo=0, roi: Sequence[slice] | None = None) -> list[Block]:
    """Blocks whose cores tile ``roi`` exactly (no overlap, no gap), in (z, y, x) order.

    The last block along an axis may be smaller. Halos are clipped to the *volume*, not the ROI:
    data just outside the ROI is still valid context for the voxels inside it.
    """
    shape = _shape3(shape)
    block_shape = ints3(block_shape, "block_shape", 1)
    halo = ints3(halo, "halo", 0)
    roi = normalize_roi(roi, shape)
    per_axis = []
    for r, b, h, n in zip(roi, block_shape, halo, shape):
        axis = []
        for start in range(r.start, r.stop, b):
            stop = min(start + b, r.stop)
            axis.append((slice(start, stop), slice(max(0, start - h), min(n, stop + h))))
        per_axis.append(axis)
    return [
        Block(core=(cz, cy, cx), outer=(oz, oy, ox))
        for cz, oz in per_axis[0]
        for cy, oy in per_axis[1]
        for cx, ox in per_axis[2]
    ]


# -- overlapping tiles ------------------------------------------------------------------


def aligned_tiles(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of tiles covering 0..length, starts multiples of ``align``, neighbours overlapping
    by >= ``overlap``; the last tile is clipped at ``length`` (the UNet pads any size).

    As few tiles as ``tile`` allows, each only as large as that number needs (the smallest multiple of
    ``align`` that needs no more of them): 544 voxels take three tiles of 208 rather than of 256, overlapping by
    32-48 voxels instead of 112, so fewer voxels are computed twice."""
    if length <= tile:
        return [(0, length)]
    step = (tile - overlap) // align * align
    if step < 1:
        raise ValueError(f"tile {tile} minus overlap {overlap} must leave at least one step of {align} voxels")
    count = _tile_count(length, tile, step, align)
    for smaller in range(-(-(overlap + 1) // align) * align, tile, align):
        smaller_step = (smaller - overlap) // align * align
        if smaller_step >= 1 and _tile_count(length, smaller, smaller_step, align) <= count:
            tile, step = smaller, smaller_step
            break
    span = -(-(length - tile) // align) * align  # last start: aligned, and its tile reaches `length`
    count = _tile_count(length, tile, step, align)
    # Evenly spread, each start floored onto the grid: consecutive starts differ by <= step.
    starts = [(i * span // (count - 1)) // align * align for i in range(count)]
    return [(s, min(s + tile, length)) for s in starts]


def _tile_count(length: int, tile: int, step: int, align: int) -> int:
    """How many tiles of ``tile`` voxels, starts ``step`` apart at most and aligned, cover ``length`` (> tile)."""
    span = -(-(length - tile) // align) * align
    return -(-span // step) + 1


def _window_1d(size: int, overlap: int, eps: float) -> np.ndarray:
    w = np.ones(size, dtype=np.float64)
    ramp_len = min(overlap, size // 2)
    if ramp_len > 0:
        # Raised cosine sampled strictly inside (0, 1): the outermost voxel gets a small but
        # non-zero weight, so a voxel only one tile covers still has a defined average.
        x = (np.arange(ramp_len) + 1) / (ramp_len + 1)
        ramp = 0.5 - 0.5 * np.cos(np.pi * x)
        w[:ramp_len] = ramp
        w[size - ramp_len:] = np.minimum(w[size - ramp_len:], ramp[::-1])
    return np.maximum(w, eps)


def blending_weights(tile_shape, overlap, dtype=np.float32, eps: float = 1e-3) -> np.ndarray:
    """Separable weight window of ``tile_shape``: raised-cosine ramps over ``overlap`` voxels
    at each face, 1 in the middle, and at least ``eps`` per axis (so > 0 everywhere).

    Pass the actual tile shape (the last tile along an axis may be clipped).
    """
    tile_shape = ints3(tile_shape, "tile_shape", 1)
    overlap = ints3(overlap, "overlap", 0)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    wz, wy, wx = (_window_1d(t, o, eps) for t, o in zip(tile_shape, overlap))
    return (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(dtype)


def tile_overlap(tile_slices, origin, shape):
    """Where a tile (volume slices) meets a region (``origin``, ``shape``): (slices in the tile, slices in the
    region), or None when they do not meet."""
    src, dst = [], []
    for s, o, n in zip(tile_slices, origin, shape):
        lo, hi = s.start - o, s.stop - o
        a, b = max(lo, 0), min(hi, n)
        if a >= b:
            return None
        dst.append(slice(a, b))
        src.append(slice(a - lo, b - lo))
    return tuple(src), tuple(dst)


class BlendAccumulator:
    """Weighted average of overlapping tile outputs over one region, held in torch on ``device`` (a tile's
    output need not leave the GPU).

    Holds ``sum(w * values)`` as ``(channels, *shape)`` and ``sum(w)`` as ``shape``; memory is bounded by the
    region, not the volume. ``origin`` places the region in volume coordinates, so a block accumulates just
    its outer region while tiles are added in volume slices; parts of a tile outside the region are ignored.
    """

    def __init__(self, shape, channels: int, device="cpu", origin=(0, 0, 0)):
        self.shape, self.origin = _shape3(shape), ints3(origin, "origin", 0)
        self._sum = torch.zeros((channels, *self.shape), dtype=torch.float32, device=device)
        self._weight = torch.zeros(self.shape, dtype=torch.float32, device=device)
        self._windows: dict = {}

    def add(self, tile_slices, values: torch.Tensor, weights: np.ndarray) -> None:
        """Add ``values`` (C, *tile) for the tile at ``tile_slices`` with the window ``weights`` (*tile, > 0)."""
        tile_shape = _slices_shape(tile_slices)
        if tuple(values.shape) != (self._sum.shape[0], *tile_shape) or weights.shape != tile_shape:
            raise ValueError(f"values must have shape {(self._sum.shape[0], *tile_shape)} and weights "
                             f"{tile_shape}, got {tuple(values.shape)} and {weights.shape}")
        overlap = tile_overlap(tile_slices, self.origin, self.shape)
        if overlap is None:
            return  # tile lies outside this region
        src, dst = overlap
        key = id(weights)  # windows are reused across tiles: one upload per window
        if key not in self._windows:
            self._windows[key] = (weights, torch.from_numpy(weights).to(self._sum.device))
        w = self._windows[key][1][src]
        self._sum[(slice(None), *dst)] += values[(slice(None), *src)] * w
        self._weight[dst] += w

    def result(self, region=None) -> torch.Tensor:
        """``sum(w * values) / sum(w)`` (0 where nothing was added) over ``region`` (default: all), float32."""
        region = tuple(region) if region is not None else (slice(None),) * 3
        s, w = self._sum[(slice(None), *region)], self._weight[region]
        return torch.where(w > 0, s / w, torch.zeros((), dtype=s.dtype, device=s.device))
