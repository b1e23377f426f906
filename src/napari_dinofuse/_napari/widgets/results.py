"""Prediction results as napari layers, placed in the world, updated in place on every run.

Only layers this plugin created (marked in ``layer.metadata``) are ever updated; a user layer that happens to
share a name is left alone and ours gets napari's next free name.
"""

from __future__ import annotations

from ...defaults import NUM_LEVELS, attention_array, attention_layer
from ...display import attention_style, class_features, prediction_style, uncertainty_style

MARK = "napari-dinofuse"
ATTENTION_LAYERS = [attention_layer(k) for k in range(1, NUM_LEVELS + 1)]


def _placement(grid) -> dict:
    return {"scale": tuple(grid.voxel_size), "translate": tuple(grid.offset)}


def ours(viewer, role: str):
    """The layer this plugin made for ``role`` ('prediction', 'uncertainty', 'attention level k'), or None."""
    for layer in viewer.layers:
        if layer.metadata.get(MARK) == role:
            return layer
    return None


def _show(viewer, role: str, kind: str, data, grid, **style):
    layer = ours(viewer, role)
    if layer is not None:
        layer.data = data
        layer.scale, layer.translate = grid.voxel_size, grid.offset
        layer.refresh()
        return layer
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, name=role, metadata={MARK: role}, **_placement(grid), **style)


def show_labels(viewer, sink, class_names=()):
    """Add or update the ``prediction`` layer alone from ``sink`` (finished, or with the region in view written
    so far: the rest is 0, unlabelled, until the whole prediction is shown)."""
    prediction = _show(viewer, "prediction", "labels", sink.arrays["labels"], sink.grids["labels"],
                       **prediction_style())
    prediction.metadata["class names"] = {k + 1: name for k, name in enumerate(class_names)}
    if class_names:  # the status bar names the class under the cursor
        prediction.features = class_features(class_names)
    return prediction


def show_prediction(viewer, sink, class_names=(), partial: bool = False):
    """Add or update ``prediction``, ``uncertainty`` and ``attention level 1..4`` from a finished sink, one
    layer per step: a generator, so the caller can hand the event loop back between layers (napari takes ~0.1 s
    to add one; all six at once froze the viewer for a second).

    ``partial``: the sink holds the region in view so far (the rest is 0 until the whole prediction is shown);
    only the layers shown already are updated, so none keeps the previous run's results beside this one's.
    Attention layers this model does not make (no context fusion) are removed. Styles (colours, ranges) are set
    when a layer is created, so what the user changed since stays.
    """
    yield show_labels(viewer, sink, class_names)
    images = [("uncertainty", "uncertainty", uncertainty_style())]
    images += [(role, attention_array(k), attention_style(k)) for k, role in enumerate(ATTENTION_LAYERS, start=1)]
    for role, name, style in images:
        layer = ours(viewer, role)
        if name in sink.arrays:
            if layer is not None or not partial:
                yield _show(viewer, role, "image", sink.arrays[name], sink.grids[name], **style)
        elif layer is not None:
            viewer.layers.remove(layer)
            yield layer
