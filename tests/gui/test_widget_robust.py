"""A widget that cannot be broken: what a user may do in a real napari viewer while a job runs, or with inputs
that cannot be used, ends in one clear notification and leaves the layers and the last good model as they were.

Same set-up as tests/gui/test_widget.py (random tiny backbone, NOT DINOv3; a small UNet; Xvfb): fixtures in
tests/gui/conftest.py, helpers in tests/gui/dock_helpers.py.
"""

import os

import numpy as np
import pytest
from dock_helpers import LEFT, click_and_wait, make_dock, paint_two_classes, real_threads
from qtpy.QtCore import QThreadPool

from napari_dinofuse._napari.widgets import DinofuseWidget
from napari_dinofuse.progress import CANCELLED

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _layers(viewer) -> dict:
    """Every layer's identity, name and a copy of its data: what 'the layers are untouched' compares."""
    return {id(layer): (layer.name, np.array(layer.data, copy=True)) for layer in viewer.layers}


def _assert_untouched(viewer, before: dict) -> None:
    now = {id(layer): layer for layer in viewer.layers}
    assert list(now) == list(before), "layers added, removed or moved"
    for key, (name, data) in before.items():
        assert now[key].name == name and np.array_equal(np.asarray(now[key].data), data), name


def _weights(model) -> dict:
    return {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}


def _same_weights(model, weights: dict) -> bool:
    return all(np.array_equal(weights[k], v.detach().numpy()) for k, v in model.state_dict().items())


def _no_traceback(seen) -> bool:
    """No notification of an exception escaping (napari shows those with their traceback)."""
    return not any(type(n).__name__ == "ErrorNotification" or "unexpected" in str(n.message)
                   or "Traceback" in str(n.message) for n in seen)


def _configure(widget, iterations: int) -> None:
    widget.features_box.backbone_edit.setText("random:tiny")
    widget.features_box.device_combo.setCurrentText("cpu")
    widget.model_box.base_spin.setValue(4)
    widget.train_box.iterations_spin.setValue(iterations)
    widget.train_box.lr_spin.setValue(3e-3)


# -- 1. layers removed, renamed or chosen anew while a job runs -----------------------------------------------

def test_removing_an_input_layer_mid_fine_tune_stops_it_and_keeps_the_last_good_model(
        make_napari_viewer, qtbot, notifications):
    viewer, widget = make_dock(make_napari_viewer, qtbot, iterations=5)
    paint_two_classes(viewer, widget, qtbot)
    # The last good model:
    assert hasattr(click_and_wait(qtbot, widget, widget.train_box.train_button, timeout=600), "arrays")
    model, weights = widget.session.model, _weights(widget.session.model)
    widget.train_box.iterations_spin.setValue(100_000)

    for name in ("annotations", "context", "raw"):
        layer = viewer.layers[name]
        before = len(notifications)
        qtbot.mouseClick(widget.train_box.train_button, LEFT)
        qtbot.waitUntil(lambda: len(widget.train_box.loss_plot.losses) >= 1, timeout=600_000)
        viewer.layers.remove(layer)
        others = _layers(viewer)  # the prediction of the last good model included
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        assert widget.last_result is CANCELLED, name  # stopped instead of training on for 100 000 iterations
        seen = notifications[before:]
        assert len(seen) == 1, [str(n.message) for n in seen]
        message = str(seen[0].message)
        assert repr(name) in message and "removed" in message and "fine-tune" in message, message
        assert _no_traceback(seen)
        _assert_untouched(viewer, others)
        assert widget.session.model is model and _same_weights(model, weights), name
        assert widget.train_box.train_button.isEnabled() and not widget.status_row.cancel_button.isEnabled()
        viewer.layers.append(layer)  # the user brings it back: chosen again, as it was
        assert {widget.data_box.raw_combo.currentText(), widget.data_box.context_combo.currentText(),
                widget.train_box.labels_combo.currentText()} == {"raw", "context", "annotations"}

    # The last good model still predicts:
    result = click_and_wait(qtbot, widget, widget.predict_box.predict_button, timeout=600)
    assert hasattr(result, "arrays") and viewer.layers["prediction"].data is result.arrays["labels"]


def test_removing_an_input_layer_mid_extraction_stops_it(make_napari_viewer, qtbot, notifications, tmp_path):
    viewer, widget = make_dock(make_napari_viewer, qtbot, iterations=5)
    widget.features_box.planes_combo.setCurrentText("ortho")  # long enough to act half-way
    for name in ("context", "raw"):
        widget.features_box.cache_edit.setText(str(tmp_path / f"cache without {name}"))  # features not there yet
        layer = viewer.layers[name]
        before = len(notifications)
        qtbot.mouseClick(widget.features_box.extract_button, LEFT)
        qtbot.waitUntil(lambda: widget.status_row.progress_bar.value() > 0, timeout=60_000)
        viewer.layers.remove(layer)
        others = _layers(viewer)
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        assert widget.last_result is CANCELLED and widget.session.source is None, name
        seen = notifications[before:]
        assert len(seen) == 1, [str(n.message) for n in seen]
        message = str(seen[0].message)
        assert repr(name) in message and "removed" in message and "extract" in message, message
        assert _no_traceback(seen)
        _assert_untouched(viewer, others)
        viewer.layers.append(layer)
        data = widget.data_box
        assert (data.raw_combo.currentText(), data.context_combo.currentText()) == ("raw", "context")

    widget.features_box.planes_combo.setCurrentText("xy")  # (a third of the work of ortho)
    # The widget extracts as before:
    result = click_and_wait(qtbot, widget, widget.features_box.extract_button, timeout=600)
    assert result is not CANCELLED and widget.session.source is result


