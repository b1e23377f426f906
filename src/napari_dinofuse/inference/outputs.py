"""Where predictions go: :class:`MemorySink` (numpy: the GUI, tests) and :class:`ZarrSink` (OME-Zarr on disk).

A :class:`ZarrSink` is an OME-Zarr folder written aside and swapped in only when complete, so a cancelled or
crashed run never looks finished. A sink has
``create(name, shape, dtype, grid)`` (once per output, before any write), ``set_info(**json)``,
``write(name, region, array)`` (region: 3 slices over z, y, x relative to the ROI start; leading axes whole),
``finish()`` after the last write and ``abort()`` on cancel or error.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator, Sequence
from pathlib import Path

import numpy as np

from ..atomic import recover, staging, swap_in
from ..defaults import PREDICTION_KIND
from ..errors import DinofuseError, InputError
from ..geometry import Grid
from ..io import create_ome_image
from ..progress import Progress

__all__ = ["MemorySink", "StoredPrediction", "ZarrSink", "require_group", "save_results",
           "store_kind"]


def store_kind(path) -> str | None:
    """The ``dinofuse.kind`` marker of the zarr group at ``path`` (a prediction, annotations), or None for anything
    else (missing, not zarr, unmarked): what decides whether the plugin may open or replace a folder as its own."""
    import zarr

    try:
        return dict(zarr.open_group(str(path), mode="r").attrs.get("dinofuse", {})).get("kind")
    except Exception:  # noqa: BLE001 - unreadable as a zarr group: certainly not ours
        return None


class MemorySink:
    """Outputs as numpy arrays in ``arrays`` with their world grids in ``grids`` (for the GUI and tests).

    ``complete`` turns True only when a run finished; a cancelled run leaves partly filled arrays.
    Outputs named in ``skip`` are not kept (the viewer shows no ``probabilities``: K times the memory).
    """

    def __init__(self, skip=()):
        self.skip = frozenset(skip)
        self.arrays: dict[str, np.ndarray] = {}
        self.grids: dict[str, Grid] = {}
        self.info: dict = {}
        self.complete = False

    def create(self, name: str, shape, dtype, grid: Grid, chunks=None) -> None:
        if name in self.skip:
            return
        self.arrays[name] = np.zeros(shape, dtype)
        self.grids[name] = grid

    def set_info(self, **info) -> None:
        self.info.update(info)

    def write(self, name: str, region: Sequence[slice], array: np.ndarray) -> None:
        """``region``: 3 slices over the (z, y, x) axes; leading axes (classes) are written whole."""
        if name not in self.skip:
            self.arrays[name][(Ellipsis, *region)] = array

    def finish(self) -> None:
        self.complete = True

    def abort(self) -> None:
        pass


def require_group(root, name: str):
    """The group ``name`` ("labels", "attention/level1") under ``root``, with explicit intermediate groups."""
    group = root
    for part in name.split("/"):
        group = group.require_group(part)
    return group


class ZarrSink:
    """An OME-Zarr (v0.5, zarr v3) output folder: one single-level image group per output.

    Layout: ``OUT.zarr/labels/0``, ``probabilities/0`` (axes c, z, y, x), ``uncertainty/0`` and
    ``attention/level{k}/0``; each image group carries ``ome.multiscales`` with nanometre axes and its own
    grid as scale/translation, so ``io.open_volume("OUT.zarr/labels")`` or napari places it correctly.

    Everything is written into a hidden sibling ``.OUT.zarr.partial-*``; :meth:`finish` swaps it in by
    renames (an existing output is renamed aside, the new one in, then the old deleted), :meth:`abort`
    deletes it. If a process dies between the two renames the previous output waits at
    ``.OUT.zarr.old-*`` and the next ZarrSink on that path puts it back. Only a previous dinofuse
    prediction is ever replaced: any other existing path is refused up front.
    """

    KIND = PREDICTION_KIND

    def __init__(self, path, chunks=(64, 256, 256)):
        self.path = Path(path).expanduser().absolute()
        self.chunks = tuple(int(c) for c in chunks)
        self._partial: Path | None = None
        self._root = None
        self._arrays: dict = {}
        self.grids: dict[str, Grid] = {}
        self.complete = False
        recover(self.path)
        self._check_replaceable()

    def _check_replaceable(self) -> None:
        if not self.path.exists():
            return
        if store_kind(self.path) != self.KIND:
            raise InputError(f"{self.path} exists and is not a dinofuse prediction: refusing to replace it. "
                             "Choose another output path or remove it yourself")

    def _group(self, name: str):
        import zarr

        if self._root is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._partial = staging(self.path, "partial")
            self._root = zarr.open_group(str(self._partial), mode="w", zarr_format=3)
            self._root.attrs["dinofuse"] = {"kind": self.KIND, "outputs": []}
        return require_group(self._root, name)

    def create(self, name: str, shape, dtype, grid: Grid, chunks=None) -> None:
        chunks = chunks if chunks is not None else (1,) * (len(shape) - 3) + self.chunks
        self._arrays[name] = create_ome_image(self._group(name), name, shape, dtype, grid, chunks)
        self.grids[name] = grid
        info = dict(self._root.attrs["dinofuse"])
        info["outputs"] = [*info["outputs"], name]
        self._root.attrs["dinofuse"] = info

    def being_written(self, name: str):
        """The array ``name`` while it is written (zarr writes each chunk atomically, so a reader sees whole
        chunks appear), or None; after the output is swapped in or aborted its files are gone from there."""
        return self._arrays.get(name)

    def set_info(self, **info) -> None:
        """Extra JSON metadata on the root group (e.g. the ROI), next to the ``kind`` marker."""
        self._root.attrs["dinofuse"] = {**dict(self._root.attrs["dinofuse"]), **info}

    def write(self, name: str, region: Sequence[slice], array: np.ndarray) -> None:
        self._arrays[name][(Ellipsis, *region)] = array

    def write_text(self, relative: str, text: str) -> None:
        """A text file inside the output (e.g. ``instances/measurements.csv``), swapped in with the rest."""
        (self._partial / relative).write_text(text, encoding="utf-8")

    def finish(self) -> None:
        if self._partial is None:
            raise DinofuseError("nothing was written: create outputs before finishing")
        self._check_replaceable()  # something else may have appeared there during the run
        self._root, self._arrays = None, {}
        swap_in(self._partial, self.path)
        self._partial = None
        self.complete = True

    def abort(self) -> None:
        self._root, self._arrays = None, {}
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
            self._partial = None


class StoredPrediction:
    """A finished prediction folder's outputs as lazily read zarr arrays with their grids: what the widget
    shows after predicting to disk (the same ``arrays``/``grids`` as a :class:`MemorySink`), plus ``path``."""

    def __init__(self, path):
        from ..defaults import NUM_LEVELS, attention_array
        from ..io import open_volume

        self.path = Path(path).expanduser().absolute()
        self.arrays: dict = {}
        self.grids: dict[str, Grid] = {}
        self.complete = True
        names = ["labels", "uncertainty"] + [attention_array(k) for k in range(1, NUM_LEVELS + 1)]
        for name in names:
            if (self.path / name).is_dir():
                volume = open_volume(self.path / name, name=name)
                self.arrays[name], self.grids[name] = volume.data, volume.grid


SAVE_SLAB_BYTES = 64 * 2**20  # read and written at once by save_results


def save_results(folder, images: dict, class_names=None, table=None) -> Generator[Progress, None, Path]:
    """Write results shown in the viewer into a prediction folder that the reader opens again in place.

    ``images``: name (``labels``, ``uncertainty``, ``attention/level{k}``, ``instances``) -> (Z, Y, X) array
    (numpy or lazy) and its :class:`Grid`; ``table``, the objects' :class:`~.instances.ObjectTable`, is kept as
    ``instances/measurements.csv``. Copied slab by slab (memory bounded whatever the size), written aside and
    swapped in when complete; only an earlier prediction is ever replaced.
    """
    from ..io import read_region

    if "labels" not in images:
        raise InputError("there is no prediction to save: click Predict first")
    sink = ZarrSink(folder)
    try:
        slabs = []
        for name, (data, grid) in images.items():
            sink.create(name, data.shape, data.dtype, grid)
            plane = int(np.prod(data.shape[1:])) * np.dtype(data.dtype).itemsize
            step = max(1, SAVE_SLAB_BYTES // plane)
            slabs += [(name, data, slice(z, min(z + step, data.shape[0]))) for z in range(0, data.shape[0], step)]
            if class_names and name == "labels":
                sink.set_info(class_names=[str(n) for n in class_names])
        for done, (name, data, z) in enumerate(slabs, start=1):
            region = (z, slice(None), slice(None))
            sink.write(name, region, read_region(data, region))
            yield Progress(done, len(slabs), f"saving {name}")
        if table is not None and "instances" in images:
            sink.write_text("instances/measurements.csv", table.to_csv())
        sink.finish()
    except BaseException:  # cancelled, a full disk: nothing half-written is left looking complete
        sink.abort()
        raise
    return sink.path
