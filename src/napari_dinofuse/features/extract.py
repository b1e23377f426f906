"""Chunked, resumable DINOv3 feature extraction over whole volumes.

Slices go through the 2D ViT in batches; slices wider than ``tile_size`` are cut into tiles aligned to
the 16-pixel patch grid, overlapping by at least two patches, and stitched at patch resolution (each
patch taken from the tile where it lies farthest from an edge). Features are stored at patch resolution,
float16, ``(C, Z, ceil(Y/16), ceil(X/16))``, in a :class:`~napari_dinofuse.features.cache.FeatureCache` entry.

``ortho`` also runs the ViT on xz and yz planes; their features are block-averaged over each 16-plane
block and linearly interpolated along z onto the same grid, and a read averages the three.

:func:`extract_features` is a generator: it yields :class:`Progress` between batches, so any driver can
show progress and stop it (``close()``) at a batch boundary; every finished unit stays in the cache.

xy batches are written by background threads (:class:`_Writer`) while the next batch runs through the
ViT: the device waits for the disk only when all writers are busy, and host memory holds at most a few batches
per writer thread.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .. import __version__
from ..errors import InputError, MemoryRetryWarning
from ..geometry import Grid, Volume, resample
from ..io import content_hash, read_region
from ..modeling.unet import ContextWindow
from ..progress import Progress, drive, within
from .backbone import PATCH_SIZE, Backbone, intensity_range, to_unit_range
from .cache import PLANE_SETS, FeatureCache, FeatureEntry

DEFAULT_TILE_SIZE = 1024
CONTEXT_POOLING = 4  # the context encoder pools by at most 2 x 2 per axis
_WINDOW_ALIGN = np.array([CONTEXT_POOLING, PATCH_SIZE, PATCH_SIZE])  # where context windows start (see context_window)
MIN_OVERLAP_PATCHES = 2


MIN_TILE_SIZE = 2 * PATCH_SIZE * (MIN_OVERLAP_PATCHES + 1)  # two tiles' overlap must leave each some core
MAX_BATCH_SIZE = 4096  # slices per forward pass; more is a typo (even 4096 ViT-S slices need tens of GiB)


@dataclass(frozen=True)
class ExtractionSettings:
    """How features are extracted; validated on creation, so every driver refuses bad values before loading a
    backbone. ``batch_size`` None: 16 slices per forward pass on CUDA, 4 otherwise."""

    planes: str = "xy"
    tile_size: int = DEFAULT_TILE_SIZE
    batch_size: int | None = None

    def __post_init__(self) -> None:
        def bad(name, what):
            raise InputError(f"extraction setting {name} = {getattr(self, name)!r}: {what}")

        if not isinstance(self.planes, str) or self.planes not in PLANE_SETS:
            bad("planes", f"expected one of {', '.join(PLANE_SETS)}")
        t = self.tile_size
        if isinstance(t, bool) or not isinstance(t, int) or t % PATCH_SIZE or t < MIN_TILE_SIZE:
            bad("tile_size", f"expected a multiple of {PATCH_SIZE} pixels, at least {MIN_TILE_SIZE} "
                f"(default {DEFAULT_TILE_SIZE})")
        b = self.batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH_SIZE):
            bad("batch_size", f"expected a whole number from 1 to {MAX_BATCH_SIZE} slices (leave it out for "
                "16 on a GPU, 4 otherwise)")

    def batch_for(self, device) -> int:
        return self.batch_size or (16 if torch.device(device).type == "cuda" else 4)


def feature_grid(volume: Volume) -> Grid:
    """Where the xy patch-grid features of ``volume`` lie in the world."""
    return volume.grid.coarsen((1, PATCH_SIZE, PATCH_SIZE))


def resolve_intensity_mode(mode: str, dtype) -> str:
    if mode == "auto":  # 8-bit EM uses its full range; 16-bit and float data rarely do
        return "dtype" if np.dtype(dtype) == np.uint8 else "percentile"
    if mode not in ("dtype", "percentile"):
        raise InputError(f"unknown intensity normalisation {mode!r}: use auto, dtype or percentile")
    return mode


def feature_signature(volume: Volume, backbone: Backbone, planes: str, tile_size: int,
                      intensity: str = "auto", cache: FeatureCache | None = None, recheck: bool = False) -> dict:
    """Everything the features depend on. Equal signatures share a cache entry; any difference separates them.

    The data's part depends on its content alone; ``cache`` remembers it for inputs read from local files
    while they stay as they were (``recheck``: read the content again, see :meth:`FeatureCache.remembered`).
    """
    mode = resolve_intensity_mode(intensity, volume.dtype)
    known = (cache if cache is not None else FeatureCache()).remembered(volume.data, {
        "content_hash": lambda: content_hash(volume.data),
        f"intensity_range {mode}": lambda: intensity_range(volume.data, mode)}, recheck=recheck)
    low, high = known[f"intensity_range {mode}"]
    return {
        "data": known["content_hash"],
        "shape": list(volume.shape),
        "dtype": str(volume.dtype),
        "voxel_size": list(volume.voxel_size),
        "backbone": str(backbone.spec),
        "weights": backbone.fingerprint(),
        "normalization": backbone.normalization,
        "intensity": {"mode": mode, "low": low, "high": high},
        "planes": planes,
        "tile_size": int(tile_size),
        "patch_size": PATCH_SIZE,
        "version": __version__,
    }


def extract_features(volume: Volume, backbone: Backbone, cache: FeatureCache | None = None, *,
                     planes: str = "xy", tile_size: int = DEFAULT_TILE_SIZE, batch_size: int | None = None,
                     intensity: str = "auto", verify: str | bool = "changed"
                     ) -> Generator[Progress, None, FeatureEntry]:
    """Extract (or resume, or reuse) the patch-grid features of ``volume``; returns the cache entry.

    ``verify``: which finished units are re-checksummed (and recomputed if damaged) first: ``"changed"``
    those whose chunk files changed since they were marked (stat calls only), ``"all"`` (or True) every
    one (reads all the features, and the whole input to identify it), ``"none"`` (or False) none.
    """
    verify = {True: "all", False: "none"}.get(verify, verify)
    if verify not in ("changed", "all", "none"):
        raise InputError(f"unknown verify mode {verify!r}: use changed, all or none")
    batch_size = ExtractionSettings(planes, tile_size, batch_size).batch_for(backbone.device)
    yield Progress(0, 1, f"{volume.name}: identifying the data")
    entry = open_entry(volume, backbone, cache, planes=planes, tile_size=tile_size, intensity=intensity,
                       recheck=verify == "all")
    if verify != "none":
        for plane in entry.planes:
            entry.verify(plane, full=verify == "all")
    todo = missing_units(entry)
    total = sum(len(units) * _slices_per_unit(plane, volume.shape) for plane, units in todo.items())
    done = 0
    yield Progress(done, total, f"{volume.name}: {total} slices to extract" if total else
                   f"{volume.name}: features found in the cache")
    for plane, units in todo.items():
        yield from within(fill_units(volume, backbone, entry, plane, units, batch_size), done, total)
        done += len(units) * _slices_per_unit(plane, volume.shape)
        if units:
            entry.verify(plane)  # folds the new units' markers into one file: the next run reads that alone
    return entry


def open_entry(volume: Volume, backbone: Backbone, cache: FeatureCache | None = None, *, planes: str = "xy",
               tile_size: int = DEFAULT_TILE_SIZE, intensity: str = "auto", recheck: bool = False) -> FeatureEntry:
    """The cache entry for ``volume``'s features under these settings (created empty if new); ``recheck``:
    identify the input by reading it, even when its files are as they were."""
    ExtractionSettings(planes, tile_size)  # refuses bad values
    cache = cache if cache is not None else FeatureCache()
    signature = feature_signature(volume, backbone, planes, tile_size, intensity, cache, recheck)
    z, y, x = volume.shape
    shape = (backbone.embed_dim, z, -(-y // PATCH_SIZE), -(-x // PATCH_SIZE))
    return cache.entry(signature, shape, info={"source": volume.name, "offset": list(volume.offset)})


def missing_units(entry: FeatureEntry) -> dict[str, list[int]]:
    return {plane: sorted(set(range(entry.unit_count(plane))) - entry.done_units(plane)) for plane in entry.planes}


def _slices_per_unit(plane: str, shape) -> int:
    """Work is counted in 2D slices through the ViT, so ortho progress is honest about its cost."""
    return {"xy": 1, "xz": min(PATCH_SIZE, shape[1]), "yz": min(PATCH_SIZE, shape[2])}[plane]


def fill_units(volume: Volume, backbone: Backbone, entry: FeatureEntry, plane: str, units, batch_size: int = 4
               ) -> Generator[Progress, None, None]:
    """Compute and store the given units of ``entry``, yielding progress in slices after each batch.

    Units are independent, so any number of processes may fill different units of one entry at once.
    """
    signature = entry.signature
    extractor = _SliceExtractor(backbone, signature["tile_size"], signature["intensity"]["low"],
                                signature["intensity"]["high"], volume.name)
    batches = (_xy_units(volume, entry, units, batch_size, extractor) if plane == "xy" else
               _ortho_units(volume, entry, plane, units, batch_size, extractor))
    total, done = len(units) * _slices_per_unit(plane, volume.shape), 0
    try:
        for slices in batches:
            done += slices
            yield Progress(done, total, f"{volume.name}: {plane} planes")
    finally:
        batches.close()  # on Cancel: the writer stores what was computed


def compute_features(volume: Volume, backbone: Backbone, cache: FeatureCache | None = None, **kwargs) -> FeatureEntry:
    """:func:`extract_features` run to the end."""
    return drive(extract_features(volume, backbone, cache, **kwargs))


def extract_sources(raw: Volume, context: Volume | None, backbone: Backbone, cache: FeatureCache | None = None,
                    **kwargs) -> Generator[Progress, None, "FeatureSource"]:
    """Extract (or reuse) the raw's and the context's features; returns the :class:`FeatureSource`."""
    if context is not None:
        context.require_covers(raw)  # fail before spending any time on the ViT
    cache = cache if cache is not None else FeatureCache()
    raw_entry = yield from extract_features(raw, backbone, cache, **kwargs)
    context_entry = (yield from extract_features(context, backbone, cache, **kwargs)) if context is not None else None
    return FeatureSource(raw, raw_entry, context, context_entry)


class TileInputs(NamedTuple):
    """What the UNet reads for one tile, batch dimension 1, on the block's device."""

    raw: torch.Tensor  # (1, C, z, gy, gx) float32 raw features on the tile's patch grid
    context: ContextWindow | None  # the context window around the tile (see ContextWindow)
    intensity: torch.Tensor | None  # (1, 1, z, y, x) raw intensities in [0, 1]


