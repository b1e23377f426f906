"""On-disk feature cache: one zarr v3 store per (data, model, settings) signature.

Layout of an entry ``<root>/<key>/``::

    signature.json      what the features were computed from (written last: no file, no entry)
    features.zarr/      one float16 array per plane family: xy (and xz, yz for ortho),
                        each (C, Z, ceil(Y/16), ceil(X/16)) at patch resolution
    done/<plane>-<unit>.json   one marker per finished unit of work: a checksum of its bytes and the size
                               and modification time of its chunk files when they were written
    done/units.json     the markers of all units checked so far, in one file (a cache hit reads it alone)

A unit (an xy slice, or a 16-plane block of xz / yz planes) counts as present only when its marker
exists, and the marker is written after its data. A run killed mid-write therefore leaves that unit
unmarked and it is recomputed. Readers never take unmarked data as valid. Each extraction folds the
markers written since the last one into ``units.json`` (after the same checks as any finished unit,
below), then deletes them; markers written by earlier versions are folded in the same way.

The root also keeps ``inputs/``: what was computed from each input volume read from local files (its
content hash, its intensity range), reused while its files keep their sizes and modification times.

Damage is caught at three depths. Every chunk carries a CRC32C (zarr codec) that every read checks, so a
damaged or truncated chunk is never returned as features: the read fails and unmarks the damaged units.
Each extraction re-checksums the units whose chunk files changed size or modification time since their
marker was written (a few stat calls per unit, not a re-read of the features); ``verify(full=True)``
re-checksums every unit.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_text
from ..errors import CacheError
from ..io import file_backing, sample_digest

FORMAT_VERSION = 2  # 2: CRC32C per chunk, CRC-32 + file stats in markers (1 still reads)
CACHE_ENV = "DINOFUSE_CACHE"
PLANE_SETS = {"xy": ("xy",), "ortho": ("xy", "xz", "yz")}
# Axis of the (C, Z, GY, GX) array that one unit of each plane family fills: one index along it.
_UNIT_AXIS = {"xy": 1, "xz": 2, "yz": 3}
_MAX_CHUNK_BYTES = 32 * 2**20
_PART_OF_CHUNK = 8  # a read of less than 1/8 of a chunk maps its file instead of reading and checking it whole
# Input files modified less than this before their stats were taken are not trusted: a rewrite within the same
# tick of a coarse clock (FAT: 2 s) would keep both size and time.
_RACY_NS = 2 * 10**9


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-dinofuse")) / "features"


def signature_key(signature: dict) -> str:
    canonical = json.dumps(signature, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def checksum(block: np.ndarray, kind: str = "crc32") -> str:
    """A checksum of an array's bytes: CRC-32 (several GB/s; markers of format 1 used BLAKE2b)."""
    data = np.ascontiguousarray(block)
    if kind == "blake2b":
        return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
    return f"{zlib.crc32(data):08x}"


