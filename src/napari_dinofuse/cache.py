"""On-disk feature cache: one zarr v3 store per (data, model, settings) signature.

Layout of an entry ``<root>/<key>/``::

    signature.json      what the features were computed from (written last: no file, no entry)
    features.zarr/      one float16 array per plane family: xy (and xz, yz for ortho),
                        each (C, Z, ceil(Y/16), ceil(X/16)) at patch resolution
    done/<plane>-<unit>.json   one marker per finished unit of work, with a checksum of its bytes

A unit (an xy slice, or a 16-plane block of xz / yz planes) counts as present only when its marker
exists, and the marker is written after its data. A run killed mid-write therefore leaves that unit
unmarked and it is recomputed; a chunk damaged later fails its checksum on verification and is
recomputed too. Readers never take unmarked data as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DinofuseError

FORMAT_VERSION = 1
CACHE_ENV = "DINOFUSE_CACHE"
PLANE_SETS = {"xy": ("xy",), "ortho": ("xy", "xz", "yz")}
# Axis of the (C, Z, GY, GX) array that one unit of each plane family fills: one index along it.
_UNIT_AXIS = {"xy": 1, "xz": 2, "yz": 3}
_MAX_CHUNK_BYTES = 32 * 2**20


class CacheError(DinofuseError):
    """A cache folder that cannot be used."""


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-dinofuse")) / "features"


def signature_key(signature: dict) -> str:
    canonical = json.dumps(signature, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def checksum(block: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(block).tobytes(), digest_size=16).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class FeatureEntry:
    """The features of one volume under one signature."""

    def __init__(self, path: Path):
        import zarr

        self.path = Path(path)
        record = json.loads((self.path / "signature.json").read_text())
        self.signature: dict = record["signature"]
        self.info: dict = record.get("info", {})
        self.shape: tuple[int, int, int, int] = tuple(record["shape"])
        self.planes: tuple[str, ...] = PLANE_SETS[self.signature["planes"]]
        group = zarr.open_group(str(self.path / "features.zarr"), mode="r+")
        self._arrays = {plane: group[plane] for plane in self.planes}
        self._known_complete = False  # once true, reads skip listing the markers

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
        prefix = f"{plane}-"
        return {int(p.stem[len(prefix):]) for p in (self.path / "done").glob(f"{prefix}*.json")}

    def write_unit(self, plane: str, unit: int, block: np.ndarray) -> None:
        """Write one unit's features, then (only then) its marker."""
        block = np.ascontiguousarray(block, dtype=np.float16)
        self._arrays[plane][self._unit_region(plane, unit)] = block
        atomic_write_text(self._marker(plane, unit), json.dumps({"blake2b": checksum(block)}))

    def verify(self, plane: str) -> list[int]:
        """Re-read every finished unit; unmark (so they are recomputed) those that are damaged."""
        bad = []
        for unit in sorted(self.done_units(plane)):
            marker = self._marker(plane, unit)
            try:
                expected = json.loads(marker.read_text())["blake2b"]
                ok = checksum(np.asarray(self._arrays[plane][self._unit_region(plane, unit)])) == expected
            except Exception:  # unreadable marker or chunk: same remedy
                ok = False
            if not ok:
                marker.unlink(missing_ok=True)
                bad.append(unit)
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
        if len(self.planes) == 1:
            return np.asarray(self._arrays[self.planes[0]][full])
        total = sum(np.asarray(self._arrays[p][full], dtype=np.float32) for p in self.planes)
        return (total / len(self.planes)).astype(np.float16)

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

        if path.exists():  # a creation that died before signature.json: start it over
            shutil.rmtree(path)
        try:
            (path / "done").mkdir(parents=True)
        except OSError as exc:
            raise CacheError(f"cannot write the feature cache at {self.root} ({exc}): choose another cache "
                             "folder (--cache DIR or $DINOFUSE_CACHE)") from None
        group = zarr.open_group(str(path / "features.zarr"), mode="w")
        for plane in PLANE_SETS[signature["planes"]]:
            group.create_array(plane, shape=shape, chunks=_chunks(plane, shape), dtype="float16",
                               compressors=None, fill_value=0)
        record = {"format": FORMAT_VERSION, "signature": signature, "shape": list(shape),
                  "info": {**info, "created": time.time()}}
        atomic_write_text(path / "signature.json", json.dumps(record, indent=1))
        return FeatureEntry(path)

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
