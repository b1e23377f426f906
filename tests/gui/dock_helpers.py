"""What the dock-widget tests do as a user would: open the sample, set the dock up, paint, click and wait."""

import threading

import numpy as np
from qtpy.QtCore import Qt

from napari_dinofuse._napari.widgets import DinofuseWidget

LEFT = Qt.MouseButton.LeftButton


def make_dock(make_napari_viewer, qtbot, iterations=60):
    """A viewer with the sample open and the dock set to the random tiny backbone (NOT DINOv3), a 4-channel
    UNet on the cpu."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-dinofuse", "synthetic_em")
    widget = DinofuseWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.features_box.backbone_edit.setText("random:tiny")
    widget.features_box.device_combo.setCurrentText("cpu")
    widget.model_box.base_spin.setValue(4)
    widget.train_box.iterations_spin.setValue(iterations)
    widget.train_box.lr_spin.setValue(3e-3)
    return viewer, widget


def real_threads():
    """Python threads, without the placeholders Python registers for Qt's pool threads (never removed)."""
    return [t for t in threading.enumerate() if not isinstance(t, threading._DummyThread)]


def click_and_wait(qtbot, widget, button, timeout=300):
    qtbot.mouseClick(button, LEFT)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout * 1000)
    return widget.last_result


def load_and_wait(qtbot, widget, folder):
    widget.load_model(folder)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.session.model is not None, widget.status_row.status_label.text()


def paint_two_classes(viewer, widget, qtbot):
    """A few brush strokes of background (1) and mitochondria (2) placed with labels.paint, as a user does.

    Mitochondria are class 3 of the ground truth; painted as 2, since classes must be 1..K, every one painted.
    """
    from napari_dinofuse.synthetic.sample import make_sample

    truth = make_sample(seed=0).ground_truth
    truth = np.where(truth == 3, 2, np.where(truth == 1, 1, 0))
    qtbot.mouseClick(widget.train_box.new_labels_button, LEFT)
    labels = viewer.layers["annotations"]
    assert labels.data.shape == truth.shape and np.allclose(labels.scale, viewer.layers["raw"].scale)
    labels.brush_size = 3
    rng = np.random.default_rng(0)
    for value in (1, 2):
        z, y, x = np.nonzero(truth == value)
        for i in rng.choice(len(z), 40, replace=False):
            labels.paint((z[i], y[i], x[i]), value, refresh=False)
    labels.data[(labels.data > 0) & (labels.data != truth)] = 0  # strokes stay inside their class
    labels.refresh()
    return labels