class FeatureSource:
    """Features of the raw volume and a window of context around any tile of it.

    Tiles are given in raw voxels with y/x starts on the 16-pixel patch grid. The raw features are read as
    stored; the context (features and intensities) is read on its own grid over a window reaching
    ``margin_nm`` beyond the tile on every side (None: the context's whole field), so the model's context
    branch sees what lies around the tile and samples its result onto the tile in world coordinates.
    """

    def __init__(self, raw: Volume, raw_features: FeatureEntry, context: Volume | None = None,
                 context_features: FeatureEntry | None = None):
        if (context is None) != (context_features is None):
            raise InputError("context and its features come together")
        if context is not None:
            context.require_covers(raw)
        self.raw, self.raw_features = raw, raw_features
        self.context, self.context_features = context, context_features
        self.grid = feature_grid(raw)
        intensity = raw_features.signature["intensity"]
        self.low, self.high = intensity["low"], intensity["high"]

    @property
    def channels(self) -> tuple[int, int | None]:
        ctx = self.context_features.shape[0] if self.context_features is not None else None
        return self.raw_features.shape[0], ctx

    def tile(self, region, context: bool = True, intensity: bool = False, margin_nm: float | None = 1024.0,
             device="cpu", full_yx=None, halo=(0, 0, 0), window_shape=None) -> TileInputs:
        """The inputs of one tile: a one-tile :meth:`block` (``full_yx``, ``halo``, ``window_shape``: see
        :class:`BlockFeatures`)."""
        block = self.block(region, device, context=context, intensity=intensity, margin_nm=margin_nm, halo=halo,
                           window_shape=window_shape)
        return block.tile(region, full_yx=full_yx)

    def context_window(self, target: Grid, margin_nm: float | None, at_least=None) -> tuple[slice, slice, slice]:
        """Context voxels reaching ``margin_nm`` beyond ``target`` on every side (None: all of them), clipped
        to the context, with y/x on the context's patch grid. ``at_least``: a shape (e.g. :meth:`window_shape`)
        the window is widened to on its far sides, as far as the context reaches."""
        grid = self.context.grid
        if margin_nm is None:
            return tuple(slice(0, n) for n in grid.shape)
        if not margin_nm >= 0:
            raise InputError(f"the context margin must be >= 0 nm (or None for the whole field), got {margin_nm}")
        lo, hi = target.bounds
        first = np.floor(grid.world_to_index(lo - margin_nm) + 0.5).astype(int)
        last = np.floor(grid.world_to_index(hi + margin_nm) + 0.5).astype(int) + 1
        # Starts on a fixed lattice (z: the context encoder's pooling, y/x: the patch grid, a multiple of it), so
        # every window pools the same voxels together: windows of neighbouring blocks agree where they overlap.
        first = np.maximum(first // _WINDOW_ALIGN * _WINDOW_ALIGN, 0)
        last[1:] = -(-last[1:] // PATCH_SIZE) * PATCH_SIZE
        if at_least is not None:
            last = np.maximum(last, first + np.asarray(at_least, int))
        last = np.minimum(last, grid.shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(first, last))

    def window_shape(self, shape, margin_nm: float | None) -> tuple[int, int, int] | None:
        """The largest :meth:`context_window` of a target of ``shape`` raw voxels, wherever it lies: windows of
        same-shape tiles widened to it (``at_least``) are all alike away from the context's far faces, so a
        training step runs the context branch on them as one batch. None for the whole field."""
        if margin_nm is None:
            return None
        extent = (np.asarray(shape) * self.raw.voxel_size + 2 * margin_nm) / np.asarray(self.context.voxel_size)
        # The start floors to its lattice (up to align - 1 voxels lower), the stop rounds up to the patch grid
        # in y/x, and each end rounds to the nearest voxel.
        size = np.floor(extent + _WINDOW_ALIGN + (1, PATCH_SIZE, PATCH_SIZE)).astype(int)
        size[1:] = size[1:] // PATCH_SIZE * PATCH_SIZE  # both ends lie on the patch grid
        return tuple(int(n) for n in np.minimum(size, self.context.shape))

    def block(self, region, device="cpu", context: bool = True, intensity: bool = False,
              margin_nm: float | None = 1024.0, halo=(0, 0, 0), window_shape=None) -> BlockFeatures:
        """The inputs of all tiles inside ``region``, read once (see :class:`BlockFeatures`)."""
        return BlockFeatures(self, region, torch.device(device), context, intensity, margin_nm, halo, window_shape)


class BlockFeatures:
    """The inputs of one block (e.g. a prediction block's outer region), read once, tiles sliced from them.

    ``region``: raw voxels with y/x starts on the patch grid; the z start may be negative (slices before the
    volume, edge-padded like ``np.pad(mode="edge")``). The block's raw features (as stored, fp16), its
    intensities and one context window around the whole block are read once and kept on ``device``; every
    tile of the block shares that window, so a voxel's context does not depend on the tile it falls in.
    Intensities come with ``halo`` voxels of real neighbouring data around every tile (for the model's filter
    bank), edge-padded beyond the volume. ``window_shape``: the context window is widened to at least this
    shape (see :meth:`FeatureSource.window_shape`).
    """

    def __init__(self, source: FeatureSource, region, device: torch.device, context: bool, intensity: bool,
                 margin_nm: float | None = 1024.0, halo=(0, 0, 0), window_shape=None):
        zs, ys, xs = region
        if ys.start % PATCH_SIZE or xs.start % PATCH_SIZE:
            raise ValueError(f"block y/x starts must lie on the {PATCH_SIZE}-pixel patch grid, got {region}")
        self.source, self.device = source, device
        self.z0 = max(0, zs.start)  # first real slice
        self.patch_start = np.array([self.z0, ys.start // PATCH_SIZE, xs.start // PATCH_SIZE])
        patch_stop = np.array([zs.stop, -(-ys.stop // PATCH_SIZE), -(-xs.stop // PATCH_SIZE)])
        region_patches = tuple(slice(int(a), int(b)) for a, b in zip(self.patch_start, patch_stop))
        self.raw = torch.from_numpy(np.ascontiguousarray(source.raw_features.read(region_patches))).to(device)
        self.context = None
        if context and source.context is not None:
            target = source.raw.grid.crop((self.z0, ys.start, xs.start), (zs.stop, ys.stop, xs.stop))
            window = source.context_window(target, margin_nm, at_least=window_shape)
            patches = tuple(slice(s.start // f, -(-s.stop // f)) for s, f in zip(window, (1, PATCH_SIZE, PATCH_SIZE)))
            feats = source.context_features.read(patches)
            low, high = (source.context_features.signature["intensity"][k] for k in ("low", "high"))
            image = to_unit_range(read_region(source.context.data, window), low, high, device)[None, None]
            self.context = (torch.from_numpy(np.ascontiguousarray(feats))[None].to(device), image,
                            source.context.grid.crop([s.start for s in window], [s.stop for s in window]))
        self.image = None
        if intensity:
            self.halo = np.array(halo, int)
            # Up to whole patches (tiles run at whole patches), plus the halo.
            stop = np.array([zs.stop, ys.start + (patch_stop[1] - self.patch_start[1]) * PATCH_SIZE,
                             xs.start + (patch_stop[2] - self.patch_start[2]) * PATCH_SIZE])
            self.image_start = np.array([zs.start, ys.start, xs.start]) - self.halo
            self.image = to_unit_range(_read_padded(source.raw.data, self.image_start, stop + self.halo),
                                       source.low, source.high, device)

    def tile(self, region, full_yx=None) -> TileInputs:
        """The inputs of ``region`` (raw voxels, inside the block; z may start before the volume), float32.

        ``full_yx``: the y/x size to run the tile at (e.g. whole patches, at most the block's): the intensities
        (plus the halo) and the context's target grid cover it.
        """
        zs, ys, xs = region
        if ys.start % PATCH_SIZE or xs.start % PATCH_SIZE:
            raise ValueError(f"tile y/x starts must lie on the {PATCH_SIZE}-pixel patch grid, got {region}")
        src = self.source
        before = max(0, -zs.start)
        real = np.array([zs.start + before, ys.start // PATCH_SIZE, xs.start // PATCH_SIZE])
        stop = np.array([zs.stop, -(-ys.stop // PATCH_SIZE), -(-xs.stop // PATCH_SIZE)])
        a, b = real - self.patch_start, stop - self.patch_start
        raw = self.raw[:, a[0]:b[0], a[1]:b[1], a[2]:b[2]].float()
        size_yx = full_yx if full_yx is not None else (ys.stop - ys.start, xs.stop - xs.start)
        context = None
        if self.context is not None:
            feats, image, grid = self.context
            start = (zs.start, ys.start, xs.start)
            target = src.raw.grid.crop(start, np.add(start, (zs.stop - zs.start, *size_yx)))
            context = ContextWindow(feats.float(), image, grid, target)
        image = None
        if self.image is not None:
            i0 = np.array([zs.start, ys.start, xs.start]) - self.halo - self.image_start
            i1 = np.array([zs.stop, ys.start + size_yx[0], xs.start + size_yx[1]]) + self.halo - self.image_start
            image = self.image[i0[0]:i1[0], i0[1]:i1[1], i0[2]:i1[2]][None, None]
        if before:  # slices before the volume repeat the first one (np.pad "edge")
            index = torch.clamp(torch.arange(-before, zs.stop - zs.start - before, device=self.device), min=0)
            raw = raw.index_select(1, index)
        return TileInputs(raw[None], context, image)


def sample_images(volume: Volume, low: float, high: float, halo, count: int = 8, shape=(16, 128, 128),
                  seed: int = 0) -> list[torch.Tensor]:
    """``count`` blocks of ``shape`` (clipped to the volume) at random places, deterministic, as (1, 1, z, y, x)
    intensities in [0, 1] with ``halo`` voxels of neighbouring data (edge-padded beyond the volume): what a
    model's filter banks are calibrated on (:meth:`~napari_dinofuse.modeling.filters.FilterBank.calibrate`)."""
    shape = np.minimum(shape, volume.shape)
    rng = np.random.default_rng(seed)
    halo = np.asarray(halo, int)
    images = []
    for _ in range(count):
        start = rng.integers(0, np.asarray(volume.shape) - shape + 1)
        block = _read_padded(volume.data, start - halo, start + shape + halo)
        images.append(to_unit_range(block, low, high)[None, None])
    return images


def _read_padded(data, start, stop) -> np.ndarray:
    """``data[start:stop]`` (3D); voxels outside the volume repeat its nearest edge (``np.pad(mode="edge")``).
    Inside the volume, what ``read_region`` returns (no copy)."""
    shape = np.array(data.shape)
    start, stop = np.asarray(start, int), np.asarray(stop, int)
    lo = np.clip(start, 0, shape - 1)  # the voxels read: at least the nearest one per axis
    hi = np.maximum(np.minimum(stop, shape), lo + 1)
    block = read_region(data, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))
    before = np.clip(lo - start, 0, (stop - start) - (hi - lo))
    after = (stop - start) - (hi - lo) - before
    if not before.any() and not after.any():
        return block
    return np.pad(block, [(int(a), int(b)) for a, b in zip(before, after)], mode="edge")


class _SliceExtractor:
    """2D grayscale slices (B, H, W) of the raw dtype -> patch features (B, C, gh, gw).

    The raw slices go to the device as they are (uint8: a quarter of float32's bytes) and are normalised
    there; tiles are stitched there and the features leave it once, already in the dtype asked for.
    """

    # dtypes that torch converts to float exactly as numpy does; others are converted on the host first
    _DEVICE_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.float16, np.float32)

    def __init__(self, backbone: Backbone, tile_size: int, low: float, high: float, name: str):
        self.backbone, self.tile_size, self.low, self.high, self.name = backbone, tile_size, low, high, name
        self.max_batch: int | None = None  # set after an out-of-memory: slices per forward from then on

    def __call__(self, slices: np.ndarray, dtype=torch.float32) -> np.ndarray:
        return self.start(self.host_batch(slices), dtype).result()

    def host_batch(self, slices: np.ndarray) -> torch.Tensor:
        """``slices`` checked and ready to go to the device (pinned memory on CUDA); any thread may call it."""
        array = np.ascontiguousarray(slices)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"{self.name} contains NaN or infinite values: fill or mask them first")
        if array.dtype not in self._DEVICE_DTYPES:
            array = array.astype(np.float32)
        elif not array.flags.writeable:  # torch wants writable memory (read-only memory maps)
            array = array.copy()
        images = torch.from_numpy(array)
        return images.pin_memory() if self.backbone.device.type == "cuda" else images

    @torch.inference_mode()
    def start(self, images: torch.Tensor, dtype=torch.float16) -> _Pending:
        """Launch the features of a :meth:`host_batch`; on CUDA this returns before the device has finished."""
        images = to_unit_range(images.to(self.backbone.device, non_blocking=True), self.low, self.high)
        try:
            return _Pending(self._in_batches(images, dtype))
        except torch.OutOfMemoryError:
            if self.max_batch is not None or len(images) == 1:
                raise  # already retried once with half the batch
            self.max_batch = len(images) // 2
            warnings.warn(f"{self.name}: out of GPU memory at {len(images)} slices per batch; retrying with "
                          f"{self.max_batch} (set a smaller batch size to avoid the retry)", MemoryRetryWarning,
                          stacklevel=2)
            torch.cuda.empty_cache()
            return _Pending(self._in_batches(images, dtype))

    def _in_batches(self, images: torch.Tensor, dtype) -> torch.Tensor:
        step = self.max_batch or len(images)
        parts = [self._stitched(images[i:i + step], dtype) for i in range(0, len(images), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _stitched(self, images: torch.Tensor, dtype) -> torch.Tensor:
        """Features of (B, H, W) images on the device, tiled and stitched when wider than the tile size."""
        h, w = images.shape[1:]
        ys, xs = _axis_tiles(h, self.tile_size), _axis_tiles(w, self.tile_size)
        if len(ys) == 1 and len(xs) == 1:
            return self.backbone.patch_features(images).to(dtype)
        out = torch.empty((images.shape[0], self.backbone.embed_dim, ys[-1][3], xs[-1][3]), dtype=dtype,
                          device=images.device)
        for ty in ys:
            for tx in xs:
                tile = images[:, ty[0] * PATCH_SIZE:min(ty[1] * PATCH_SIZE, h),
                              tx[0] * PATCH_SIZE:min(tx[1] * PATCH_SIZE, w)]
                feats = self.backbone.patch_features(tile)
                out[:, :, ty[2]:ty[3], tx[2]:tx[3]] = feats[:, :, ty[2] - ty[0]:ty[3] - ty[0],
                                                            tx[2] - tx[0]:tx[3] - tx[0]]
        return out


class _Pending:
    """Features on their way to the host: a CUDA copy into pinned memory that ``result()`` waits for."""

    def __init__(self, features: torch.Tensor):
        features = features.contiguous()
        self._event = None
        if features.device.type == "cuda":
            self._host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            self._host.copy_(features, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = features.cpu()

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class _Writer:
    """Writes batches of finished units on background threads (each batch: data first, then markers).

    ``threads`` batches are written at once (zarr's codecs and file writes release the GIL; one thread
    wrote ~275 MB/s on the H200's host, a sixth of what the ViT-L produces). ``put`` blocks while ``threads``
    batches already wait, so host memory stays bounded. ``close`` writes what was handed over (a Cancel keeps
    every slice computed so far) and then re-raises a write error; after an error nothing more is written, so
    no marker ever stands for data that was not written.
    """

    def __init__(self, entry: FeatureEntry, plane: str, threads: int = 1):
        self.entry, self.plane = entry, plane
        self._queue: queue.Queue = queue.Queue(maxsize=threads)
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name=f"dinofuse-feature-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                units, pending = item
                try:
                    features = pending.result()
                    self.entry.write_units(self.plane, units, [features[i] for i in range(len(units))])
                except BaseException as exc:  # reported by the next put() or by close()
                    self._error = exc

    def put(self, units: list[int], pending: _Pending) -> None:
        self._check()
        self._queue.put((units, pending))

    def close(self, check: bool = True) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        if check:
            self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


def writer_threads() -> int:
    """Feature writer threads: half the cores (the rest read, launch and run the ViT), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _axis_tiles(n_pixels: int, tile_size: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis, in patches: (start, stop, own_start, own_stop).

    Tiles overlap by at least 2 * MIN_OVERLAP_PATCHES; each patch is owned by the tile whose centre is
    nearest, so an owned patch is at least MIN_OVERLAP_PATCHES from any edge that is not the image's.
    """
    n = -(-n_pixels // PATCH_SIZE)
    size = tile_size // PATCH_SIZE
    if n <= size:
        return [(0, n, 0, n)]
    step = size - 2 * MIN_OVERLAP_PATCHES
    starts = sorted(set(list(range(0, n - size, step)) + [n - size]))
    bounds = [0] + [(a + b + size) // 2 for a, b in zip(starts, starts[1:])] + [n]
    return [(s, s + size, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def _runs(units: list[int], batch_size: int) -> Iterable[tuple[int, int]]:
    """Consecutive runs of unit indices, cut to at most batch_size: contiguous slabs read at once."""
    start = prev = None
    for u in units:
        if start is None:
            start = prev = u
        elif u == prev + 1 and u - start < batch_size:
            prev = u
        else:
            yield start, prev + 1
            start = prev = u
    if start is not None:
        yield start, prev + 1


def _xy_units(volume, entry, units, batch_size, extractor) -> Iterable[int]:
    """Batch k runs on the device while a thread reads batch k+1 (into pinned memory on CUDA) and the writer
    threads store batch k-1: this thread only launches."""
    writer = _Writer(entry, "xy", writer_threads())
    runs = list(_runs(units, batch_size))
    reader = ThreadPoolExecutor(1, "dinofuse-feature-reader")

    def read(run):
        return reader.submit(lambda: extractor.host_batch(read_region(volume.data, slice(*run))))

    try:
        ahead = read(runs[0]) if runs else None
        for i, (z0, z1) in enumerate(runs):
            images = ahead.result()
            if i + 1 < len(runs):
                ahead = read(runs[i + 1])
            writer.put(list(range(z0, z1)), extractor.start(images))
            yield z1 - z0
    except BaseException:  # an error, or close() (Cancel): store what was computed, keep the first error
        writer.close(check=False)
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
    writer.close()


def _ortho_units(volume, entry, plane, units, batch_size, extractor) -> Iterable[int]:
    """xz (yz) planes of one 16-row (column) block -> block mean -> interpolated along z."""
    z = volume.shape[0]
    axis = 1 if plane == "xz" else 2
    for unit in units:
        lo, hi = unit * PATCH_SIZE, min((unit + 1) * PATCH_SIZE, volume.shape[axis])
        region = [slice(None)] * 3
        region[axis] = slice(lo, hi)
        slab = np.moveaxis(read_region(volume.data, tuple(region)), axis, 0)  # (planes, Z, other)
        total = None
        for b in range(0, slab.shape[0], batch_size):
            feats = extractor(slab[b:b + batch_size])  # (B, C, gz, g_other)
            total = feats.sum(0) if total is None else total + feats.sum(0)
        mean = total / slab.shape[0]  # (C, gz, g_other)
        gz, g_other = mean.shape[1:]
        # Patch i along z is centred on voxel 16 i + 7.5; interpolate onto every voxel's centre.
        src = Grid((gz, 1, g_other), (PATCH_SIZE, 1, 1), ((PATCH_SIZE - 1) / 2, 0, 0))
        on_z = resample(mean[:, :, None, :], src, Grid((z, 1, g_other), 1.0))[:, :, 0, :]
        entry.write_unit(plane, unit, on_z.astype(np.float16))
        yield hi - lo
