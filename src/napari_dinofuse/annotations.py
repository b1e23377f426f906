"""Painted annotations kept safe: with the model they trained, and autosaved when a fine-tune starts.

An hour of painting must not be lost to a crash, a closed viewer or a forgotten Save. Annotations are stored as
a single-level OME-Zarr image (``annotations.zarr``: label values as painted, placed in nm like the raw), written
slab by slab (bounded memory) into a hidden sibling and swapped in complete. Sparse strokes compress to almost
nothing, so a copy costs little disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .atomic import recover, siblings, staging, swap_in
from .defaults import ANNOTATIONS_KIND
from .geometry import Grid, Volume
from .io import read_region

__all__ = ["AUTOSAVE_ENV", "autosave_path", "load_annotations", "save_annotations"]

FILE = "annotations.zarr"  # inside a model folder
AUTOSAVE_ENV = "DINOFUSE_AUTOSAVE"  # overrides where the last fine-tune's annotations are autosaved
_SLAB_BYTES = 64 * 2**20


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
        plane = int(np.prod(labels.shape[1:])) * dtype.itemsize
        step = max(1, min(labels.shape[0], _SLAB_BYTES // max(plane, 1)))
        array = create_ome_image(group, "annotations", labels.shape, dtype, grid,
                                 chunks=(min(step, 32), 256, 256))
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
