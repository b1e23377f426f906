"""How results look in napari, in one place: class colours, the attention style and fitting the camera.

Plain data and numpy only (no Qt, no napari import): the reader, the sample data and the dock widget all pass
these as layer keyword arguments, so a class has the same colour in every layer and a saved prediction opens
looking like a fresh one.
"""

from __future__ import annotations

import numpy as np

TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
BACKGROUND = 1  # label value of class 1 ("background" by the painting rule)
# Label value -> colour, from value 2 on (1 is background, 0 unpainted). Chosen to stand out on grey EM.
PALETTE = [
    (1.00, 0.85, 0.10),  # yellow
    (1.00, 0.25, 0.65),  # magenta
    (0.10, 0.85, 0.95),  # cyan
    (1.00, 0.50, 0.10),  # orange
    (0.35, 0.45, 1.00),  # blue
    (0.45, 1.00, 0.30),  # green
    (0.95, 0.15, 0.15),  # red
    (0.70, 0.40, 1.00),  # violet
]
BACKGROUND_COLOR = (0.55, 0.60, 0.70)  # painted background strokes must stay visible while painting
MAX_COLORED = 255  # label values given a colour (uint8 labels); higher ones get the palette's first colour


def class_color(value: int) -> tuple[float, float, float, float]:
    """RGBA of label value ``value`` (0 unpainted: transparent; 1 background; 2.. the palette, cycled)."""
    if value <= 0:
        return TRANSPARENT
    if value == BACKGROUND:
        return (*BACKGROUND_COLOR, 1.0)
    return (*PALETTE[(value - 2) % len(PALETTE)], 1.0)


def label_colormap(show_background: bool = True) -> dict:
    """A napari Labels ``colormap`` (dict: label value -> RGBA) with :func:`class_color`.

    ``show_background=False`` for predictions: class 1 covers most of the volume and would hide the EM.
    """
    colors = {None: (*PALETTE[0], 1.0)}
    colors.update({v: class_color(v) for v in range(MAX_COLORED + 1)})
    if not show_background:
        colors[BACKGROUND] = TRANSPARENT
    return colors


def class_features(class_names) -> dict:
    """Labels ``features`` naming label values: napari's status bar then shows the class under the cursor.

    ``class_names[i]`` names label value ``i + 1`` (the prediction convention); 0 is 'unpainted'.
    """
    names = list(class_names)
    return {"index": list(range(len(names) + 1)), "class": ["unpainted", *names]}


# -- attention maps --------------------------------------------------------------------------------------------
# The gate a = sigmoid(logit) scales the raw features by (1 + a); a = 0.5 (logit 0) is what an untrained or
# uninformative context gives. Diverging around 0.5 with a black middle and additive blending: a flat gate adds
# nothing over the EM, and only where the context pushed the gate up (orange) or down (blue) shows colour.
ATTENTION_NEUTRAL = 0.5
ATTENTION_COLORMAP = {
    "name": "dinofuse gate",
    "colors": [[0.25, 0.55, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.55, 0.1, 1.0]],
    "controls": [0.0, ATTENTION_NEUTRAL, 1.0],
}
ATTENTION_LEGEND = ("attention: orange = the context amplified the raw features here (gate above 0.5), blue = "
                    "it damped them (below 0.5), no tint = 0.5, no preference")


def attention_style(k: int) -> dict:
    """Layer keyword arguments of attention level ``k``: a fixed range, so levels and runs compare at a glance."""
    return {"colormap": dict(ATTENTION_COLORMAP), "contrast_limits": (0.0, 1.0), "blending": "additive",
            "opacity": 0.8, "visible": k == 1}


def prediction_style() -> dict:
    return {"colormap": label_colormap(show_background=False), "opacity": 0.6}


def uncertainty_style() -> dict:
    return {"colormap": "magma", "contrast_limits": (0.0, 1.0), "visible": False}


# -- camera --------------------------------------------------------------------------------------------------------

def fit_camera(lo, hi, canvas_size, ndisplay: int = 2, margin: float = 0.95):
    """(center, zoom) that shows the world box ``lo``..``hi`` (z, y, x) whole in a canvas of ``canvas_size``
    (height, width) pixels, the way napari's reset_view fits all layers (zoom = screen pixels per world unit).

    ``center`` has the displayed axes (the last ``ndisplay``), as napari's camera takes it.
    """
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    size = hi - lo
    center = tuple(float(c) for c in (lo + size / 2)[-ndisplay:])
    yx = size[-2:].copy()
    yx[yx <= 0] = 1.0  # a flat box: do not divide by zero
    zoom = margin * float(np.min(np.asarray(canvas_size, float)[-2:] / yx))
    return center, zoom


VIEW_HALF_DEPTH = 16  # raw slices above and below the shown one in "region around the view"
VIEW_HALF_WIDTH = (32, 512)  # least and most raw voxels from the view's centre to its edge (y, x)


def view_region(shape, voxel_size, offset, z, center, zoom: float, canvas_size,
                half_depth: int = VIEW_HALF_DEPTH) -> tuple[slice, slice, slice]:
    """The raw voxels (slices, inside ``shape``) around a 2D view: ``half_depth`` slices either side of the
    world z ``z`` (0: the slice shown), and in y/x the part of the world that a canvas of ``canvas_size``
    (height, width) pixels shows at ``zoom`` (screen pixels per world unit) around the world ``center`` (y, x),
    clipped to ``VIEW_HALF_WIDTH`` voxels either side. Never empty: at least one voxel per axis."""
    voxel, offset = np.asarray(voxel_size, float), np.asarray(offset, float)
    z_voxel = (z - offset[0]) / voxel[0]
    if half_depth == 0:  # the slice napari shows: it rounds the point (half-way to even)
        z_voxel = np.round(z_voxel)
    center_voxel = (np.asarray(center, float)[-2:] - offset[1:]) / voxel[1:]
    half = np.clip(np.asarray(canvas_size, float)[-2:] / 2 / max(zoom, 1e-6) / voxel[1:], *VIEW_HALF_WIDTH)
    lo = [z_voxel - half_depth, *(center_voxel - half)]
    hi = [z_voxel + half_depth, *(center_voxel + half)]
    region = []
    for a, b, n in zip(lo, hi, shape):
        a, b = int(np.clip(np.floor(a), 0, n - 1)), int(np.clip(np.ceil(b), 1, n))
        region.append(slice(a, max(b, a + 1)))
    return tuple(region)
