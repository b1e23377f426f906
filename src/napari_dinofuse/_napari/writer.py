"""npe2 writer: a Labels layer (the annotations, a prediction, objects) as an OME-Zarr image in nm, written
atomically, that the reader opens again as Labels in place (File > Save Selected Layers…, name ending .zarr)."""

from __future__ import annotations

from pathlib import Path


def write_labels(path: str, data, attributes: dict) -> list[str]:
    from ..annotations import save_annotations
    from ..defaults import ANNOTATIONS_KIND
    from ..errors import DinofuseError
    from ..geometry import Grid
    from ..inference.outputs import store_kind

    if len(data.shape) != 3:
        raise DinofuseError(f"only 3D (z, y, x) labels can be written as OME-Zarr here, not {len(data.shape)}D")
    target = Path(path).expanduser().absolute()
    # Never replace the user's other data: only what this writer wrote.
    if target.exists() and store_kind(target) != ANNOTATIONS_KIND:
        # Not a ValueError: napari would take that for 'this writer does not apply' and say only that.
        raise FileExistsError(f"{target} exists and was not written by napari-dinofuse: choose another name")
    grid = Grid(tuple(data.shape), tuple(attributes["scale"]), tuple(attributes["translate"]))
    return [str(save_annotations(target, data, grid))]