def test_renaming_or_choosing_another_layer_mid_job_changes_nothing(make_napari_viewer, qtbot, notifications):
    viewer, widget = make_dock(make_napari_viewer, qtbot, iterations=5)
    labels = paint_two_classes(viewer, widget, qtbot)
    raw = viewer.layers["raw"]
    before = len(notifications)

    qtbot.mouseClick(widget.train_box.train_button, LEFT)
    assert widget.worker is not None
    raw.name = "my raw"
    labels.name = "strokes"
    assert widget.data_box.raw_combo.layer() is raw and widget.train_box.labels_combo.layer() is labels  # still chosen
    qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
    assert hasattr(widget.last_result, "arrays")
    prediction = viewer.layers["prediction"]
    assert prediction.data.shape == raw.data.shape and np.allclose(prediction.translate, raw.translate)
    assert [layer.name for layer in viewer.layers][:3] == ["context", "my raw", "strokes"]

    # Another raw (and no context) chosen while Predict runs: the running job predicts what it started with.
    state = _layers(viewer)
    qtbot.mouseClick(widget.predict_box.predict_button, LEFT)
    assert widget.worker is not None
    widget.data_box.raw_combo.setCurrentText("context")
    widget.data_box.context_combo.setCurrentText("(none)")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=600_000)
    result = widget.last_result
    assert hasattr(result, "arrays") and viewer.layers["prediction"].data is result.arrays["labels"]
    assert np.allclose(viewer.layers["prediction"].scale, raw.scale)  # on the raw it started with
    for layer in viewer.layers:  # the inputs are untouched; only our result layers were updated
        if layer.name in ("context", "my raw", "strokes"):
            assert np.array_equal(layer.data, state[id(layer)][1])
    assert len(notifications) == before and _no_traceback(notifications)
    data = widget.data_box
    assert (data.raw_combo.currentText(), data.context_combo.currentText()) == ("context", "(none)")


def test_a_removed_training_preview_stays_removed_and_the_fine_tune_goes_on(make_napari_viewer, qtbot,
                                                                            notifications):
    from napari_dinofuse._napari.widgets.dock import PREVIEW
    from napari_dinofuse.progress import Preview

    viewer, widget = make_dock(make_napari_viewer, qtbot, iterations=8)
    paint_two_classes(viewer, widget, qtbot)
    before = len(notifications)
    added, previews, handle = [], [], widget._on_progress
    viewer.layers.events.inserted.connect(lambda event: added.append(event.value.name))

    def on_step(p):
        handle(p)
        if isinstance(p.partial, Preview):
            previews.append(p.partial.iteration)
            if PREVIEW in viewer.layers:
                viewer.layers.remove(PREVIEW)  # the user does not want it

    widget._on_progress = on_step
    click_and_wait(qtbot, widget, widget.train_box.train_button)
    assert previews == [2, 4, 6] and added.count(PREVIEW) == 1 and PREVIEW not in viewer.layers
    result = widget.last_result
    assert hasattr(result, "arrays") and viewer.layers["prediction"].data is result.arrays["labels"]
    assert len(notifications) == before and _no_traceback(notifications)


# -- 2. inputs that cannot be used ----------------------------------------------------------------------------

def test_unusable_inputs_are_refused_before_any_work(make_napari_viewer, qtbot, notifications):
    viewer, widget = make_dock(make_napari_viewer, qtbot, iterations=5)
    labels = paint_two_classes(viewer, widget, qtbot)
    raw = viewer.layers["raw"]
    viewer.add_image(np.zeros((8, 64, 64, 3), np.uint8), name="colour stack", rgb=True)
    viewer.add_image(np.zeros((2, 8, 64, 64), np.uint8), name="time series")
    viewer.add_labels(np.zeros((16, 128, 128), np.uint8), name="half size", scale=np.array(raw.scale) * 2,
                      translate=raw.translate)
    viewer.layers["half size"].data[8, 60:70, 60:70], viewer.layers["half size"].data[4, :5, :5] = 2, 1
    negative = labels.data.astype(np.int16)
    negative[0, :4, :4] = -1  # e.g. a "no data" value from another tool
    viewer.add_labels(negative, name="with -1", scale=raw.scale, translate=raw.translate)
    before_all = _layers(viewer)
    threads = QThreadPool.globalInstance().activeThreadCount()

    cases = [  # (raw, labels, buttons, what the message must say besides the layer's name)
        ("colour stack", "annotations", (widget.features_box.extract_button, widget.train_box.train_button), "RGB"),
        ("time series", "annotations", (widget.features_box.extract_button, widget.train_box.train_button), "4D"),
        ("raw", "half size", (widget.train_box.train_button,), "shape"),
        ("raw", "with -1", (widget.train_box.train_button,), "negative"),
    ]
    for raw_name, labels_name, buttons, what in cases:
        widget.data_box.raw_combo.setCurrentText(raw_name)
        widget.train_box.labels_combo.setCurrentText(labels_name)
        culprit = raw_name if raw_name != "raw" else labels_name
        for button in buttons:
            before = len(notifications)
            qtbot.mouseClick(button, LEFT)
            assert widget.worker is None, (culprit, button.text())  # refused before a worker started
            seen = notifications[before:]
            assert len(seen) == 1 and seen[0].severity == "error", [str(n.message) for n in seen]
            message = str(seen[0].message)
            assert repr(culprit) in message and what in message, message
            assert _no_traceback(seen)
    assert QThreadPool.globalInstance().activeThreadCount() == threads
    _assert_untouched(viewer, before_all)
    assert widget.session.model is None and widget.session.source is None and "prediction" not in viewer.layers


