"""Open volumes from disk (zarr / OME-Zarr, TIFF, npy) as lazily read :class:`Volume` objects.

Nothing here loads a whole volume: zarr stays zarr, npy is memory-mapped, TIFF is memory-mapped when
uncompressed. Voxel size and offset come from the file's metadata unless given explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .defaults import VOLUME_SUFFIXES
from .errors import DinofuseError, GeometryError
from .geometry import Volume

_UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "micron": 1e3, "um": 1e3, "µm": 1e3,
               "\\u00B5m": 1e3, "millimeter": 1e6, "mm": 1e6, "angstrom": 0.1, "picometer": 1e-3}


class VolumeReadError(DinofuseError):
    """A file that cannot be opened as a volume."""


def open_volume(path, voxel_size=None, offset=None, name: str | None = None, level: int = 0,
                voxel_size_hint: str = "voxel_size=(z, y, x)") -> Volume:
    """Open ``path`` as a :class:`Volume`; explicit ``voxel_size``/``offset`` (nm, z,y,x) win over metadata.

    ``voxel_size_hint`` names the option the user should pass when the file carries no voxel size.
    """
    path = Path(path).expanduser()
    name = name or path.stem
    if not path.exists():
        raise VolumeReadError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise VolumeReadError(f"resolution level {level!r}: expected a whole number >= 0 (0: full resolution)")
    try:
        if suffix == ".zarr" or (path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zarray", ".zgroup"))):
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
    return Volume(_squeeze_leading(data, path), voxel_size, offset, name=name)


def _squeeze_leading(data, path: Path):
    """OME-Zarr and TIFF often carry singleton t/c axes in front of z, y, x."""
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    return data


def _open_zarr(path: Path, level: int):
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        if level:
            raise VolumeReadError(f"{path} is a single zarr array with one resolution level; level {level} exists "
                                  "only in OME-Zarr images (leave the level out)")
        return node, None, None
    attrs = dict(node.attrs)
    multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        arrays = sorted(name for name, _ in node.arrays())
        raise VolumeReadError(f"{path} is a zarr group without OME-Zarr multiscales metadata; open one of its "
                              f"arrays instead ({', '.join(str(path / a) for a in arrays) or 'it has none'})")
    image = multiscales[0]
    datasets = image["datasets"]
    if not 0 <= level < len(datasets):
        raise VolumeReadError(f"{path} has {len(datasets)} resolution levels; level {level} does not exist")
    data = node[datasets[level]["path"]]
    axes = image.get("axes") or [{"name": a} for a in "zyx"[-data.ndim:]]
    scale, translation = _ome_transforms(image.get("coordinateTransformations", []))
    level_scale, level_translation = _ome_transforms(datasets[level].get("coordinateTransformations", []))
    scale = np.asarray(level_scale if level_scale is not None else np.ones(len(axes))) * (
        scale if scale is not None else 1.0)
    translation = np.asarray(level_translation if level_translation is not None else np.zeros(len(axes))) + (
        translation if translation is not None else 0.0)
    spatial = [i for i, a in enumerate(axes) if (a.get("type") == "space" or a.get("name") in "zyx")]
    if len(spatial) != 3:
        return data, None, None
    units = [_UNIT_TO_NM.get(str(axes[i].get("unit", "nanometer")).lower()) for i in spatial]
    if any(u is None for u in units):
        raise VolumeReadError(f"{path}: unknown axis unit in {[axes[i].get('unit') for i in spatial]}")
    to_nm = np.asarray(units)
    return data, tuple(scale[spatial] * to_nm), tuple(translation[spatial] * to_nm)


def _ome_transforms(transforms):
    scale = translation = None
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
                units[axis] = _UNIT_TO_NM.get((u.group(1) if u else "µm").lower(), 1e3)
        if len(sizes) == 3:
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
    parallelise their own reads) and their digests hashed in order: at most 4 slabs of ~2 MB in memory.
    """
    from concurrent.futures import ThreadPoolExecutor

    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([list(data.shape), str(np.dtype(data.dtype))]).encode())
    nbytes = int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    z = data.shape[0]
    workers = 1 if hasattr(data, "dask") else max(1, min(4, os.cpu_count() or 1))
    if nbytes <= full_limit_bytes:
        step = max(1, (2 * 2**20) // max(1, nbytes // z))  # ~2 MB slabs, the same on every machine
        parts = [slice(z0, z0 + step) for z0 in range(0, z, step)]
    else:
        parts = [int(zi) for zi in np.unique(np.linspace(0, z - 1, sample_slices).round().astype(int))]
        parts.append(tuple(slice(None, None, max(1, n // 64)) for n in data.shape))

    def part_digest(region) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(read_region(data, region)).data, digest_size=16).digest()

    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(part_digest, parts):
            digest.update(part)
    return digest.hexdigest()
