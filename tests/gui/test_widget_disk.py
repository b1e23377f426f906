"""Predict to disk: a region too large to hold in memory is written block by block into an OME-Zarr folder the
user chooses, shown read lazily from there, and objects are then found on disk (real viewer, Xvfb; random tiny
backbone, NOT DINOv3, as in tests/gui/test_widget.py)."""

import dask.array as da
import numpy as np
import pytest
from dock_helpers import LEFT, click_and_wait, make_dock, paint_two_classes
from qtpy.QtWidgets import QFileDialog

import napari_dinofuse.session as session_module
from napari_dinofuse._napari.reader import read
from napari_dinofuse._napari.widgets.dock import WRITING

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _choose(monkeypatch, path):
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(path), "OME-Zarr (*.zarr)"))


def test_predict_to_disk_shows_the_same_prediction_lazily_and_objects_are_found_there(
        make_napari_viewer, qtbot, notifications, tmp_path, monkeypatch):
    viewer, widget = make_dock(make_napari_viewer, qtbot, iterations=5)
    paint_two_classes(viewer, widget, qtbot)
    assert not widget.predict_box.predict_disk_button.isEnabled()  # no model yet
    in_memory = click_and_wait(qtbot, widget, widget.train_box.train_button, timeout=600).arrays["labels"].copy()
    assert widget.predict_box.predict_disk_button.isEnabled()

    # Save results… of the prediction held in memory: the reader opens it again, in place, attention maps too.
    _choose(monkeypatch, tmp_path / "kept.zarr")
    folder = click_and_wait(qtbot, widget, widget.predict_box.save_results_button)
    reopened = {meta["name"]: (data, meta) for data, meta, _ in read(str(folder))}
    assert {"prediction", "uncertainty", "attention level 1"} <= set(reopened)
    assert np.array_equal(np.asarray(reopened["prediction"][0]), in_memory)
    assert np.allclose(reopened["prediction"][1]["scale"], viewer.layers["prediction"].scale)

    # Too large to show in memory (lowered limit): refused with the way out named, the shown prediction kept.
    monkeypatch.setattr(session_module, "MAX_RESULT_BYTES", 1)
    click_and_wait(qtbot, widget, widget.predict_box.predict_button)
    assert "Predict to disk" in str(notifications[-1].message)
    assert np.array_equal(viewer.layers["prediction"].data, in_memory)

    # Predict to disk, the raw now read lazily too (dask, as a volume larger than memory is opened): the folder
    # gets the prediction, the layers read it lazily, the same labels.
    raw = viewer.layers["raw"]
    raw.data = da.from_array(np.asarray(raw.data), chunks=(8, 64, 64))
    _choose(monkeypatch, tmp_path / "big")  # ".zarr" is added
    layers_before = [id(layer) for layer in viewer.layers]
    monkeypatch.setattr(session_module, "DISK_BLOCK", (16, 128, 128))  # 8 blocks, shown as they are written
    qtbot.mouseClick(widget.predict_box.predict_disk_button, LEFT)
    writing = lambda: WRITING in viewer.layers and np.asarray(viewer.layers[WRITING].data).any()  # noqa: E731
    qtbot.waitUntil(lambda: writing() or widget.worker is None, timeout=300_000)
    assert widget.worker is not None and writing()  # blocks appear while the rest is still being computed
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    result = widget.last_result
    assert WRITING not in viewer.layers  # replaced by the finished layers
    assert result.path == tmp_path / "big.zarr" and (tmp_path / "big.zarr" / "labels").is_dir()
    prediction = viewer.layers["prediction"]
    assert [id(layer) for layer in viewer.layers] == layers_before  # the same layers, now backed by the folder
    on_disk = np.asarray(prediction.data)
    assert not isinstance(prediction.data, np.ndarray) and not isinstance(viewer.layers["uncertainty"].data,
                                                                          np.ndarray)
    # The same prediction: up to the block seams' rounding (other blocks than in memory), as tiles are.
    agreement = float(np.mean(on_disk == in_memory))
    assert agreement >= 0.995, agreement

    # Objects of class 2 are written beside it, on disk, and shown from there.
    widget.objects_box.classes_edit.setText("2")
    widget.objects_box.fill_check.setChecked(False)  # holes kept: the objects are exactly the class-2 voxels
    click_and_wait(qtbot, widget, widget.objects_box.find_button)
    instances = viewer.layers["instances"]
    assert (tmp_path / "big.zarr" / "instances" / "measurements.csv").is_file()
    assert np.array_equal(np.asarray(instances.data) > 0, on_disk == 2)
    assert "big.zarr" in widget.status_row.status_label.text()

    # A folder that is not a prediction is refused before any work, and nothing in it is touched.
    other = tmp_path / "notes.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    _choose(monkeypatch, other)
    before = len(notifications)
    click_and_wait(qtbot, widget, widget.predict_box.predict_disk_button)
    assert len(notifications) == before + 1 and "not a dinofuse prediction" in str(notifications[-1].message)
    assert [p.name for p in other.iterdir()] == ["keep.txt"] and (other / "keep.txt").read_text() == "mine"
    assert viewer.layers["prediction"] is prediction and np.array_equal(np.asarray(prediction.data), on_disk)