# -- 3. the dock closed while a job runs -----------------------------------------------------------------------

def test_closing_the_dock_mid_job_stops_it_and_a_new_dock_carries_on(make_napari_viewer, qtbot, notifications):
    viewer, widget = make_dock(make_napari_viewer, qtbot, iterations=100_000)
    paint_two_classes(viewer, widget, qtbot)
    cancel = widget._cancel
    qtbot.mouseClick(widget.train_box.train_button, LEFT)
    qtbot.waitUntil(lambda: len(widget.train_box.loss_plot.losses) >= 1, timeout=600_000)
    state = _layers(viewer)
    viewer.window.remove_dock_widget(widget)  # what the dock's close button does
    qtbot.waitUntil(cancel.is_set, timeout=10_000)
    assert QThreadPool.globalInstance().waitForDone(60_000)  # the worker ended instead of training on
    qtbot.wait(100)  # its last signals are delivered
    assert widget.last_result is CANCELLED
    _assert_untouched(viewer, state)  # the closed dock shows nothing
    threads = len(real_threads())

    second = DinofuseWidget(viewer)
    viewer.window.add_dock_widget(second)
    _configure(second, iterations=5)
    assert second.train_box.labels_combo.currentText() == "annotations"
    assert hasattr(click_and_wait(qtbot, second, second.train_box.train_button, timeout=600), "arrays")
    result = click_and_wait(qtbot, second, second.predict_box.predict_button, timeout=600)
    assert hasattr(result, "arrays") and viewer.layers["prediction"].data is result.arrays["labels"]
    assert QThreadPool.globalInstance().waitForDone(10_000) and len(real_threads()) <= threads
    assert _no_traceback(notifications)


# -- 4. a cache folder that cannot be written -----------------------------------------------------------------

def _extract_into(qtbot, widget, folder):
    widget.features_box.cache_edit.setText(str(folder))
    widget.features_box.cache_edit.editingFinished.emit()
    return click_and_wait(qtbot, widget, widget.features_box.extract_button, timeout=600)


def _complete_entries(folder) -> list:
    from napari_dinofuse.features.cache import FeatureCache

    return [e for e in FeatureCache(folder).entries() if e.fraction_done == 1.0]


def test_a_cache_folder_that_cannot_be_written_stops_extract_with_its_name(
        make_napari_viewer, qtbot, notifications, tmp_path):
    _, widget = make_dock(make_napari_viewer, qtbot, iterations=5)
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    for bad in (blocker, blocker / "cache"):  # the folder is a file, or lies under one: it cannot be created
        before = len(notifications)
        _extract_into(qtbot, widget, bad)
        seen = notifications[before:]
        assert len(seen) == 1 and seen[0].severity == "error", [str(n.message) for n in seen]
        assert str(bad) in str(seen[0].message) and _no_traceback(seen), str(seen[0].message)
        assert widget.session.source is None and widget.features_box.extract_button.isEnabled()
        assert "⚠" in widget.features_box.cache_size.text() and str(bad) in widget.features_box.cache_size.text()

    blocker.unlink()  # the user frees the path: the same folder now works
    assert _extract_into(qtbot, widget, blocker) is widget.session.source is not None
    assert len(_complete_entries(blocker)) == 2  # raw and context


def test_a_read_only_cache_folder_stops_extract_with_its_name(make_napari_viewer, qtbot, notifications, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user can write into a read-only folder (root): chmod proves nothing here")
        _, widget = make_dock(make_napari_viewer, qtbot, iterations=5)
        before = len(notifications)
        _extract_into(qtbot, widget, folder)
        seen = notifications[before:]
        assert len(seen) == 1 and str(folder) in str(seen[0].message) and _no_traceback(seen)
        assert widget.session.source is None and not any(folder.iterdir())  # nothing half-written
        folder.chmod(0o755)
        assert _extract_into(qtbot, widget, folder) is widget.session.source is not None
        assert len(_complete_entries(folder)) == 2
    finally:
        folder.chmod(0o755)
