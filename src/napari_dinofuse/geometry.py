"""Volumes in physical space and resampling between grids, in napari's conventions.

Axes are always (z, y, x) and units nanometres. As in napari, voxel ``i`` has its *centre* at
``offset + i * voxel_size`` (napari's ``translate`` and ``scale``), so it spans half a voxel either side.
Only numpy here (torch tensors are accepted by :func:`resample` without importing torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GeometryError

Triple = tuple[float, float, float]


def triple(value, name: str, positive: bool = False) -> Triple:
    """``value`` as 3 finite floats (z, y, x; one number: the same on every axis); ``positive`` for sizes."""
    arr = np.broadcast_to(np.asarray(value, dtype=float), (3,)) if np.ndim(value) == 0 else np.asarray(value, float)
    if arr.shape != (3,):
        raise GeometryError(f"{name} needs 3 values (z, y, x) in nm, got {value!r}")
    if not np.all(np.isfinite(arr)):
        raise GeometryError(f"{name} must be finite, got {value!r}")
    if positive and np.any(arr <= 0):
        raise GeometryError(f"{name} must be positive in every axis, got {tuple(arr.tolist())}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class Grid:
    """Where a (Z, Y, X) array's voxel centres lie in the world (nm)."""

    shape: tuple[int, int, int]
    voxel_size: Triple
    offset: Triple = (0.0, 0.0, 0.0)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "voxel_size", triple(self.voxel_size, "voxel size", positive=True))
        object.__setattr__(self, "offset", triple(self.offset, "offset"))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryError(f"a grid needs 3 non-empty axes (z, y, x), got shape {self.shape}")

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World coordinates of the outer faces: (low corner, high corner)."""
        vs, off, n = np.array(self.voxel_size), np.array(self.offset), np.array(self.shape)
        return off - vs / 2, off + (n - 0.5) * vs

    def index_to_world(self, index) -> np.ndarray:
        return np.asarray(self.offset) + np.asarray(index, float) * np.asarray(self.voxel_size)

    def world_to_index(self, world) -> np.ndarray:
        """Continuous index (voxel centres at integers)."""
        return (np.asarray(world, float) - np.asarray(self.offset)) / np.asarray(self.voxel_size)

    def axis_centres(self, axis: int) -> np.ndarray:
        return self.offset[axis] + np.arange(self.shape[axis]) * self.voxel_size[axis]

    def covers(self, other: "Grid", tolerance: float = 1e-3) -> bool:
        """True when every voxel of ``other`` lies inside this grid's extent."""
        lo, hi = self.bounds
        olo, ohi = other.bounds
        tol = tolerance * np.minimum(self.voxel_size, other.voxel_size)
        return bool(np.all(olo >= lo - tol) and np.all(ohi <= hi + tol))

    def coarsen(self, factors) -> "Grid":
        """The grid of blocks of ``factors`` voxels (e.g. 16x16 ViT patches, 2^k UNet levels).

        The last block may hang over the edge (ceil), as a padded patch does. A block's centre is the
        centre of its voxels: the offset moves by (factor - 1) / 2 voxels.
        """
        f = np.broadcast_to(np.asarray(factors, dtype=int), (3,))
        shape = tuple(-(-n // k) for n, k in zip(self.shape, f))
        vs = np.asarray(self.voxel_size) * f
        off = np.asarray(self.offset) + (f - 1) / 2 * np.asarray(self.voxel_size)
        return Grid(shape, tuple(vs), tuple(off))

    def crop(self, start, stop) -> "Grid":
        """The sub-grid of voxels start..stop (exclusive) along each axis."""
        start = np.asarray(start, int)
        shape = np.asarray(stop, int) - start
        return Grid(tuple(shape), self.voxel_size, tuple(self.index_to_world(start)))

    def describe(self) -> str:
        lo, hi = self.bounds
        return ", ".join(f"{a} {l:.6g}..{h:.6g} nm" for a, l, h in zip("zyx", lo, hi))


class Volume:
    """A 3D array (numpy, zarr or dask; never loaded whole) placed in the world."""

    def __init__(self, data, voxel_size, offset=(0.0, 0.0, 0.0), name: str = "volume"):
        shape = tuple(getattr(data, "shape", ()))
        if len(shape) == 2:
            raise GeometryError(f"{name} is 2D {shape}: dinofuse segments volumes (z, y, x). Stack the images "
                                "into a 3D array, or add a z axis of length 1 for a single section")
        if len(shape) == 4 and shape[-1] in (3, 4):
            raise GeometryError(f"{name} looks like an RGB(A) volume {shape}: convert it to grayscale (EM data "
                                "has one channel)")
        if len(shape) != 3:
            raise GeometryError(f"{name} has {len(shape)} dimensions {shape}: a volume needs exactly 3 (z, y, x); "
                                "select one channel or time point first")
        if np.dtype(data.dtype).kind not in "uif":
            raise GeometryError(f"{name} has dtype {data.dtype}: expected integer or floating-point intensities")
        self.data = data
        self.name = name
        try:
            self.grid = Grid(shape, voxel_size, offset)
        except GeometryError as exc:
            raise GeometryError(f"{name}: {exc}") from None

    shape = property(lambda self: self.grid.shape)
    voxel_size = property(lambda self: self.grid.voxel_size)
    offset = property(lambda self: self.grid.offset)
    dtype = property(lambda self: np.dtype(self.data.dtype))

    def __repr__(self) -> str:
        return (f"Volume({self.name!r}, shape={self.shape}, dtype={self.dtype}, voxel_size={self.voxel_size}, "
                f"offset={self.offset})")

    def require_covers(self, other: "Volume") -> None:
        """Raise a clear error unless this volume (e.g. the context) covers ``other`` (e.g. the raw)."""
        if not self.grid.covers(other.grid):
            raise GeometryError(
                f"{self.name} does not cover {other.name}: {other.name} spans {other.grid.describe()}, "
                f"{self.name} spans {self.grid.describe()}. Check the voxel sizes and offsets (napari scale "
                "and translate) of both")

    def resample_onto(self, target: Grid, mode: str = "linear"):
        """This volume's values on ``target``'s voxel centres (reads the whole source array)."""
        return resample(np.asarray(self.data), self.grid, target, mode=mode)


def _source_positions(src: Grid, dst: Grid, axis: int) -> np.ndarray:
    """Each target centre along ``axis`` in source voxels (continuous; centres at integers), clipped to the first
    and last source centres: inside the extent but beyond the last centre, linear resampling gives the edge value."""
    pos = (dst.axis_centres(axis) - src.offset[axis]) / src.voxel_size[axis]
    return np.clip(pos, 0, src.shape[axis] - 1)


def _axis_weights(src: Grid, dst: Grid, axis: int, dtype=np.float32):
    """Per target voxel along ``axis``: two source indices and the weight of the second (in ``dtype``)."""
    pos = _source_positions(src, dst, axis)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, src.shape[axis] - 1)
    return i0, i1, (pos - i0).astype(dtype)


def resample(values, src: Grid, dst: Grid, mode: str = "linear", check_coverage: bool = True):
    """Resample ``values`` (..., Z, Y, X) laid on ``src`` onto the voxel centres of ``dst``.

    Every target voxel gets the value at its own physical location (separable linear interpolation or
    nearest neighbour). Leading axes (e.g. feature channels) are carried along. Works on numpy arrays
    and on torch tensors (on their own device).
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"unknown resampling mode {mode!r}: use 'linear' or 'nearest'")
    if tuple(values.shape[-3:]) != src.shape:
        raise GeometryError(f"values of shape {tuple(values.shape)} do not match the source grid {src.shape}")
    if check_coverage and not src.covers(dst):
        raise GeometryError(f"the source ({src.describe()}) does not cover the target ({dst.describe()})")
    is_torch = type(values).__module__.startswith("torch")
    if is_torch and mode == "linear":
        return _resample_torch(values, src, dst)
    out = values
    for axis in range(3):
        i0, i1, w = _axis_weights(src, dst, axis)
        dim = out.ndim - 3 + axis
        if mode == "nearest":
            index = np.where(w < 0.5, i0, i1)
            if is_torch:
                import torch

                out = torch.index_select(out, dim, torch.from_numpy(index).to(out.device))
            else:
                out = np.take(out, index, axis=dim)
            continue
        a, b = np.take(out, i0, axis=dim), np.take(out, i1, axis=dim)
        a = a.astype(np.result_type(a.dtype, np.float32), copy=False)
        shape = [1] * out.ndim
        shape[dim] = -1
        out = a + (b - a) * w.reshape(shape).astype(a.dtype)
    return out


def _resample_torch(values, src: Grid, dst: Grid):
    """Linear :func:`resample` of a tensor, on its device: :func:`resample_batch` with the leading axes as
    channels."""
    lead = values.shape[:-3]
    out = resample_batch(values.reshape(1, -1, *values.shape[-3:]), [src], [dst])
    return out.reshape(*lead, *dst.shape)


def resample_batch(values, sources: Sequence[Grid], targets: Sequence[Grid]):
    """Linear resampling of a batch of tensors (B, C, Z, Y, X), element b laid on ``sources[b]``, onto the voxel
    centres of ``targets[b]`` (all of one shape): trilinear, the edge value beyond the last centre, in float32 (or
    float64) and back to the values' dtype, on the values' device.

    A few kernels for the whole batch: a GPU training step is bound by launching kernels (gathering and blending
    axis by axis took ~50 per call), and a step samples every tile's gates from its own window. Without gradients
    (predictions, the class shares' estimate, the keep term's start model) the interpolation is applied as it
    separates, by matrices (:func:`_resample_by_matrices`: on a CPU 2-3x faster than ``grid_sample``). Training
    keeps one trilinear ``grid_sample``: the same values to float rounding, but the rounding the recipe was
    measured with (trained through the matrices, round 1 came out .004-.027 lower in 7 of 8 runs: docs/
    benchmarks.md, 2026-12-07 afternoon)."""
    import torch
    import torch.nn.functional as F

    shape = tuple(values.shape[-3:])
    if values.ndim != 5 or len(sources) != values.shape[0] or len(targets) != values.shape[0]:
        raise ValueError(f"expected values (B, C, Z, Y, X) with B source and target grids, got {tuple(values.shape)}, "
                         f"{len(sources)} and {len(targets)}")
    if any(src.shape != shape for src in sources):
        raise GeometryError(f"values of shape {tuple(values.shape)} do not match the source grids "
                            f"{sorted({src.shape for src in sources})}")
    nz, ny, nx = targets[0].shape
    if any(dst.shape != (nz, ny, nx) for dst in targets):
        raise ValueError(f"the targets must have one shape, got {sorted({dst.shape for dst in targets})}")
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    if not (torch.is_grad_enabled() and values.requires_grad):
        out = _resample_by_matrices(values, sources, targets, dtype)
    else:
        # Per element and axis, each target centre in source voxels, normalised so -1 and 1 are the first and last
        # centres; (x, y, z) as grid_sample takes them.
        positions = []
        for src, dst in zip(sources, targets):
            for axis in (2, 1, 0):
                n, pos = src.shape[axis], _source_positions(src, dst, axis)
                positions.append(2 * pos / (n - 1) - 1 if n > 1 else np.zeros_like(pos))
        table = _on_device(np.concatenate(positions), dtype, values.device).view(len(sources), nx + ny + nz)
        b = len(sources)
        x = table[:, :nx].view(b, 1, 1, nx).expand(b, nz, ny, nx)
        y = table[:, nx:nx + ny].view(b, 1, ny, 1).expand(b, nz, ny, nx)
        z = table[:, nx + ny:].view(b, nz, 1, 1).expand(b, nz, ny, nx)
        out = F.grid_sample(values.to(dtype), torch.stack([x, y, z], dim=-1), mode="bilinear", padding_mode="border",
                            align_corners=True)
    return out.to(values.dtype) if values.is_floating_point() else out  # integers interpolate to float32


def _resample_by_matrices(values, sources: Sequence[Grid], targets: Sequence[Grid], dtype):
    """:func:`resample_batch` as trilinear interpolation separates: per element and axis a (target x source) matrix
    holding each target centre's two weights, applied by three batched matrix products, in ``dtype``."""
    import torch

    shape, out_shape, b = tuple(values.shape[-3:]), targets[0].shape, len(sources)
    matrices = []
    for axis in range(3):
        weights = np.zeros((b, out_shape[axis], shape[axis]))
        rows = np.arange(out_shape[axis])
        for k, (src, dst) in enumerate(zip(sources, targets)):
            i0, i1, w = _axis_weights(src, dst, axis, np.float64)
            weights[k, rows, i0] = 1 - w
            weights[k, rows, i1] += w  # i1 is i0 at the last centre
        matrices.append(weights.reshape(-1))
    table = _on_device(np.concatenate(matrices), dtype, values.device)
    sizes = [b * n * m for n, m in zip(out_shape, shape)]
    wz, wy, wx = (part.view(b, 1, n, m) for part, n, m in zip(table.split(sizes), out_shape, shape))
    with torch.autocast(values.device.type, enabled=False):  # as the weights are: bf16 would round them
        out = values.to(dtype) @ wx.unsqueeze(2).transpose(-1, -2)  # (B, C, Z, Y, nx)
        out = wy.unsqueeze(2) @ out  # (B, C, Z, ny, nx)
        return (wz @ out.flatten(3)).unflatten(3, out_shape[1:])  # (B, C, nz, ny, nx)


def _on_device(table: np.ndarray, dtype, device):
    """``table`` as a tensor of ``dtype`` on ``device``, in one copy: from pinned memory and without waiting on a
    GPU (a copy from ordinary memory makes the host wait until the device has finished all it was given)."""
    import torch

    tensor = torch.from_numpy(table.astype(np.float64 if dtype == torch.float64 else np.float32))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def read_boxes(sources: Sequence[Grid], targets: Sequence[Sequence[Grid]]) -> tuple[np.ndarray, np.ndarray]:
    """Per element b, the box of ``sources[b]``'s voxels that linear resampling onto ``targets[k][b]`` (for
    every k) reads: (low, high), each (B, 3), high exclusive."""
    shape = np.array(sources[0].shape)
    low = np.tile(shape, (len(sources), 1))
    high = np.zeros((len(sources), 3), int)
    for level in targets:
        for b, (src, dst) in enumerate(zip(sources, level)):
            for axis in range(3):  # positions grow along an axis: its first and last centres bound them
                pos = _source_positions(src, dst, axis)[[0, -1]]
                low[b, axis] = min(low[b, axis], int(np.floor(pos[0])))
                high[b, axis] = max(high[b, axis], int(np.ceil(pos[1])) + 1)
    return low, high
