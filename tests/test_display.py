"""How results look: one colour per class everywhere, a transparent background, a neutral attention style and
a camera fitted to the raw. Pure functions, no viewer."""

import numpy as np

from napari_dinofuse.display import (
    ATTENTION_NEUTRAL,
    attention_style,
    class_color,
    class_features,
    fit_camera,
    label_colormap,
    view_region,
)


def test_fit_camera_shows_the_whole_box_centred():
    # A raw of 256 x 256 voxels of 4 nm at (1000, 2000) nm, in an 800 x 600 (h x w) canvas.
    lo, hi = np.array([0.0, 1000.0, 2000.0]), np.array([128.0, 2024.0, 3024.0])
    center, zoom = fit_camera(lo, hi, (800, 600))
    assert center == (1512.0, 2512.0)
    assert np.isclose(zoom, 0.95 * 600 / 1024)  # the narrower side limits: the whole box is in view
    # A wide box is limited by its width; a flat one (one slice) does not divide by zero.
    _, zoom = fit_camera([0, 0, 0], [1, 10, 1000], (500, 500))
    assert np.isclose(zoom, 0.95 * 0.5)
    center, zoom = fit_camera([0, 5, 5], [0, 5, 5], (500, 500), ndisplay=3)
    assert center == (0.0, 5.0, 5.0) and np.isfinite(zoom)


def test_the_region_around_the_view_is_what_the_canvas_shows_in_raw_voxels():
    # Raw 64 x 1000 x 1000 voxels of (8, 4, 4) nm at (80, 1000, 2000) nm; the view at slice 20, centred on voxel
    # (300, 400), 2 screen pixels per nm in a 400 x 800 canvas: 100 x 200 nm shown, 25 x 50 voxels.
    shape, voxel, offset = (64, 1000, 1000), (8, 4, 4), (80, 1000, 2000)
    z, center = 80 + 20 * 8, (1000 + 300 * 4, 2000 + 400 * 4)
    region = view_region(shape, voxel, offset, z, center, 2.0, (400, 800))
    assert region[0] == slice(4, 36)  # 16 slices either side
    assert region[1] == slice(300 - 32, 300 + 32)  # 12.5 voxels half-height: at least 32 either side
    # Zoomed out (0.05 px/nm: 8000 x 16000 nm shown): capped at 512 voxels either side, cut at the raw's edge.
    region = view_region(shape, voxel, offset, z, center, 0.05, (400, 800))
    assert region[1] == slice(0, 300 + 512) and region[2] == slice(0, 400 + 512)
    # A view outside the raw still gives a region inside it, never an empty one.
    far = view_region(shape, voxel, offset, -1e6, (-1e6, 1e7), 2.0, (400, 800))
    assert all(0 <= s.start < s.stop <= n for s, n in zip(far, shape))


def test_a_training_preview_covers_the_middle_of_the_slice_shown():
    from napari_dinofuse.defaults import PREVIEW_HALF_WIDTH, preview_region

    shape, voxel, offset = (64, 1000, 1000), (8, 4, 4), (80, 1000, 2000)
    z, center = 80 + 20 * 8, (1000 + 300 * 4, 2000 + 400 * 4)
    shown = view_region(shape, voxel, offset, z, center, 0.05, (400, 800), half_depth=0)
    assert shown == (slice(20, 21), slice(0, 300 + 512), slice(0, 400 + 512))  # the slice in view, all of it
    for at, index in ((6.5, 6), (7.5, 8), (7.4, 7)):  # the slice napari shows: it rounds half-way to even
        assert view_region(shape, voxel, offset, 80 + at * 8, center, 2.0, (400, 800), 0)[0] == slice(index, index + 1)
    half = PREVIEW_HALF_WIDTH
    middle = preview_region(shown)
    assert middle[0] == shown[0] and middle[1] == slice(406 - half, 406 + half)
    assert middle[2] == slice(456 - half, 456 + half)
    small = (slice(3, 4), slice(10, 60), slice(0, 2 * half + 1))  # y narrower than the cap: kept; x one wider
    assert preview_region(small) == (slice(3, 4), slice(10, 60), slice(0, 2 * half))


def test_one_colour_per_class_and_a_transparent_prediction_background():
    painted, predicted = label_colormap(show_background=True), label_colormap(show_background=False)
    assert predicted[1][3] == 0 and painted[1][3] == 1  # background: hidden in predictions, visible strokes
    assert painted[0][3] == 0 and predicted[0][3] == 0  # unpainted / unlabelled
    for k in range(2, 40):
        assert predicted[k] == painted[k] == class_color(k) and class_color(k)[3] == 1
    first = [class_color(k) for k in range(2, 10)]
    assert len(set(first)) == len(first)  # the first eight classes are told apart
    assert class_features(["background", "membrane"]) == {"index": [0, 1, 2],
                                                          "class": ["unpainted", "background", "membrane"]}


def test_attention_style_is_fixed_and_neutral_at_one_half():
    from napari.utils.colormaps import ensure_colormap

    style = attention_style(1)
    assert style["contrast_limits"] == (0.0, 1.0) and style["visible"] and not attention_style(2)["visible"]
    cmap = ensure_colormap(style["colormap"])
    low, neutral, high = cmap.map(np.array([0.0, ATTENTION_NEUTRAL, 1.0]))
    assert np.allclose(neutral[:3], 0)  # additive blending: a flat 0.5 gate adds nothing over the EM
    assert low[2] > low[0] and high[0] > high[2]  # blue below, orange above: diverging
