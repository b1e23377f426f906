"""Objects (instance segmentation) and their measurements, from a class map, block by block.

Memory is bounded by one block (or one object's bounding box, at most a block's worth of voxels), so this runs
on volumes larger than memory. The passes, each a :class:`~napari_dinofuse.progress.Progress` generator step:

1. **components** per block: the 6-connected components of each chosen class get ids within their block,
   written into the output; each one's class, size, bounding box and first voxel (in z, y, x raster order) are
   recorded;
2. **merge**: pieces of one class that touch across a block face are one object; the output gets object ids;
3. **refine** (optional), per object in its bounding box: enclosed holes filled (only voxels no other object
   owns), touching objects split by a watershed on the distance transform seeded by its maxima that stand out
   by at least ``split_depth_nm`` (a neck that much narrower than the objects it joins);
4. **measure and number**: objects under the minimum size are dropped, the rest numbered 1..N by their first
   voxel in raster order; every block is measured, then renumbered.

The block passes (1, the output of 2, 4) are independent tasks: on a dask cluster they run on the workers
(:func:`~napari_dinofuse.distributed.block_mapper`); merging and refining run in the calling process.

Every choice depends on the objects only, never on the blocks: blockwise equals whole-volume, voxel for voxel.
Objects whose bounding box holds more than ``refine_limit`` voxels (default 256³, ~0.5 GB while refined) are
kept as found, not filled or split, and a warning says how many.
"""

from __future__ import annotations

import csv
import io
import math
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import product
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..defaults import PREDICT_BLOCK
from ..errors import InputError
from ..geometry import Grid
from ..io import read_region
from ..progress import Progress

__all__ = ["ObjectSettings", "ObjectTable", "find_objects", "parse_classes"]

REFINE_LIMIT = 256**3  # voxels in an object's bounding box, at most, to fill or split it (~30 bytes a voxel)
HELD_BYTES = 256 * 2**20  # zarr chunks of the instances held in memory while objects are refined
_FACE_TO_AREA = 2 / 3  # mean of |n_z| + |n_y| + |n_x| over isotropic orientations is 3/2: voxel faces overcount


