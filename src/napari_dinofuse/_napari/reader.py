"""npe2 reader: volumes (.zarr / OME-Zarr, .tif/.tiff, HDF5, .npy) and dinofuse predictions, placed in the world.

Layers get ``scale`` = voxel size and ``translate`` = offset (nm), so raw, context and results overlay.
Data stay lazy (zarr arrays, h5py datasets, memory maps): napari reads what it shows. An HDF5 file therefore
stays open (read-only) while its layer exists.
"""

from __future__ import annotations

from pathlib import Path

from ..defaults import (
    ANNOTATIONS_KIND,
    HDF5_SUFFIXES,
    NUM_LEVELS,
    PREDICTION_KIND,
    VOLUME_SUFFIXES,
    attention_array,
    attention_layer,
)


def get_reader(path):
    if isinstance(path, list):
        return None
    path = str(path).rstrip("/").lower()
    # `file.h5/raw`: the dataset's path inside an HDF5 file follows the file's suffix.
    inside_hdf5 = any(Path(part).suffix in HDF5_SUFFIXES for part in Path(path).parts)
    return read if path.endswith(VOLUME_SUFFIXES) or inside_hdf5 else None


def read(path) -> list[tuple]:
    path = Path(str(path).rstrip("/"))
    prediction = _prediction_outputs(path)
    if prediction is not None:
        return prediction
    if path.suffix.lower() in HDF5_SUFFIXES and path.is_file():
        # napari hands over existing paths only, never `file.h5/dataset`: a file with several volumes opens
        # as one layer each (open_volume refuses to guess which one is meant).
        volumes = _hdf5_volumes(path)
        if len(volumes) > 1:
            return [layer for volume in volumes for layer in read(volume)]
    volume = _open(path)
    return [(volume.data, _placement(volume, name=path.stem), "labels" if _is_labels(path) else "image")]


def _is_labels(path: Path) -> bool:
    """Labels written by this plugin (annotations, the writer): opened as Labels again."""
    from ..inference.outputs import store_kind

    return path.suffix.lower() == ".zarr" and path.is_dir() and store_kind(path) == ANNOTATIONS_KIND


def _hdf5_volumes(path: Path) -> list[str]:
    from ..io import hdf5_volumes

    try:
        return hdf5_volumes(path)
    except Exception:  # noqa: BLE001 - not readable as HDF5: open_volume says why
        return []


def _open(path: Path, **kwargs):
    from ..errors import GeometryError
    from ..io import open_volume

    try:
        return open_volume(path, **kwargs)
    except GeometryError as exc:
        if "voxel size" not in str(exc):
            raise
        # No voxel size in the file: show it in voxels; the user sets the scale in the dock widget.
        return open_volume(path, voxel_size=(1.0, 1.0, 1.0), **kwargs)


def _placement(volume, **extra) -> dict:
    return {"scale": volume.voxel_size, "translate": volume.offset, **extra}


def _prediction_outputs(path: Path):
    """The layers of a dinofuse prediction folder, or None if ``path`` is not one."""
    if path.suffix.lower() != ".zarr" or not (path / "labels").is_dir():
        return None
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs.get("dinofuse", {}))
    except Exception:  # noqa: BLE001 - not a zarr group: not ours
        return None
    if attrs.get("kind") != PREDICTION_KIND:
        return None
    from ..display import attention_style, class_features, prediction_style, uncertainty_style

    # The dock's styles and the model's class names: a saved prediction opens looking like a fresh one.
    names = attrs.get("class_names")
    named = {"features": class_features(names)} if isinstance(names, list) and names else {}
    layers = []
    labels = _open(path / "labels", name="prediction")
    layers.append((labels.data, _placement(labels, name="prediction", **prediction_style(), **named), "labels"))
    if (path / "uncertainty").is_dir():
        uncertainty = _open(path / "uncertainty", name="uncertainty")
        layers.append((uncertainty.data, _placement(uncertainty, name="uncertainty", **uncertainty_style()),
                       "image"))
    if (path / "instances").is_dir():
        from ..inference.instances import read_table_csv

        objects = _open(path / "instances", name="instances")
        table = path / "instances" / "measurements.csv"
        features = {"features": read_table_csv(table.read_text())} if table.is_file() else {}
        layers.append((objects.data, _placement(objects, name="instances", **features), "labels"))
    for k in range(1, NUM_LEVELS + 1):
        if (path / attention_array(k)).is_dir():
            level = _open(path / attention_array(k), name=attention_layer(k))
            layers.append((level.data, _placement(level, name=attention_layer(k), **attention_style(k)), "image"))
    return layers
