"""npe2 reader: volumes (.zarr / OME-Zarr, .tif/.tiff, .npy) and dinofuse predictions, placed in the world.

Layers get ``scale`` = voxel size and ``translate`` = offset (nm), so raw, context and results overlay.
Data stay lazy (zarr arrays, memory maps): napari reads what it shows.
"""

from __future__ import annotations

from pathlib import Path

from .defaults import NUM_LEVELS, PREDICTION_KIND, VOLUME_SUFFIXES, attention_array, attention_layer


def get_reader(path):
    if isinstance(path, list):
        return None
    return read if str(path).rstrip("/").lower().endswith(VOLUME_SUFFIXES) else None


def read(path) -> list[tuple]:
    path = Path(str(path).rstrip("/"))
    prediction = _prediction_outputs(path)
    if prediction is not None:
        return prediction
    volume = _open(path)
    return [(volume.data, _placement(volume, name=path.stem), "image")]


def _open(path: Path, **kwargs):
    from .errors import GeometryError
    from .io import open_volume

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
    layers = []
    labels = _open(path / "labels", name="prediction")
    layers.append((labels.data, _placement(labels, name="prediction"), "labels"))
    uncertainty = _open(path / "uncertainty", name="uncertainty")
    layers.append((uncertainty.data, _placement(uncertainty, name="uncertainty", colormap="magma",
                                                 contrast_limits=(0.0, 1.0), visible=False), "image"))
    for k in range(1, NUM_LEVELS + 1):
        if (path / attention_array(k)).is_dir():
            level = _open(path / attention_array(k), name=attention_layer(k))
            layers.append((level.data, _placement(level, name=attention_layer(k), colormap="inferno",
                                                   blending="additive", opacity=0.5, contrast_limits=(0.0, 1.0),
                                                   visible=k == 1), "image"))
    return layers