@dataclass(frozen=True)
class ObjectSettings:
    """Which classes become objects (label values: k = class k, as in the prediction) and how."""

    classes: tuple[int, ...]
    min_size_nm3: float = 0.0
    fill_holes: bool = True
    split_depth_nm: float = 0.0  # 0: touching objects stay one; else the seeds' minimum prominence (nm)

    def __post_init__(self):
        classes = tuple(self.classes) if isinstance(self.classes, (list, tuple)) else (self.classes,)
        if not classes or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1
                                  for c in classes):
            raise InputError(f"classes {self.classes!r}: expected one or more label values 1..K (1 = background, "
                             "2, 3 … your classes), e.g. 3 or 3,4")
        object.__setattr__(self, "classes", tuple(sorted({int(c) for c in classes})))
        for name, unit in (("min_size_nm3", "nm³"), ("split_depth_nm", "nm")):
            value = getattr(self, name)
            try:
                ok = math.isfinite(float(value)) and float(value) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise InputError(f"{name.removesuffix('_nm3').removesuffix('_nm').replace('_', ' ')} {value!r}: "
                                 f"expected a number ≥ 0 in {unit}")
            object.__setattr__(self, name, float(value))

    def check_classes(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        """Refuse label values the prediction does not have, listing those it has."""
        missing = [c for c in self.classes if c > num_classes]
        if missing:
            names = list(class_names or [f"class {k}" for k in range(1, num_classes + 1)])
            have = ", ".join(f"{k} = {name}" for k, name in enumerate(names, 1))
            raise InputError(f"class {', '.join(map(str, missing))} does not exist: the prediction has {have}")


def parse_classes(text: str, class_names: Sequence[str] | None = None) -> tuple[int, ...]:
    """'3,4' or 'mitochondrion,granule' (names as in the model, any case) -> label values."""
    names = [n.lower() for n in class_names or []]
    values = []
    for token in (t.strip() for t in str(text).split(",")):
        if token.lstrip("-").isdigit():
            values.append(int(token))
        elif token.lower() in names:
            values.append(names.index(token.lower()) + 1)
        else:
            known = f" or one of {', '.join(class_names)}" if class_names else ""
            raise InputError(f"class {token!r}: expected a label value 1..K{known}")
    return ObjectSettings(tuple(values)).classes


@dataclass
class ObjectTable:
    """One row per object (``index`` = its id in the instances image), plus totals per class."""

    columns: dict[str, np.ndarray]
    totals: list[dict] = field(default_factory=list)
    unrefined: int = 0  # objects too large to fill or split within a block's memory

    def __len__(self) -> int:
        return len(self.columns["index"])

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        for row in zip(*(_csv_values(v) for v in self.columns.values())):
            writer.writerow(row)
        return out.getvalue()

    def save_csv(self, path) -> None:
        """The table as CSV, written atomically (a crash leaves the previous file or none)."""
        atomic_write_text(Path(path), self.to_csv())

    def summary(self) -> str:
        parts = [f"{t['class_name']}: {t['count']} object{'' if t['count'] == 1 else 's'}, {t['volume_nm3'] / 1e9:.3g} µm³ "
                 f"({100 * t['volume_fraction']:.2f} % of the region)" for t in self.totals]
        return "; ".join(parts) if parts else "no objects"


def _csv_values(values: np.ndarray) -> list:
    if values.dtype.kind == "f":
        return [f"{v:.6g}" for v in values]
    return [str(v) for v in values.tolist()]


def read_table_csv(text: str) -> dict[str, np.ndarray]:
    """Columns of a table written by :meth:`ObjectTable.to_csv` (numbers as numbers)."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return {}
    columns = {}
    for name, values in zip(rows[0], zip(*rows[1:]) if len(rows) > 1 else [()] * len(rows[0])):
        try:
            columns[name] = np.array([float(v) for v in values]) if name != "class_name" else np.array(values)
        except ValueError:
            columns[name] = np.array(values)
        if name in ("index", "class", "voxels") and columns[name].dtype.kind == "f":
            columns[name] = columns[name].astype(np.int64)
    return columns


def _blocks(shape, block_shape) -> list[tuple[slice, ...]]:
    starts = [range(0, n, b) for n, b in zip(shape, block_shape)]
    return [tuple(slice(s, min(s + b, n)) for s, b, n in zip(start, block_shape, shape)) for start in product(*starts)]


def _check_block_shape(block_shape) -> tuple[int, int, int]:
    shape = tuple(int(b) for b in (block_shape if np.ndim(block_shape) else (block_shape,) * 3))
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"block shape {block_shape!r}: expected 3 whole numbers ≥ 1 (z, y, x)")
    return shape


class _Records:
    """Per id (index = id): class, voxel count, first voxel (flat raster index) and bounding box."""

    def __init__(self):
        self.parts: list[tuple] = []

    def add(self, cls, count, first, lo, hi) -> None:
        self.parts.append((cls, count, first, lo, hi))

    def arrays(self):
        if not self.parts:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                    np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64))
        cls, count, first, lo, hi = (np.concatenate(p) for p in zip(*self.parts))
        return cls, count, first, lo, hi


def _stats(labelled, n: int, start, shape):
    """Per label 1..n of a box at ``start``: voxel count, first voxel (flat raster index in ``shape``) and
    bounding box (global, stop exclusive). No sort of the whole box: a few bytes per voxel at most."""
    from scipy import ndimage

    counts = np.bincount(labelled.ravel(), minlength=n + 1)[1:n + 1].astype(np.int64)
    boxes = ndimage.find_objects(labelled, max_label=n)
    lo = np.array([[s.start for s in box] for box in boxes], np.int64) + np.asarray(start)
    hi = np.array([[s.stop for s in box] for box in boxes], np.int64) + np.asarray(start)
    # The first voxel in z, y, x order of a set is its first within its own box (the order is lexicographic).
    first_zyx = [np.unravel_index(int(np.argmax(labelled[box].ravel() == k)), labelled[box].shape)
                 for k, box in enumerate(boxes, start=1)]
    first = np.ravel_multi_index(tuple((lo + np.asarray(first_zyx, np.int64).reshape(-1, 3)).T), shape)
    return counts, first.astype(np.int64), lo, hi


def _components(mask_block, start, shape):
    """6-connected components of one block's mask (labels 1..n) and their :func:`_stats`."""
    from scipy import ndimage

    comp, n = ndimage.label(mask_block)
    return comp, n, (_stats(comp, n, start, shape) if n else None)


def _merge(out, blocks, shape, classes_of, starts):
    """Pairs of provisional ids of one class that touch across a block face -> component of each id.

    ``out`` holds each block's ids 1..n; block ``i``'s provisional ids are those plus ``starts[i]``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(classes_of)
    index = {tuple(s.start for s in block): i for i, block in enumerate(blocks)}
    pairs = []
    for i, block in enumerate(blocks):
        for axis in range(3):
            stop = block[axis].stop
            if stop >= shape[axis]:
                continue
            low = list(block)
            low[axis] = slice(stop - 1, stop)
            high = list(block)
            high[axis] = slice(stop, stop + 1)
            j = index[tuple(stop if a == axis else s.start for a, s in enumerate(block))]
            a, b = np.asarray(out[tuple(low)]).ravel(), np.asarray(out[tuple(high)]).ravel()
            both = (a > 0) & (b > 0)
            a, b = a[both].astype(np.int64) - 1 + starts[i], b[both].astype(np.int64) - 1 + starts[j]
            same = classes_of[a] == classes_of[b]
            if same.any():
                pairs.append(np.unique(np.stack([a[same], b[same]], axis=1), axis=0))
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _refine(mask, fill_holes: bool, split_depth_nm: float, voxel_size):
    """The object's voxels after filling holes, and its pieces (labels 1..m in the mask's box)."""
    from scipy import ndimage

    if fill_holes:  # background pieces that do not reach the box's faces are holes (one labelling pass)
        background, _ = ndimage.label(~mask)
        faces = np.concatenate([np.take(background, i, axis=a).ravel() for a in range(3) for i in (0, -1)])
        mask = mask | ((background > 0) & ~np.isin(background, np.unique(faces)))
    if split_depth_nm <= 0:
        return mask, mask.astype(np.int32)
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=voxel_size)[1:-1, 1:-1, 1:-1]
    seeds, n = ndimage.label(h_maxima(distance, split_depth_nm), structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask, mask.astype(np.int32)
    return mask, watershed(-distance, seeds, mask=mask).astype(np.int32)


def find_objects(labels, grid: Grid, settings: ObjectSettings, out=None, probabilities=None, uncertainty=None,
                 class_names: Sequence[str] | None = None, block_shape=PREDICT_BLOCK,
                 refine_limit: int = REFINE_LIMIT, map_blocks=map) -> Generator[Progress, None, tuple]:
    """Objects of ``settings.classes`` in the class map ``labels`` (Z, Y, X; k = class k, on ``grid``).

    ``out``: a writable (Z, Y, X) uint32 array (numpy or zarr) for the instances; a new numpy array if None.
    ``probabilities`` (K, Z, Y, X) and ``uncertainty`` (Z, Y, X), when given, add each object's mean probability
    of its class and mean uncertainty to the table. Returns ``(out, ObjectTable)``.

    ``map_blocks(task, items)`` runs the per-block passes and yields their results in order: the builtin
    ``map`` here, :func:`~napari_dinofuse.distributed.block_mapper` on a dask cluster (then the arrays must be
    zarr arrays every worker opens, and ``out``'s chunks must tile the blocks: no two tasks share a chunk).
    """

    shape = tuple(int(n) for n in labels.shape)
    if len(shape) != 3 or shape != grid.shape:
        raise InputError(f"labels of shape {shape} do not match the grid {grid.shape}: expected one (Z, Y, X) map")
    block_shape = _check_block_shape(block_shape)
    if out is None:
        out = np.zeros(shape, np.uint32)
    voxel_size = np.asarray(grid.voxel_size)
    blocks = _blocks(shape, block_shape)
    refine = settings.fill_holes or settings.split_depth_nm > 0
    total, done = (5 if refine else 4) * len(blocks), 0

    # 1. components per block, numbered 1..n within their block; each block's ids start after the blocks before
    records, starts = _Records(), [0]
    for stats in map_blocks(partial(_label_block, labels, out, tuple(settings.classes), shape), blocks):
        records.add(*stats)
        starts.append(starts[-1] + len(stats[0]))
        done += 1
        yield Progress(done, total, f"objects: components, block {done}/{len(blocks)}")
    if starts[-1] >= 2**32 - 1:
        raise InputError("more than 4 billion pieces: choose fewer classes or a minimum size")

    # 2. merge across block faces: provisional id -> object (temporary ids 1..M in the order found), written out
    cls_of, count, first, lo, hi = records.arrays()
    component = _merge(out, blocks, shape, cls_of, starts) if len(cls_of) else np.zeros(0, np.int64)
    m = int(component.max()) + 1 if len(component) else 0
    obj_cls = np.zeros(m, np.int64)
    obj_cls[component] = cls_of
    obj_count = np.bincount(component, weights=count, minlength=m).astype(np.int64)
    obj_first = np.full(m, np.iinfo(np.int64).max)
    np.minimum.at(obj_first, component, first)
    obj_lo = np.full((m, 3), np.iinfo(np.int64).max)
    obj_hi = np.zeros((m, 3), np.int64)
    np.minimum.at(obj_lo, component, lo)
    np.maximum.at(obj_hi, component, hi)
    temporary = (component + 1).astype(np.uint32)
    items = [(block, np.concatenate([[0], temporary[starts[i]:starts[i + 1]]]).astype(np.uint32))
             for i, block in enumerate(blocks)]
    for _ in map_blocks(partial(_relabel_block, out), items):
        done += 1
        yield Progress(done, total, "objects: merged across blocks")

    # 3. refine each object in its box, in raster order of first voxels (so filled holes that two objects could
    # claim go to the same one whatever the blocks were). One process: objects may span blocks.
    unrefined, n_ids = 0, m
    if refine and m:
        stored, out = out, (out if isinstance(out, np.ndarray) else _HeldChunks(out, HELD_BYTES))
        extra = []
        for obj in np.argsort(obj_first, kind="stable"):
            box = tuple(slice(int(a), int(b)) for a, b in zip(obj_lo[obj], obj_hi[obj]))
            if int(np.prod(obj_hi[obj] - obj_lo[obj])) > refine_limit:
                unrefined += 1
                continue
            crop = read_region(out, box)  # uint32: ids up to n_ids
            own = crop == obj + 1
            mask, pieces = _refine(own, settings.fill_holes, settings.split_depth_nm, voxel_size)
            outside = ~(mask & (own | (crop == 0)))  # never take another object's voxels
            pieces[outside] = 0
            present = np.flatnonzero(np.bincount(pieces.ravel())[1:]) + 1
            renumber = np.zeros(int(pieces.max()) + 1, np.int32)
            renumber[present] = np.arange(1, len(present) + 1)
            pieces = renumber[pieces]  # pieces numbered 1..n
            count_k, first_k, lo_k, hi_k = _stats(pieces, len(present), [s.start for s in box], shape)
            new_ids = np.array([obj + 1] + list(range(n_ids + 1, n_ids + len(present))), np.int64)
            n_ids += len(present) - 1
            obj_count[obj], obj_first[obj], obj_lo[obj], obj_hi[obj] = count_k[0], first_k[0], lo_k[0], hi_k[0]
            extra.extend((obj_cls[obj], count_k[k], first_k[k], lo_k[k], hi_k[k]) for k in range(1, len(present)))
            out[box] = np.where(outside, crop, new_ids[pieces - 1].astype(np.uint32))
        if out is not stored:
            out.flush()
            out = stored
        if extra:
            cls_e, count_e, first_e, lo_e, hi_e = (np.array(v) for v in zip(*extra))
            obj_cls, obj_count = np.concatenate([obj_cls, cls_e]), np.concatenate([obj_count, count_e])
            obj_first = np.concatenate([obj_first, first_e])
            obj_lo, obj_hi = np.concatenate([obj_lo, lo_e]), np.concatenate([obj_hi, hi_e])
        done += len(blocks)
        yield Progress(done, total, f"objects: holes filled, touching objects split ({m - unrefined} of {m})")
        if unrefined:
            yield Progress(done, total, f"warning: {unrefined} objects span more than {refine_limit:,} voxels and "
                                        "were not filled or split (their memory would not be bounded)")

    # 4. minimum size, numbering by first voxel, measurements (all blocks read before any is renumbered: a block
    # measures its faces against its neighbours' ids), then the final ids written
    voxel_volume = float(np.prod(voxel_size))
    keep = np.flatnonzero(obj_count * voxel_volume >= settings.min_size_nm3)
    keep = keep[np.argsort(obj_first[keep], kind="stable")]
    mapping = np.zeros(n_ids + 1, np.int32)
    mapping[keep + 1] = np.arange(1, len(keep) + 1)
    class_index = np.concatenate([[0], obj_cls[keep] - 1])
    acc = _Measures(len(keep), voxel_size, probabilities is not None, uncertainty is not None)
    measure = partial(_measure_block, out, shape, voxel_size, mapping, class_index, probabilities, uncertainty)
    for part in map_blocks(measure, blocks):
        acc.merge(part)
        done += 1
        yield Progress(done, total, "objects: measuring")
    for _ in map_blocks(partial(_renumber_block, out, mapping), blocks):
        done += 1
        yield Progress(done, total, "objects: numbering")
    return out, _table(acc, grid, obj_cls[keep], obj_lo[keep], obj_hi[keep], settings, class_names, unrefined)


# -- block tasks: module functions of picklable arguments, so a dask worker can run them -----------------------

def _label_block(labels, out, classes, shape, block):
    """Components of the chosen classes in one block, numbered 1..n there and written into ``out``; their
    class, voxel count, first voxel and bounding box (:class:`_Records` fields)."""
    values = read_region(labels, block)
    ids = np.zeros(values.shape, np.uint32)
    start = [s.start for s in block]
    records, n_ids = _Records(), 0
    for cls in classes:
        comp, n, stats = _components(values == cls, start, shape)
        if n == 0:
            continue
        ids[comp > 0] = comp[comp > 0] + n_ids
        records.add(np.full(n, cls), *stats)
        n_ids += n
    out[block] = ids
    return records.arrays()


def _relabel_block(out, item) -> None:
    block, lookup = item
    out[block] = lookup[np.asarray(read_region(out, block))]


def _renumber_block(out, mapping, block) -> None:
    out[block] = mapping[np.asarray(read_region(out, block), np.int64)].astype(np.uint32)


def _measure_block(out, shape, voxel_size, mapping, class_index, probabilities, uncertainty, block) -> _Measures:
    part = _Measures(len(class_index) - 1, voxel_size, probabilities is not None, uncertainty is not None)
    part.add(block, shape, mapping, out, class_index, probabilities, uncertainty)
    return part


class _HeldChunks:
    """A zarr array read and written through whole chunks held in memory, the least recently used written back
    beyond ``budget`` bytes. Refining objects one box at a time straight on zarr rewrites a whole compressed chunk
    per object: minutes for a few thousand small objects; objects come in raster order, so chunks are reused."""

    def __init__(self, array, budget: int):
        self.array, self.budget = array, budget
        self.shape, self.dtype = tuple(array.shape), array.dtype
        self.chunks = tuple(int(c) for c in array.chunks)
        self._held: OrderedDict = OrderedDict()  # chunk index -> [data, written]

    def _pieces(self, box):
        """(chunk data, where in the chunk, where in the box) for each chunk the box touches."""
        ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(box, self.chunks)]
        for index in product(*ranges):
            lo = [i * c for i, c in zip(index, self.chunks)]
            if index in self._held:
                self._held.move_to_end(index)
            else:
                whole = tuple(slice(a, min(a + c, n)) for a, c, n in zip(lo, self.chunks, self.shape))
                self._held[index] = [np.asarray(self.array[whole]), False]
            a = [max(s.start, l) for s, l in zip(box, lo)]
            b = [min(s.stop, l + c) for s, l, c in zip(box, lo, self.chunks)]
            yield (index, tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo)),
                   tuple(slice(x - s.start, y - s.start) for x, y, s in zip(a, b, box)))

    def __getitem__(self, box) -> np.ndarray:
        values = np.empty(tuple(s.stop - s.start for s in box), self.dtype)
        touched = 0
        for index, in_chunk, in_box in self._pieces(box):
            values[in_box] = self._held[index][0][in_chunk]
            touched += 1
        self._release(keep=touched)
        return values

    def __setitem__(self, box, values) -> None:
        values = np.broadcast_to(values, tuple(s.stop - s.start for s in box))
        touched = 0
        for index, in_chunk, in_box in self._pieces(box):
            held = self._held[index]
            held[0][in_chunk], held[1] = values[in_box], True
            touched += 1
        self._release(keep=touched)

    def _release(self, keep: int) -> None:
        """Write back and drop the least recently used chunks beyond the budget, never the last ``keep``."""
        size = sum(data.nbytes for data, _ in self._held.values())
        while size > self.budget and len(self._held) > keep:
            index, (data, written) = self._held.popitem(last=False)
            self._write(index, data, written)
            size -= data.nbytes

    def _write(self, index, data, written) -> None:
        if written:
            lo = [i * c for i, c in zip(index, self.chunks)]
            self.array[tuple(slice(a, a + n) for a, n in zip(lo, data.shape))] = data

    def flush(self) -> None:
        while self._held:
            index, (data, written) = self._held.popitem(last=False)
            self._write(index, data, written)


class _Measures:
    """Sums per final object id over the blocks: voxels, coordinates, surface, probability, uncertainty."""

    def __init__(self, n: int, voxel_size, with_probability: bool, with_uncertainty: bool):
        self.voxel_size = np.asarray(voxel_size, float)
        self.count = np.zeros(n + 1, np.int64)
        self.coords = np.zeros((3, n + 1))
        self.faces = np.zeros(n + 1)
        self.probability = np.zeros(n + 1) if with_probability else None
        self.uncertainty = np.zeros(n + 1) if with_uncertainty else None

    def merge(self, other: _Measures) -> None:
        for name in ("count", "coords", "faces", "probability", "uncertainty"):
            mine = getattr(self, name)
            if mine is not None:
                mine += getattr(other, name)

    def add(self, block, shape, mapping, out, class_index, probabilities, uncertainty) -> None:
        core = tuple(s.stop - s.start for s in block)
        # The block and one more plane on each high side (ids mapped here: ``out`` is renumbered only after
        # every block is measured), 0 beyond the volume: each voxel face is counted once, by the block
        # holding its low side; faces on the volume's low border are added below. int32 ids and per-plane
        # counts keep the temporaries to a few bytes per voxel.
        grown = tuple(slice(s.start, min(s.stop + 1, n)) for s, n in zip(block, shape))
        ext = np.zeros(tuple(c + 1 for c in core), np.int32)
        part = mapping[np.asarray(read_region(out, grown))]
        ext[tuple(slice(0, n) for n in part.shape)] = part
        del part
        ids = np.ascontiguousarray(ext[:core[0], :core[1], :core[2]])
        size = len(self.count)
        for axis in range(3):
            for i in range(core[axis]):
                plane = np.bincount(np.take(ids, i, axis=axis).ravel(), minlength=size)
                self.coords[axis] += plane * float(block[axis].start + i)
                if axis == 0:
                    self.count += plane
            area = float(np.prod(self.voxel_size) / self.voxel_size[axis])
            ahead = ext[tuple(slice(1, c + 1) if a == axis else slice(0, c) for a, c in enumerate(core))]
            differ = ids != ahead
            self.faces += area * (np.bincount(ids[differ], minlength=size) + np.bincount(ahead[differ],
                                                                                          minlength=size))
            if block[axis].start == 0:
                self.faces += area * np.bincount(np.take(ids, 0, axis=axis).ravel(), minlength=size)
        self.faces[0] = 0
        inside = np.flatnonzero(ids)
        if not len(inside):
            return
        owner = ids.ravel()[inside]
        if self.probability is not None:
            probs = np.asarray(read_region(probabilities, (slice(None), *block)))
            picked = probs.reshape(len(probs), -1)[class_index[owner], inside]
            self.probability += np.bincount(owner, picked.astype(np.float64), minlength=size)
        if self.uncertainty is not None:
            values = np.asarray(read_region(uncertainty, block)).ravel()[inside]
            self.uncertainty += np.bincount(owner, values.astype(np.float64), minlength=size)


def _table(acc: _Measures, grid: Grid, cls, lo, hi, settings: ObjectSettings, class_names, unrefined: int):
    vs, off = np.asarray(grid.voxel_size), np.asarray(grid.offset)
    count = acc.count[1:]
    voxels = np.maximum(count, 1)
    names = list(class_names) if class_names is not None else None
    columns = {
        "index": np.arange(1, len(count) + 1),
        "class": np.asarray(cls, np.int64),
        "class_name": np.array([names[c - 1] if names else f"class {c}" for c in cls], dtype=object),
        "voxels": count,
        "volume_nm3": count * float(np.prod(vs)),
        "surface_nm2": acc.faces[1:] * _FACE_TO_AREA,
    }
    for axis, a in enumerate("zyx"):
        columns[f"centroid_{a}_nm"] = off[axis] + vs[axis] * acc.coords[axis, 1:] / voxels
    for axis, a in enumerate("zyx"):  # outer faces of the box, as napari's bounding boxes
        columns[f"bbox_start_{a}_nm"] = off[axis] + vs[axis] * (np.asarray(lo, float)[:, axis] - 0.5)
        columns[f"bbox_stop_{a}_nm"] = off[axis] + vs[axis] * (np.asarray(hi, float)[:, axis] - 0.5)
    if acc.probability is not None:
        columns["mean_probability"] = acc.probability[1:] / voxels
    if acc.uncertainty is not None:
        columns["mean_uncertainty"] = acc.uncertainty[1:] / voxels
    region = float(np.prod(grid.shape) * np.prod(vs))
    totals = []
    for c in settings.classes:
        volume = float(columns["volume_nm3"][columns["class"] == c].sum())
        totals.append({"class": c, "class_name": names[c - 1] if names else f"class {c}",
                       "count": int((columns["class"] == c).sum()), "volume_nm3": volume,
                       "volume_fraction": volume / region})
    return ObjectTable(columns, totals, unrefined)


# -- on a saved prediction ------------------------------------------------------------------------------------

def _tiling_chunks(block_shape) -> tuple:
    """Chunks of at most 256 per axis that tile the blocks exactly, so block tasks never share a chunk."""
    return tuple(next(c for c in range(min(b, 256), 0, -1) if b % c == 0) for b in block_shape)


def open_prediction(folder):
    """A dinofuse prediction folder's root group, refusing anything else with a clear message."""
    import zarr

    from ..defaults import PREDICTION_KIND
    from .outputs import store_kind

    path = Path(folder).expanduser().absolute()
    if path.is_file() or not path.exists():
        raise InputError(f"{path} is {'a file' if path.is_file() else 'missing'}: expected a prediction folder "
                         "written by `dinofuse predict` (OUT.zarr)")
    if store_kind(path) != PREDICTION_KIND:
        raise InputError(f"{path} is not a dinofuse prediction (written by `dinofuse predict`)")
    for name in ("labels", "probabilities"):
        if not (path / name).is_dir():
            raise InputError(f"{path} has no {name}: it is incomplete; predict again to write it")
    return zarr.open_group(str(path), mode="r")


def objects_in_prediction(folder, settings: ObjectSettings, block_shape=PREDICT_BLOCK,
                          refine_limit: int = REFINE_LIMIT, map_blocks=map) -> Generator[Progress, None, ObjectTable]:
    """Find objects in a saved prediction and write them beside its labels: ``instances`` (an OME-Zarr labels
    image, uint32) holding ``measurements.csv``, and the totals per class in its attributes.

    Written into a hidden sibling and swapped in only when complete; the previous ``instances``, if any, stays
    until then (a cancelled or failed run leaves it as it was)."""
    import shutil

    import zarr

    from ..atomic import recover, siblings, staging, swap_in
    from ..io import create_ome_image, open_volume

    root = open_prediction(folder)
    path = Path(folder).expanduser().absolute()
    probabilities = root["probabilities/0"]
    info = dict(root.attrs["dinofuse"])
    names = info.get("class_names")
    settings.check_classes(int(probabilities.shape[0]), names)
    labels = open_volume(path / "labels")
    grid = Grid(labels.shape, labels.voxel_size, labels.offset)
    uncertainty = root["uncertainty/0"] if (path / "uncertainty").is_dir() else None
    block_shape = _check_block_shape(block_shape)

    target = path / "instances"
    recover(target)
    for stale in siblings(target, "partial"):  # left by a crashed run: never complete
        shutil.rmtree(stale, ignore_errors=True)
    staged = staging(target, "partial")
    try:
        group = zarr.open_group(str(staged), mode="w", zarr_format=3)
        out = create_ome_image(group, "instances", labels.shape, np.uint32, grid,
                               chunks=_tiling_chunks(block_shape))
        out, table = yield from find_objects(labels.data, grid, settings, out, probabilities, uncertainty, names,
                                             block_shape, refine_limit, map_blocks)
        group.attrs["dinofuse"] = {"settings": {"classes": list(settings.classes),
                                                "min_size_nm3": settings.min_size_nm3,
                                                "fill_holes": settings.fill_holes,
                                                "split_depth_nm": settings.split_depth_nm},
                                   "totals": table.totals, "unrefined": table.unrefined}
        atomic_write_text(staged / "measurements.csv", table.to_csv())
        swap_in(staged, target)
    except BaseException:  # cancelled (GeneratorExit), a full disk, a bug: the previous instances stay
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if "instances" not in info.get("outputs", []):
        writable = zarr.open_group(str(path), mode="r+")
        writable.attrs["dinofuse"] = {**info, "outputs": [*info.get("outputs", []), "instances"]}
    return table
