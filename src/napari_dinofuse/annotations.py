"""Painted annotations: a snapshot of the strokes a fine-tune works on, kept safe with the model they trained
and autosaved when a fine-tune starts.

:func:`take_snapshot` copies the chunks of a labels volume that hold strokes into :class:`PaintedLabels`, and
:func:`find_painted` checks its classes: what training samples and reads its label tiles from, what is autosaved
and saved with the model. The user may paint on meanwhile, and strokes fill a few chunks where a copy of the
layer costs its whole size.

An hour of painting must not be lost to a crash, a closed viewer or a forgotten Save. Annotations are stored as
a single-level OME-Zarr image (``annotations.zarr``: label values as painted, placed in nm like the raw), written
slab by slab (bounded memory) into a hidden sibling and swapped in complete. Sparse strokes compress to almost
nothing, so a copy costs little disk.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np

from .atomic import recover, siblings, staging, swap_in
from .defaults import ANNOTATIONS_KIND, LABEL_CONVENTION
from .errors import InputError
from .geometry import Grid, Volume
from .io import read_region

__all__ = ["AUTOSAVE_ENV", "PaintedLabels", "autosave_path", "find_painted", "load_annotations", "save_annotations",
           "take_snapshot"]

FILE = "annotations.zarr"  # inside a model folder
AUTOSAVE_ENV = "DINOFUSE_AUTOSAVE"  # overrides where the last fine-tune's annotations are autosaved
_SLAB_BYTES = 64 * 2**20


class PaintedLabels:
    """A read-only snapshot of a labels volume: a copy of its chunks (``CHUNK``) that hold strokes, which reads
    like the volume (``painted[z0:z1, y0:y1, x0:x1]``, 0 where unpainted), and the painted voxels per class.

    Taken in one pass over the volume (:func:`take_snapshot`), at memory speed where nothing is painted; the
    voxel lists (``coords``, what training samples tiles around) are made from the copy when first asked for.
    """

    ndim = 3
    CHUNK = (8, 128, 128)  # also the chunks annotations are stored in: an autosave writes the copied ones

    def __init__(self, blocks: dict[tuple[int, int, int], np.ndarray], shape, dtype=np.uint8, coords=None):
        self.blocks = blocks  # chunk index -> that chunk's labels (only chunks with strokes)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        if coords is not None:
            self.__dict__["coords"] = coords

    @cached_property
    def coords(self) -> dict[int, np.ndarray]:
        """Class (1-based) -> its painted voxels (n, 3), in (z, y, x) order."""
        found: dict[int, list[np.ndarray]] = {}
        depth = self.CHUNK[0]
        for z0 in sorted({depth * key[0] for key in self.blocks}):
            _painted_points(self[z0:z0 + depth], z0, found)
        return {k: np.concatenate(found[k]) for k in sorted(found)}

    @property
    def num_classes(self) -> int:  # the highest painted label: logits for 1..num_classes
        return max(self.coords, default=0)

    @property
    def counts(self) -> dict[int, int]:
        return {k: len(v) for k, v in self.coords.items()}

    def __repr__(self) -> str:
        return f"PaintedLabels(shape={self.shape}, dtype={self.dtype}, {len(self.blocks)} chunks with strokes)"

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            raise TypeError(f"PaintedLabels reads boxes (up to three slices with step 1), not {key!r}")
        region = [slice(*k.indices(n)) for k, n in zip(key + (slice(None),) * (3 - len(key)), self.shape)]
        out = np.zeros([max(0, r.stop - r.start) for r in region], self.dtype)
        if out.size == 0:
            return out
        ranges = [range(r.start // c, (r.stop - 1) // c + 1) for r, c in zip(region, self.CHUNK)]
        for index in itertools.product(*ranges):
            block = self.blocks.get(index)
            if block is None:
                continue
            origin = [i * c for i, c in zip(index, self.CHUNK)]
            lo = [max(r.start, o) for r, o in zip(region, origin)]
            hi = [min(r.stop, o + n) for r, o, n in zip(region, origin, block.shape)]
            out[tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region))] = \
                block[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def without(self, points: np.ndarray, coords: dict[int, np.ndarray]) -> PaintedLabels:
        """This snapshot with ``points`` (n, 3) unpainted, whose painted voxels are ``coords`` (in their order)."""
        blocks = dict(self.blocks)
        keys = points // np.array(self.CHUNK)
        for key in {tuple(int(v) for v in k) for k in keys}:
            inside = points[np.all(keys == key, axis=1)] - np.array(key) * self.CHUNK
            blocks[key] = blocks[key].copy()
            blocks[key][tuple(inside.T)] = 0
        return PaintedLabels(blocks, self.shape, self.dtype, coords)


def _painted_points(slab: np.ndarray, z0: int, found: dict[int, list[np.ndarray]]) -> None:
    """Add the painted voxels of ``slab`` (whose first slice is ``z0``) to ``found``, class by class, in (z, y,
    x) order. Slices and rows with nothing painted are skipped at memory speed: ``np.nonzero`` over mostly
    unpainted slabs took 50x longer."""
    for dz in np.flatnonzero(slab.reshape(len(slab), -1).max(axis=1, initial=0) > 0):
        rows = np.flatnonzero(slab[dz].max(axis=1, initial=0) > 0)
        part = slab[dz][rows]
        r, x = np.nonzero(part)
        values = part[r, x]
        points = np.stack([np.full(len(r), z0 + dz), rows[r], x], axis=1)
        for k in np.unique(values):
            found.setdefault(int(k), []).append(points[values == k])


def take_snapshot(labels) -> PaintedLabels:
    """A copy of the chunks of ``labels`` (Z, Y, X integers, any backing: read slab by slab) that hold strokes.

    Cheap enough for the GUI thread: chunks with nothing painted are skipped at memory speed (256 x 1024 x 1024
    bytes with a few strokes: ~20 ms; a full copy took 0.1-0.7 s and its memory); painted chunks cost a copy.
    Negative values are refused here.
    """
    depth, height, width = PaintedLabels.CHUNK
    signed = np.dtype(labels.dtype).kind == "i"
    blocks = {}
    for z0, slab in _slabs(labels, depth):
        lowest = slab.min(initial=0) if signed else 0
        if lowest < 0:
            raise InputError(f"labels must not be negative (found {lowest}; labels are {LABEL_CONVENTION}): set "
                             "those voxels to 0 or renumber them")
        if slab.max(initial=0) <= 0:  # most slabs: one pass at memory speed
            continue
        rows = slab.max(axis=2).max(axis=0) > 0  # painted rows (y) of the slab
        for y0 in np.unique(np.flatnonzero(rows) // height) * height:
            band = slab[:, y0:y0 + height]
            columns = band.max(axis=1).max(axis=0) > 0
            for x0 in np.unique(np.flatnonzero(columns) // width) * width:
                blocks[(z0 // depth, int(y0) // height, int(x0) // width)] = np.array(band[:, :, x0:x0 + width])
    return PaintedLabels(blocks, labels.shape, labels.dtype)


def _slabs(labels, depth: int):
    """(z0, slices z0 .. z0 + depth) of ``labels``; a stored array is read in whole chunks along z where that
    fits in ~64 MB (each chunk decoded once, not once per slab it holds)."""
    stored = getattr(labels, "chunks", None)  # zarr: ints; dask: a tuple of sizes per axis
    along_z = max(stored[0]) if stored and isinstance(stored[0], tuple) else (stored[0] if stored else depth)
    plane = int(np.prod(labels.shape[1:])) * np.dtype(labels.dtype).itemsize
    read = math.lcm(depth, int(along_z))
    read = read if read * plane <= _SLAB_BYTES else depth
    for r0 in range(0, labels.shape[0], read):
        block = read_region(labels, (slice(r0, r0 + read),))
        for z0 in range(r0, min(r0 + read, labels.shape[0]), depth):
            yield z0, block[z0 - r0:z0 - r0 + depth]


def _ranges(values) -> str:
    """'1, 3-4, 300' for sorted ints or (first, last) runs: the message stays one short line."""
    runs: list[list[int]] = []
    for v in values:
        a, b = v if isinstance(v, tuple) else (v, v)
        if runs and a == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def find_painted(labels, raw_shape, known_classes: int = 0) -> PaintedLabels:
    """Validate sparse labels against the raw and take their snapshot (:func:`take_snapshot`; ``labels``
    already one: the checks alone); clear refusals otherwise.

    Classes are 1..K with every class painted, except those the model already has (``known_classes``, when
    fine-tuning one): an unpainted class in between would be a model output that nothing ever trains, and a
    stray value (300 for 3) would build hundreds of them.
    """
    shape = tuple(getattr(labels, "shape", ()))
    if shape != tuple(raw_shape):
        raise InputError(f"the labels have shape {shape} but the raw has {tuple(raw_shape)}: paint on a labels "
                         "layer with the raw's shape (e.g. 'New annotation layer')")
    if np.dtype(labels.dtype).kind not in "iu":
        raise InputError(f"labels must be integers ({LABEL_CONVENTION}), got {labels.dtype}")
    painted = labels if isinstance(labels, PaintedLabels) else take_snapshot(labels)
    coords = painted.coords
    if not coords:
        raise InputError("no painted voxels: paint a few strokes of every class, background included")
    if len(coords) == 1:
        k = next(iter(coords))
        raise InputError(f"only class {k} is painted: paint the background (and any other class) too, "
                         "training needs at least two classes")
    gaps, last = [], known_classes  # runs of unpainted classes (as ranges: a stray 2**40 must not be listed)
    for k in coords:
        if k > last + 1:
            gaps.append((last + 1, k - 1))
        last = max(last, k)
    if gaps:
        model = f" (the model has classes 1..{known_classes})" if known_classes else ""
        raise InputError(f"labels paint classes {_ranges(coords)} but class values must be 1..K with every class "
                         f"painted{model}: {_ranges(gaps)} never painted. Renumber the labels to "
                         f"1..{known_classes + sum(k > known_classes for k in coords)} (0 = unpainted)")
    return painted


def autosave_path() -> Path:
    """Where the annotations of the last fine-tune started are kept (the user data folder, not the cache:
    clearing the feature cache must not delete them)."""
    override = os.environ.get(AUTOSAVE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-dinofuse")) / "autosave" / FILE


def save_annotations(path, labels, grid: Grid) -> Path:
    """Write ``labels`` (Z, Y, X, any array-like, on ``grid``) to the OME-Zarr ``path`` atomically."""
    import zarr

    from .io import create_ome_image

    path = Path(path).expanduser().absolute()
    recover(path)
    for stale in siblings(path, "partial"):  # left by a crash: never complete
        shutil.rmtree(stale, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = staging(path, "partial")
    try:
        group = zarr.open_group(str(partial), mode="w", zarr_format=3)
        dtype = np.dtype(labels.dtype)
        # Small chunks: strokes touch few, and writing one costs its size (an autosave of 60 strokes in
        # 256 x 1024 x 1024 took 0.52 s in chunks of 32 x 256 x 256, 0.18 s in these).
        array = create_ome_image(group, "annotations", labels.shape, dtype, grid, chunks=PaintedLabels.CHUNK)
        if isinstance(labels, PaintedLabels):  # the chunks with strokes: the rest is the fill value, 0
            for index, block in labels.blocks.items():
                array[tuple(slice(i * c, i * c + n) for i, c, n in zip(index, labels.CHUNK, block.shape))] = block
        else:
            step = max(1, min(labels.shape[0], _SLAB_BYTES // max(int(np.prod(labels.shape[1:])) * dtype.itemsize, 1)))
            for z in range(0, labels.shape[0], step):
                array[z:z + step] = read_region(labels, (slice(z, z + step),))
        group.attrs["dinofuse"] = {"kind": ANNOTATIONS_KIND}  # the reader opens it as Labels
        swap_in(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return path


def load_annotations(path) -> Volume | None:
    """The annotations at ``path`` (lazy, read-only), or None if there are none."""
    from .io import open_volume

    path = Path(path).expanduser()
    recover(path)
    if not (path / "zarr.json").is_file():
        return None
    return open_volume(path, name="annotations")