def _file_stat(path: Path | str) -> list[int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:  # zarr deletes a chunk that equals the fill value
        return None
    return [st.st_size, st.st_mtime_ns]


def _recall(path: Path, where: str, files: list[Path], data) -> dict | None:
    """The record of what was computed from ``data`` if its files are as they were then, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if (record["where"] == where and isinstance(record["values"], dict)
                and record["state"] == _files_state(files, record["taken"])
                and record["sample"] == sample_digest(data)):
            return record
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none yet, or not one of ours
        pass
    return None


def _files_state(files: list[Path], taken: int) -> str | None:
    """A digest of the files' sizes and modification times; None when one was modified less than ``_RACY_NS``
    before ``taken`` (it could change again within its time stamp's tick, unseen)."""
    stats = [_file_stat(p) for p in files]
    if any(stat is not None and stat[1] >= taken - _RACY_NS for stat in stats):
        return None
    return hashlib.blake2b(json.dumps(stats).encode(), digest_size=16).hexdigest()


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class FeatureEntry:
    """The features of one volume under one signature."""

    def __init__(self, path: Path):
        self.path = Path(path)
        record = json.loads((self.path / "signature.json").read_text())
        self.signature: dict = record["signature"]
        self.info: dict = record.get("info", {})
        self.shape: tuple[int, int, int, int] = tuple(record["shape"])
        self.planes: tuple[str, ...] = PLANE_SETS[self.signature["planes"]]
        # Each plane's chunk shape when its chunk files are plain (see _plain_chunks), read from its zarr.json:
        # opening the arrays through zarr took 1.3 ms of a cache hit, and only reads or writes of other layouts
        # need zarr (opened then, see _arrays).
        self._plain = {plane: _plain_chunks(self.path / "features.zarr" / plane / "zarr.json") for plane in self.planes}
        self._direct = {plane: chunk is not None for plane, chunk in self._plain.items()}
        # Per plane, the chunk coordinates of a unit but its own (one unit per chunk along its axis) and how a
        # chunk's file is named: a cache hit builds the path of every unit's chunk files. Plain ones also as the
        # text before and after the unit's index ("c/i/<unit>/k/l"): joining three strings is 4x cheaper than
        # encoding the key.
        self._across, self._chunk_key, self._path_parts = {}, {}, {}
        for plane, chunk in self._plain.items():
            axis = _UNIT_AXIS[plane]
            grid = self._arrays[plane].cdata_shape if chunk is None else [-(-n // c) for n, c in zip(self.shape, chunk)]
            across = self._across[plane] = list(itertools.product(*(range(n) for a, n in enumerate(grid) if a != axis)))
            if chunk is None:
                self._chunk_key[plane] = self._arrays[plane].metadata.chunk_key_encoding.encode_chunk_key
                continue
            self._chunk_key[plane] = _plain_chunk_key
            folder = f"{self.path}/features.zarr/{plane}/c/"
            self._path_parts[plane] = [(folder + "".join(f"{i}/" for i in c[:axis]), "".join(f"/{i}" for i in c[axis:]))
                                       for c in across]
        self._known_complete = False  # once true, reads skip listing the markers

    @functools.cached_property
    def _arrays(self) -> dict:
        """The planes' zarr arrays, opened on first use."""
        import zarr

        group = zarr.open_group(str(self.path / "features.zarr"), mode="r+")
        return {plane: group[plane] for plane in self.planes}

    key = property(lambda self: self.path.name)

    # -- units -----------------------------------------------------------------------------------

    def unit_count(self, plane: str) -> int:
        return self.shape[_UNIT_AXIS[plane]]

    def _unit_region(self, plane: str, unit: int):
        region = [slice(None)] * 4
        region[_UNIT_AXIS[plane]] = unit
        return tuple(region)

    def _marker(self, plane: str, unit: int) -> Path:
        return self.path / "done" / f"{plane}-{unit:07d}.json"

    def done_units(self, plane: str) -> set[int]:
        return set(self._folded()[0].get(plane, {})) | self._loose(plane)

    def _loose(self, plane: str) -> set[int]:
        """Units with a marker of their own (not yet folded into units.json)."""
        prefix = f"{plane}-"
        return {int(p.stem[len(prefix):]) for p in (self.path / "done").glob(f"{prefix}*.json")}

    def _folded(self) -> tuple[dict[str, dict[int, dict]], int]:
        """units.json: {plane: {unit: marker}}, and its modification time (the time its markers were taken)."""
        try:
            with open(self.path / "done" / "units.json", encoding="utf-8") as f:
                written = os.fstat(f.fileno()).st_mtime_ns
                record = json.load(f)
            return {plane: {int(u): m for u, m in units.items()} for plane, units in record.items()}, written
        except (FileNotFoundError, ValueError):  # none yet, or damaged: its units are recomputed
            return {}, 0

    def _write_folded(self, folded: dict[str, dict[int, dict]]) -> None:
        # fsync: the markers it replaces are deleted next; losing both in a crash would recompute every unit.
        atomic_write_text(self.path / "done" / "units.json", json.dumps(folded, separators=(",", ":")))

    def _unmark(self, plane: str, units) -> None:
        for unit in units:
            self._marker(plane, unit).unlink(missing_ok=True)
        folded, _ = self._folded()
        if any(unit in folded.get(plane, {}) for unit in units):
            for unit in units:
                folded[plane].pop(unit, None)
            self._write_folded(folded)

    def _chunk_coords(self, plane: str, unit: int) -> list[tuple[int, ...]]:
        """The chunks that hold one unit (one along its axis, usually one in all)."""
        axis = _UNIT_AXIS[plane]
        return [c[:axis] + (unit,) + c[axis:] for c in self._across[plane]]

    def _chunk_files(self, plane: str, unit: int) -> list[Path]:
        return [Path(p) for p in self._chunk_paths(plane, unit)]

    def _chunk_paths(self, plane: str, unit: int) -> list[str]:
        """The unit's chunk files as strings: a cache hit stats those of every unit, and pathlib's joins cost
        more than the stat calls."""
        parts = self._path_parts.get(plane)
        if parts is not None:
            return [f"{before}{unit}{after}" for before, after in parts]
        return [self._chunk_path(plane, c) for c in self._chunk_coords(plane, unit)]

    def _chunk_path(self, plane: str, coords) -> str:
        return f"{self.path}/features.zarr/{plane}/{self._chunk_key[plane](coords)}"

    def _marker_record(self, plane: str, unit: int, digest: str) -> dict:
        return {"crc32": digest, "chunks": [_file_stat(p) for p in self._chunk_paths(plane, unit)]}

    def _write_marker(self, plane: str, unit: int, digest: str) -> None:
        # No fsync: a marker lost in a crash only means a recomputation; a chunk lost or cut short in one no
        # longer matches the size recorded here and is rechecked (or fails its CRC32C when read).
        atomic_write_text(self._marker(plane, unit), json.dumps(self._marker_record(plane, unit, digest)),
                          fsync=False)

    def write_unit(self, plane: str, unit: int, block: np.ndarray) -> None:
        """Write one unit's features, then (only then) its marker."""
        self.write_units(plane, [unit], [block])

    def write_units(self, plane: str, units, blocks) -> None:
        """Write several units' features, then (only then) their markers."""
        blocks = [np.ascontiguousarray(b, dtype=np.float16) for b in blocks]
        for unit, block in zip(units, blocks):
            if self._direct[plane]:
                self._write_chunks(plane, unit, block)
            else:
                self._arrays[plane][self._unit_region(plane, unit)] = block
        for unit, block in zip(units, blocks):
            self._write_marker(plane, unit, checksum(block))

    def _write_chunks(self, plane: str, unit: int, block: np.ndarray) -> None:
        """Write one unit's chunk files as zarr would (see :func:`_plain_chunks`), each through a rename.

        Not through zarr: all zarr calls of a process share one event loop, so the writer threads queued behind
        each other there and held up the main thread's reads of the next slices (the pipeline reached 0.45 of
        the bare ViT on the H200); plain file writes release the GIL and run side by side.
        """
        import google_crc32c

        axis = _UNIT_AXIS[plane]
        chunk = self._plain[plane]
        block = np.expand_dims(block, axis)  # the unit's index along its axis: 0 here
        for coords, path in zip(self._chunk_coords(plane, unit), self._chunk_files(plane, unit)):
            start = [c * n for c, n in zip(coords, chunk)]
            start[axis] = 0
            part = block[tuple(slice(a, a + n) for a, n in zip(start, chunk))]
            if part.shape != tuple(chunk):  # an edge chunk is stored whole, filled with the fill value (0)
                part = np.pad(part, [(0, n - m) for n, m in zip(chunk, part.shape)])
            part = np.ascontiguousarray(part, dtype="<f2")
            part.flags.writeable = False  # the CRC32C takes read-only buffers only
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, [part, np.uint32(google_crc32c.value(part)).astype("<u4").tobytes()],
                               fsync=False)

    def _unchanged(self, plane: str, unit: int, record: dict, written: int) -> bool:
        """Whether the unit's chunk files are exactly as when its marker was written at ``written`` (ns; stat
        calls only).

        A recorded modification time as new as ``written`` is not trusted: on file systems with coarse
        timestamps a rewrite in the same tick would keep it (git's "racily clean" files).
        """
        recorded = record.get("chunks")
        if not recorded or recorded != [_file_stat(p) for p in self._chunk_paths(plane, unit)]:
            return False
        return all(stat is not None and stat[1] < written for stat in recorded)

    def verify(self, plane: str, full: bool = False) -> list[int]:
        """Re-checksum the finished units whose chunk files changed since they were marked (every unit when
        ``full``); unmark (so they are recomputed) those that are damaged; fold the markers of single units
        into units.json. Returns the damaged units."""
        folded, written = self._folded()
        kept, loose = folded.get(plane, {}), self._loose(plane)
        markers, bad, rewrite = {}, [], bool(loose)
        for unit in sorted(kept.keys() | loose):
            try:
                if unit in loose:  # newer than its entry in units.json, if any
                    marker = self._marker(plane, unit)
                    record, taken = json.loads(marker.read_text()), marker.stat().st_mtime_ns
                else:
                    record, taken = kept[unit], written
                if not full and self._unchanged(plane, unit, record, taken):
                    markers[unit] = record
                    continue
                kind = "crc32" if "crc32" in record else "blake2b"  # format 1 markers: BLAKE2b
                block = np.asarray(self._arrays[plane][self._unit_region(plane, unit)])
                ok = checksum(block, kind) == record[kind]
            except Exception:  # unreadable marker or chunk (a failed CRC32C, a truncated file): same remedy
                ok = False
            rewrite = True
            if ok:  # intact: record the files as they are now, so the next run trusts them without reading
                markers[unit] = self._marker_record(plane, unit, record[kind] if kind == "crc32" else checksum(block))
            else:
                bad.append(unit)
        if rewrite:  # units.json first: a crash between the two steps leaves markers in both, never in none
            folded[plane] = markers
            self._write_folded(folded)
            for unit in loose:
                self._marker(plane, unit).unlink(missing_ok=True)
        return bad

    @property
    def fraction_done(self) -> float:
        total = sum(self.unit_count(p) for p in self.planes)
        return sum(len(self.done_units(p)) for p in self.planes) / total

    @property
    def complete(self) -> bool:
        return all(len(self.done_units(p)) == self.unit_count(p) for p in self.planes)

    # -- reading ---------------------------------------------------------------------------------

    def read(self, region=(slice(None),) * 3) -> np.ndarray:
        """Features (C, z, gy, gx) of a region of the patch grid; ortho planes are averaged.

        Raises CacheError when the region includes units that are not finished.
        """
        region = tuple(region) + (slice(None),) * (3 - len(region))
        for plane in () if self._known_complete else self.planes:
            axis = _UNIT_AXIS[plane]
            needed = set(range(self.shape[axis])[region[axis - 1]])
            missing = needed - self.done_units(plane)
            if missing:
                raise CacheError(f"features of {self.info.get('source', 'this volume')} are incomplete "
                                 f"({len(missing)} {plane} units missing): run the extraction again to finish them")
        self._known_complete = self._known_complete or self.complete
        full = (slice(None), *region)
        try:
            if len(self.planes) == 1:
                return self._read_plane(self.planes[0], full)
            total = sum(self._read_plane(p, full).astype(np.float32) for p in self.planes)
            return (total / len(self.planes)).astype(np.float16)
        except Exception as exc:  # a chunk failed its CRC32C or is cut short: unmark what is damaged
            bad = self._unmark_damaged(region)
            self._known_complete = False
            raise CacheError(f"features of {self.info.get('source', 'this volume')} are damaged on disk "
                             f"({len(bad)} units; {type(exc).__name__}: {exc}): run the extraction again to "
                             "recompute them") from None

    def _read_plane(self, plane: str, region) -> np.ndarray:
        """One plane family's features over ``region`` (4 slices), from the chunk files directly where they are
        as :meth:`_write_chunks` writes them (each checked against its CRC32C), else through zarr.

        Not through zarr for the same reason as the writes: its one event loop serialises the prediction's
        reader thread behind every other zarr call of the process."""
        bounds = [range(n)[s] for n, s in zip(self.shape, region)]
        if not self._direct[plane] or any(b.step != 1 for b in bounds):
            return np.asarray(self._arrays[plane][region])
        import google_crc32c

        chunk = self._plain[plane]
        size = math.prod(chunk)
        out = np.zeros([len(b) for b in bounds], np.float16)  # zarr's fill value, for chunks never stored
        if out.size == 0:
            return out
        for coords in itertools.product(*(range(b.start // n, (b.stop - 1) // n + 1) for b, n in zip(bounds, chunk))):
            path = self._chunk_path(plane, coords)
            source, target = [], []
            for c, n, b in zip(coords, chunk, bounds):
                lo, hi = max(b.start, c * n), min(b.stop, (c + 1) * n)
                source.append(slice(lo - c * n, hi - c * n))
                target.append(slice(lo - b.start, hi - b.start))
            source, target = tuple(source), tuple(target)
            try:
                if math.prod(s.stop - s.start for s in source) * _PART_OF_CHUNK < size:
                    # A small part of a large chunk (a training tile's 2 x 2 patches of a slice's 128 x 128, a
                    # prediction block's 32 x 32): mapped, so only the pages it lies on are read. Whole chunks read
                    # and checked made a training tile of ViT-L features of 2048^2 slices take 0.35 s, a block's
                    # features 0.81 s. The size is checked here; the CRC32C where a read takes most of a chunk and
                    # by `dinofuse extract --verify` (a file changed by any write is re-checked by the next
                    # extraction: its size or time differ from its marker's).
                    if os.stat(path).st_size != 2 * size + 4:
                        raise ValueError(f"chunk {path} is cut short")
                    out[target] = np.memmap(path, "<f2", mode="r", shape=chunk)[source]
                    continue
                with open(path, "rb") as file:
                    data = file.read()
            except FileNotFoundError:
                continue
            if len(data) != 2 * size + 4:
                raise ValueError(f"chunk {path} is cut short")
            body = np.frombuffer(data, "<f2", count=size)  # read-only, no copy: what the CRC32C takes
            if google_crc32c.value(body) != int.from_bytes(data[-4:], "little"):
                raise ValueError(f"chunk {path} fails its CRC32C")
            out[target] = body.reshape(chunk)[source]
        return out

    def _unmark_damaged(self, region) -> list[tuple[str, int]]:
        bad = []
        for plane in self.planes:
            axis = _UNIT_AXIS[plane]
            damaged = []
            for unit in range(self.shape[axis])[region[axis - 1]]:
                try:
                    np.asarray(self._arrays[plane][self._unit_region(plane, unit)])
                except Exception:
                    damaged.append(unit)
            self._unmark(plane, damaged)
            bad += [(plane, unit) for unit in damaged]
        return bad

    def nbytes_on_disk(self) -> int:
        return _folder_bytes(self.path)


@dataclass(frozen=True)
class EntrySummary:
    key: str
    path: Path
    source: str
    backbone: str
    planes: str
    shape: tuple[int, ...]
    fraction_done: float
    nbytes: int
    created: float


class FeatureCache:
    """A folder of feature entries, keyed by signature."""

    def __init__(self, root=None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def entry(self, signature: dict, shape, info: dict | None = None) -> FeatureEntry:
        """The entry for ``signature``: reused when it exists, created empty otherwise."""
        if signature.get("planes") not in PLANE_SETS:
            raise CacheError(f"unknown planes {signature.get('planes')!r}: use one of {sorted(PLANE_SETS)}")
        path = self.root / signature_key(signature)
        if (path / "signature.json").is_file():
            entry = FeatureEntry(path)
            if entry.signature == signature:
                return entry
        return self._create(path, signature, tuple(int(s) for s in shape), info or {})

    def _create(self, path: Path, signature: dict, shape, info: dict) -> FeatureEntry:
        import zarr
        from zarr.codecs import Crc32cCodec

        if path.exists():  # a creation that died before signature.json: start it over
            shutil.rmtree(path)
        try:
            (path / "done").mkdir(parents=True)
        except OSError as exc:
            raise CacheError(f"cannot write the feature cache at {self.root} ({exc}): choose another cache "
                             "folder (--cache DIR or $DINOFUSE_CACHE)") from None
        group = zarr.open_group(str(path / "features.zarr"), mode="w")
        for plane in PLANE_SETS[signature["planes"]]:
            # fp16 features do not compress usefully; the CRC32C codec makes every read check its chunk.
            group.create_array(plane, shape=shape, chunks=_chunks(plane, shape), dtype="float16",
                               compressors=[Crc32cCodec()], fill_value=0)
        record = {"format": FORMAT_VERSION, "signature": signature, "shape": list(shape),
                  "info": {**info, "created": time.time()}}
        atomic_write_text(path / "signature.json", json.dumps(record, indent=1))
        return FeatureEntry(path)

    def remembered(self, data, compute: dict[str, Callable[[], object]], recheck: bool = False) -> dict:
        """``{name: compute[name]()}`` for the input array ``data``, computed once per version of its files.

        For an array read from local files (:func:`~napari_dinofuse.io.file_backing`) the values are kept in
        ``inputs/`` and reused while every file keeps its size and modification time and a sample of chunks
        reads the same: a few stat calls and reads instead of reading the whole volume again. Any other array,
        or ``recheck``, computes them afresh.
        """
        backing = file_backing(data)
        if backing is None:
            return {name: fn() for name, fn in compute.items()}
        where, files = backing
        path = self.root / "inputs" / f"{hashlib.blake2b(where.encode(), digest_size=12).hexdigest()}.json"
        record = None if recheck else _recall(path, where, files, data)
        if record is None:
            taken = time.time_ns()  # before the stats: a file written after them is newer than this
            record = {"where": where, "taken": taken, "state": _files_state(files, taken),
                      "sample": sample_digest(data), "values": {}}
        missing = {name: fn for name, fn in compute.items() if name not in record["values"]}
        if missing:
            record["values"].update({name: fn() for name, fn in missing.items()})
            if record["state"] is not None:  # None: files too new to be trusted next time
                try:  # not written (a read-only cache) or lost in a crash: computed again next time, no harm
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(path, json.dumps(record), fsync=False)
                except OSError:
                    pass
        return {name: record["values"][name] for name in compute}

    def entries(self) -> list[EntrySummary]:
        found = []
        if not self.root.is_dir():
            return found
        for path in sorted(self.root.iterdir()):
            if not (path / "signature.json").is_file():
                continue
            try:
                entry = FeatureEntry(path)
            except Exception:  # unreadable: still listed so it can be cleared
                found.append(EntrySummary(path.name, path, "(unreadable)", "?", "?", (), 0.0, _folder_bytes(path), 0))
                continue
            sig, info = entry.signature, entry.info
            found.append(EntrySummary(entry.key, path, info.get("source", "?"), sig.get("backbone", "?"),
                                      sig.get("planes", "?"), entry.shape, entry.fraction_done,
                                      entry.nbytes_on_disk(), info.get("created", 0.0)))
        return found

    def size_bytes(self) -> int:
        return _folder_bytes(self.root) if self.root.is_dir() else 0

    def clear(self, keys=None) -> int:
        """Delete the given entries (all when ``keys`` is None); returns the bytes freed."""
        if not self.root.is_dir():
            return 0
        freed = 0
        targets = [p for p in self.root.iterdir() if p.is_dir()] if keys is None else [self.root / k for k in keys]
        for path in targets:
            if not path.is_dir() or path.parent != self.root:
                raise CacheError(f"no cache entry {path.name!r} in {self.root}")
            freed += _folder_bytes(path)
            shutil.rmtree(path)
        return freed


def _plain_chunks(meta_path: Path) -> tuple[int, ...] | None:
    """The chunk shape of the zarr array described by ``meta_path`` (its zarr.json) if its chunk files are its
    little-endian float16 bytes and their CRC32C, keyed "c/i/j/k/l" (zarr v3's default), unstored chunks reading
    as 0: how :meth:`FeatureCache._create` makes them and what :meth:`FeatureEntry._write_chunks` writes without
    zarr. None for any other array (zarr reads and writes it)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        codecs = meta["codecs"]
        plain = (meta["zarr_format"] == 3 and meta["node_type"] == "array" and meta["data_type"] == "float16"
                 and meta["fill_value"] == 0 and meta["chunk_grid"]["name"] == "regular"
                 and not meta.get("storage_transformers")
                 and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                 and [c["name"] for c in codecs] == ["bytes", "crc32c"]
                 and codecs[0].get("configuration", {}).get("endian") == "little"
                 and not codecs[1].get("configuration"))
        return tuple(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]) if plain else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not readable as such: zarr decides
        return None


def _plain_chunk_key(coords) -> str:
    """The file of a chunk of a plain array (see :func:`_plain_chunks`), relative to the array's folder."""
    return "c/" + "/".join(map(str, coords))


def _chunks(plane: str, shape) -> tuple[int, ...]:
    """One unit per chunk along its axis, capped spatially so chunks stay a few tens of MB."""
    c, z, gy, gx = shape
    chunks = [c, z, gy, gx]
    chunks[_UNIT_AXIS[plane]] = 1
    for axis in (3, 2, 1):
        while int(np.prod(chunks)) * 2 > _MAX_CHUNK_BYTES and chunks[axis] > 1:
            chunks[axis] = max(1, chunks[axis] // 2)
    return tuple(chunks)


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
