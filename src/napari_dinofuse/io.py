"""Open volumes from disk (zarr / OME-Zarr, TIFF, HDF5, npy) as lazily read :class:`Volume` objects.

Nothing here loads a whole volume: zarr stays zarr, HDF5 stays an h5py dataset, npy is memory-mapped, TIFF is
memory-mapped when uncompressed. Voxel size and offset come from the file's metadata unless given explicitly.
The one OME-Zarr image writer (:func:`create_ome_image`) of every store the package writes lives here too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
from pathlib import Path

import numpy as np

from .defaults import HDF5_SUFFIXES, VOLUME_SUFFIXES
from .errors import DinofuseError, GeometryError, VolumeReadError
from .geometry import Grid, Volume

# Length units as NGFF (UDUNITS names), OME-XML (symbols) and ImageJ/Fiji (which writes µm as the escaped
# text \u00B5m) spell them; keys lower-case, as looked up.
_UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "micron": 1e3, "um": 1e3, "µm": 1e3, "μm": 1e3,
               "\\u00b5m": 1e3, "millimeter": 1e6, "mm": 1e6, "angstrom": 0.1, "å": 0.1, "picometer": 1e-3,
               "pm": 1e-3}


def open_volume(path, voxel_size=None, offset=None, name: str | None = None, level: int = 0,
                voxel_size_hint: str = "voxel_size=(z, y, x)") -> Volume:
    """Open ``path`` as a :class:`Volume`; explicit ``voxel_size``/``offset`` (nm, z,y,x) win over metadata.

    HDF5 volumes are addressed as ``file.h5/path/to/dataset`` (or the file alone when it holds one volume);
    the file stays open read-only for as long as the returned data lives, since it is read lazily.
    ``voxel_size_hint`` names the option the user should pass when the file carries no voxel size.
    """
    path = Path(path).expanduser()
    name = name or path.stem
    hdf5 = _split_hdf5(path)
    if not (hdf5[0] if hdf5 else path).exists():
        raise VolumeReadError(f"{hdf5[0] if hdf5 else path}: no such file or folder")
    suffix = path.suffix.lower()
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise VolumeReadError(f"resolution level {level!r}: expected a whole number >= 0 (0: full resolution)")
    try:
        if hdf5:
            data, meta_vs, meta_off = _open_hdf5(*hdf5)
        elif suffix == ".zarr" or (path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zarray", ".zgroup"))):
            data, meta_vs, meta_off = _open_zarr(path, level)
        elif level and suffix in (".tif", ".tiff", ".npy"):  # reading level 0 instead would pass for the level asked
            raise VolumeReadError(f"{path}: {suffix} files have one resolution level; level {level} exists only "
                                  "in OME-Zarr images (leave the level out, or give the OME-Zarr)")
        elif suffix in (".tif", ".tiff"):
            data, meta_vs, meta_off = _open_tiff(path)
        elif suffix == ".npy":
            data, meta_vs, meta_off = np.load(path, mmap_mode="r", allow_pickle=False), None, None
        else:
            raise VolumeReadError(f"{path}: unsupported format {suffix or '(none)'}; use one of {', '.join(VOLUME_SUFFIXES)}")
    except DinofuseError:
        raise
    except Exception as exc:  # corrupt files surface as many exception types
        raise VolumeReadError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    voxel_size = voxel_size if voxel_size is not None else meta_vs
    if voxel_size is None:
        raise GeometryError(f"{path} carries no voxel size in its metadata: pass {voxel_size_hint} (nm)")
    offset = offset if offset is not None else (meta_off if meta_off is not None else (0.0, 0.0, 0.0))
    return Volume(_squeeze_leading(data), voxel_size, offset, name=name)


def _squeeze_leading(data):
    """OME-Zarr, TIFF and HDF5 often carry singleton t/c axes in front of z, y, x: drop them, still lazily."""
    if data.ndim > 3 and data.shape[0] == 1 and not isinstance(data, np.ndarray):
        import dask.array as da

        # zarr and h5py read what they are indexed with (data[0] would load the volume): index a dask view.
        data = da.from_array(data, chunks=getattr(data, "chunks", None) or "auto", name=False)
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    return data


def _unit_to_nm(unit, path: Path) -> float:
    nm = _UNIT_TO_NM.get(str(unit).strip().lower())
    if nm is None:  # a guess would put the volume in the wrong place
        raise VolumeReadError(f"{path}: unknown length unit {unit!r} in its metadata")
    return nm


def _split_hdf5(path: Path) -> tuple[Path, str] | None:
    """(file, path inside it) when ``path`` is an HDF5 file or names something inside one, else None."""
    for i, part in enumerate(path.parts):
        file = Path(*path.parts[: i + 1])
        if Path(part).suffix.lower() in HDF5_SUFFIXES and not file.is_dir():
            return file, "/".join(path.parts[i + 1:])
    return None


def _open_hdf5(file: Path, inner: str):
    import h5py

    if not h5py.is_hdf5(file):
        raise VolumeReadError(f"{file} is not an HDF5 file")
    # Left open (read-only) on purpose: the dataset reads lazily for as long as the volume or napari layer lives.
    handle = h5py.File(file, "r")
    node = handle.get(inner or "/")
    if node is None:
        raise VolumeReadError(f"{file} has no dataset {inner!r} ({_hdf5_listing(handle, file)})")
    if isinstance(node, h5py.Group):
        volumes = [d for d in _hdf5_datasets(node) if d.ndim >= 3]
        if inner:
            raise VolumeReadError(f"{file}/{inner} is a group: open one of its datasets ({_hdf5_listing(node, file)})")
        if len(volumes) != 1:  # only a file with a single volume in it is unambiguous
            what = f"{len(volumes)} volumes: open one as {file}/PATH" if volumes else "no 3D dataset"
            raise VolumeReadError(f"{file} holds {what} ({_hdf5_listing(node, file)})")
        node = volumes[0]
    attrs = node.attrs
    voxel_size = offset = None
    if "resolution" in attrs:  # CREMI: nm, z, y, x
        voxel_size = tuple(np.asarray(attrs["resolution"], float).ravel())
    elif "element_size_um" in attrs:  # Fiji's HDF5 plugin, ilastik: µm, z, y, x
        voxel_size = tuple(np.asarray(attrs["element_size_um"], float).ravel() * 1e3)
    if "offset" in attrs:  # CREMI: nm, z, y, x
        offset = tuple(np.asarray(attrs["offset"], float).ravel())
    return node, voxel_size, offset


def hdf5_volumes(file) -> list[str]:
    """The 3D+ datasets of an HDF5 file, as paths :func:`open_volume` takes (``file.h5/path/to/dataset``)."""
    import h5py

    with h5py.File(file, "r") as handle:
        return [f"{file}{d.name}" for d in _hdf5_datasets(handle) if d.ndim >= 3]


def _hdf5_datasets(group) -> list:
    found = []
    group.visititems(lambda _, obj: found.append(obj) if hasattr(obj, "shape") else None)
    return found


def _hdf5_listing(group, file: Path) -> str:
    """The datasets under ``group`` with their shapes: what the user can open instead."""
    datasets = [f"{file}{d.name} {d.shape}" for d in _hdf5_datasets(group)]
    return f"its datasets: {', '.join(datasets)}" if datasets else "it holds no dataset"


def _open_zarr(path: Path, level: int):
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        if level:
            raise VolumeReadError(f"{path} is a single zarr array with one resolution level; level {level} exists "
                                  "only in OME-Zarr images (leave the level out)")
        return node, None, None
    attrs = dict(node.attrs)
    multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")  # NGFF 0.5, 0.4
    if not multiscales:
        arrays = sorted(name for name, _ in node.arrays())
        raise VolumeReadError(f"{path} is a zarr group without OME-Zarr multiscales metadata; open one of its "
                              f"arrays instead ({', '.join(str(path / a) for a in arrays) or 'it has none'})")
    image = multiscales[0]
    datasets = image["datasets"]
    if not 0 <= level < len(datasets):
        raise VolumeReadError(f"{path} has {len(datasets)} resolution levels; level {level} does not exist")
    data = node[datasets[level]["path"]]
    # NGFF 0.3 listed axes as bare names.
    axes = [a if isinstance(a, dict) else {"name": a} for a in image.get("axes") or "zyx"[-data.ndim:]]
    level_scale, level_translation = _ome_transforms(datasets[level].get("coordinateTransformations", []), len(axes))
    scale, translation = _ome_transforms(image.get("coordinateTransformations", []), len(axes))
    # The multiscale's own transform applies after the level's.
    scale, translation = level_scale * scale, level_translation * scale + translation
    spatial = [i for i, a in enumerate(axes) if a.get("type") == "space"
               or ("type" not in a and a.get("name") in ("z", "y", "x"))]
    if len(spatial) != 3:
        return data, None, None
    to_nm = np.asarray([_unit_to_nm(axes[i].get("unit", "nanometer"), path) for i in spatial])
    return data, tuple(scale[spatial] * to_nm), tuple(translation[spatial] * to_nm)


def _ome_transforms(transforms, ndim: int):
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for t in transforms:
        if t.get("type") == "scale":
            scale = np.asarray(t["scale"], float)
        elif t.get("type") == "translation":
            translation = np.asarray(t["translation"], float)
    return scale, translation


def _open_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        page = series.pages[0]
        voxel_size = _tiff_voxel_size(tif, page, series.ndim)
    try:
        data = tifffile.memmap(path, mode="r")  # uncompressed, contiguous: zero-copy
    except ValueError:
        data = tifffile.imread(path)  # compressed TIFFs are decoded once
    return data, voxel_size, None


def _tiff_voxel_size(tif, page, ndim: int):
    """Voxel size in nm from ImageJ or OME metadata, or None."""
    if tif.is_ome and tif.ome_metadata:
        import re

        text = tif.ome_metadata
        sizes, units = {}, {}
        for axis in "XYZ":
            m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', text)
            u = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', text)
            if m:
                sizes[axis] = float(m.group(1))
                units[axis] = u.group(1) if u else "µm"  # OME's default unit
        if len(sizes) == 3 and "pixel" not in units.values():  # "pixel": uncalibrated
            units = {a: _unit_to_nm(unit, tif.filehandle.path) for a, unit in units.items()}
            return tuple(sizes[a] * units[a] for a in "ZYX")
    if tif.is_imagej and tif.imagej_metadata:
        meta = tif.imagej_metadata
        unit = _UNIT_TO_NM.get(str(meta.get("unit", "")).lower())
        x_res = page.tags.get("XResolution")
        y_res = page.tags.get("YResolution")
        spacing = meta.get("spacing")
        if unit and x_res and y_res and spacing:
            x = x_res.value[1] / x_res.value[0]
            y = y_res.value[1] / y_res.value[0]
            return (float(spacing) * unit, y * unit, x * unit)
    return None


def read_region(data, region) -> np.ndarray:
    """``data[region]`` as a numpy array, whatever the backing (numpy, memmap, zarr, dask)."""
    block = data[region]
    if hasattr(block, "compute"):
        block = block.compute()
    return np.asarray(block)


def content_hash(data, full_limit_bytes: int = 256 * 2**20, sample_slices: int = 32) -> str:
    """A content identity of a volume, computed in bounded time.

    Arrays up to ``full_limit_bytes`` are hashed whole (slab by slab, bounded memory). Larger ones hash
    ``sample_slices`` evenly spaced whole z-slices plus a strided sample through the rest: any change of
    acquisition, crop, contrast or dtype changes the hash, at a cost independent of the volume size.
    The parts are read and hashed on a few threads (hashlib and zarr's decoders release the GIL; dask arrays
    parallelise their own reads) and their digests hashed in order. Whole parts are ~2 MB slabs, read together
    up to the storage's next chunk boundary along z (each chunk decoded once): at most 4 reads of 64 MB in memory.
    """
    from concurrent.futures import ThreadPoolExecutor

    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([list(data.shape), str(np.dtype(data.dtype))]).encode())
    nbytes = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    z = data.shape[0]
    workers = 1 if hasattr(data, "dask") else max(1, min(4, os.cpu_count() or 1))
    if nbytes <= full_limit_bytes:
        step = max(1, (2 * 2**20) // max(1, nbytes // z))  # ~2 MB parts, the same on every machine
        span = math.lcm(step, _storage_chunks(data)[0])
        span = span if span * (nbytes // z) <= 64 * 2**20 else step
        reads = [(slice(z0, z0 + span), step) for z0 in range(0, z, span)]
    else:
        reads = [(int(zi), None) for zi in np.unique(np.linspace(0, z - 1, sample_slices).round().astype(int))]
        reads.append((tuple(slice(None, None, max(1, n // 64)) for n in data.shape), None))

    def part_digests(read) -> list[bytes]:
        region, step = read
        block = np.ascontiguousarray(read_region(data, region))
        parts = [block[i:i + step] for i in range(0, len(block), step)] if step else [block]
        return [hashlib.blake2b(part.data, digest_size=16).digest() for part in parts]

    with ThreadPoolExecutor(workers) as pool:
        for parts in pool.map(part_digests, reads):
            for part in parts:
                digest.update(part)
    return digest.hexdigest()


def _storage_chunks(data) -> tuple[int, ...]:
    """The blocks ``data`` is stored (and best read) in: its chunks, or one z-slice when it has none."""
    chunks = getattr(data, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == len(data.shape) and all(isinstance(c, int) for c in chunks):
        return chunks
    return (1, *data.shape[1:])  # none (numpy, an unchunked HDF5 dataset), or dask's per-axis tuples


def file_backing(data) -> tuple[str, list[str]] | None:
    """(what ``data`` is, the paths of the files it is read from) when it is read straight from local files that
    only change by being written: a zarr array in a local store (its metadata and every chunk or shard file,
    present or not), a read-only memory map of a whole array, an HDF5 dataset opened read-only (its file). None
    for anything else (arrays in memory, dask, remote stores, writable maps, which change without their files'
    times changing). Paths as strings: a cache hit stats every chunk file, and pathlib's joins cost more than
    the stat calls."""
    if isinstance(data, np.memmap):
        if not isinstance(data.base, mmap.mmap) or data.flags.writeable:  # a view of a map, or writable
            return None
        path = Path(data.filename).resolve()
        return f"memmap {path} {data.offset} {data.shape} {data.dtype.str} {data.strides}", [str(path)]
    if type(data).__module__.startswith("h5py"):
        handle = data.file
        if handle.mode != "r" or handle.driver != "sec2":  # written here, or held in memory ("core")
            return None
        path = Path(handle.filename).resolve()
        return f"hdf5 {path} {data.name}", [str(path)]
    folder = _local_zarr_folder(data)
    if folder is not None:
        folder = folder.resolve()
        unit = data.shards or data.chunks  # what one file holds
        grid = itertools.product(*(range(-(-n // c)) for n, c in zip(data.shape, unit)))
        key = data.metadata.encode_chunk_key
        return f"zarr {folder}", [f"{folder}/{name}" for name in ("zarr.json", ".zarray", ".zattrs")] + [
            f"{folder}/{key(c)}" for c in grid]
    return None


def sample_digest(data, count: int = 8, budget_bytes: int = 8 * 2**20) -> str:
    """A check of a few whole storage chunks spread evenly through ``data`` (at most ``count``, about
    ``budget_bytes`` of data): a cheap check of content that complements file sizes and times. Chunks of an
    unsharded zarr array in a local folder are checked as stored (their files' bytes, not decoded: a cache hit
    pays a few file reads), any other array's as read. Each chunk's CRC32C: a check for changes, not an
    identity (:func:`content_hash` is that), and ~10x faster than a cryptographic hash (a third of a cache hit
    took BLAKE2b)."""
    import google_crc32c

    chunks = _storage_chunks(data)
    grid = [-(-n // c) for n, c in zip(data.shape, chunks)]
    block_bytes = int(np.prod(chunks)) * np.dtype(data.dtype).itemsize
    count = int(np.clip(budget_bytes // max(1, block_bytes), 1, count))
    folder = _local_zarr_folder(data) if getattr(data, "shards", None) is None else None
    checks = []
    for flat in np.unique(np.linspace(0, int(np.prod(grid)) - 1, count).round().astype(int)):
        index = tuple(int(i) for i in np.unravel_index(flat, grid))
        if folder is None:
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
            chunk = np.ascontiguousarray(read_region(data, region)).view()  # a view: the caller's flags stay
            chunk.flags.writeable = False  # the CRC32C takes read-only buffers only
        else:
            try:
                chunk = Path(folder, data.metadata.encode_chunk_key(index)).read_bytes()
            except FileNotFoundError:  # a chunk equal to the fill value is not stored
                checks.append("not stored")
                continue
        checks.append(f"{memoryview(chunk).nbytes}:{google_crc32c.value(chunk):08x}")
    return "crc32c " + " ".join(checks)


def _local_zarr_folder(data) -> Path | None:
    """The folder of a zarr array in a local store (its chunk files lie there), or None."""
    if not type(data).__module__.startswith("zarr"):
        return None
    from zarr.storage import LocalStore

    store = getattr(data, "store", None)
    return Path(store.root) / data.path if isinstance(store, LocalStore) else None


def create_ome_image(group, name: str, shape, dtype, grid: Grid, chunks):
    """A single-level OME-Zarr 0.5 image in ``group``: array ``0`` plus multiscales metadata placing it in nm."""
    shape = tuple(int(v) for v in shape)
    lead = len(shape) - 3
    chunks = tuple(max(1, min(int(c), v)) for c, v in zip(chunks, shape))
    array = group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                               dimension_names=["c", "z", "y", "x"][-len(shape):], overwrite=True)
    axes = [{"name": "c", "type": "channel"}] * lead + [
        {"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    transforms = [{"type": "scale", "scale": [1.0] * lead + list(grid.voxel_size)},
                  {"type": "translation", "translation": [0.0] * lead + list(grid.offset)}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [
        {"name": name, "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}]}
    return array
