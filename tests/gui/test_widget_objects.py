"""Objects in the dock on a saved prediction opened with the reader: layer, features, hover, table, refusals."""

import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog

from napari_dinofuse._napari.reader import read
from napari_dinofuse._napari.widgets import DinofuseWidget
from napari_dinofuse.geometry import Grid
from napari_dinofuse.inference.instances import read_table_csv
from napari_dinofuse.inference.outputs import ZarrSink

NAMES = ["background", "membrane", "mitochondrion"]




def _saved_prediction(path):
    """Two touching balls of mitochondrion (class 3) and one apart, as `dinofuse predict` would store them."""
    vs = (8.0, 4.0, 4.0)
    labels = np.ones((20, 64, 96), np.uint8)
    zyx = np.indices(labels.shape) * np.reshape(vs, (3, 1, 1, 1))
    for centre in ((80, 128, 100), (80, 128, 188), (80, 40, 340)):
        labels[sum((zyx[a] - centre[a]) ** 2 for a in range(3)) <= 48**2] = 3
    grid = Grid(labels.shape, vs, (16.0, 0.0, 0.0))
    region = (slice(None),) * 3
    sink = ZarrSink(path, chunks=(8, 32, 32))
    for name, values in (("labels", labels), ("probabilities", np.eye(3, dtype=np.float16)[labels - 1]
                                                .transpose(3, 0, 1, 2)),
                         ("uncertainty", np.full(labels.shape, 0.1, np.float16))):
        sink.create(name, values.shape, values.dtype, grid)
        sink.write(name, region, values)
    sink.set_info(class_names=NAMES)
    sink.finish()
    return labels


def test_objects_of_a_saved_prediction_become_a_layer_with_measurements(make_napari_viewer, qtbot, tmp_path,
                                                                        notifications, monkeypatch):
    labels = _saved_prediction(tmp_path / "pred.zarr")
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "pred.zarr"), plugin="napari-dinofuse")
    widget = DinofuseWidget(viewer)
    viewer.window.add_dock_widget(widget)
    box = widget.objects_box
    assert not box.save_button.isEnabled()  # nothing to save yet

    box.classes_edit.setText("nucleus")  # not a class of this prediction: refused, nothing added
    qtbot.mouseClick(box.find_button, Qt.MouseButton.LeftButton)
    assert "instances" not in viewer.layers and widget.worker is None
    assert "'nucleus'" in str(notifications[-1].message) and "mitochondrion" in str(notifications[-1].message)

    box.classes_edit.setText("Mitochondrion")
    box.split_spin.setValue(10)
    qtbot.mouseClick(box.find_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    instances = viewer.layers["instances"]
    prediction = viewer.layers["prediction"]
    assert np.allclose(instances.scale, prediction.scale) and np.allclose(instances.translate, prediction.translate)
    found = np.asarray(instances.data)  # read lazily from the prediction folder, where they were written
    assert (tmp_path / "pred.zarr" / "instances" / "measurements.csv").is_file()
    assert np.array_equal(np.asarray(prediction.data), labels)  # the saved prediction itself is untouched
    assert int(found.max()) == 3  # the touching pair split in two, plus the one apart
    assert np.array_equal(found > 0, labels == 3)
    rows = instances.features
    assert list(rows["class_name"]) == ["mitochondrion"] * 3
    ball = 4 / 3 * np.pi * 48**3
    assert rows["volume_nm3"].sum() == pytest.approx(3 * ball, rel=0.05)
    assert np.allclose(rows["mean_uncertainty"], 0.1, atol=1e-3)
    assert "3 objects" in widget.status_row.status_label.text() and "pred.zarr" in widget.status_row.status_label.text()

    # Hovering an object shows its row.
    centre = np.argwhere(found == 3).mean(axis=0).round().astype(int)
    world = instances.data_to_world(centre)
    viewer.dims.set_point(0, world[0])
    status = instances.get_status(tuple(world), world=True)["coordinates"]
    assert "volume_nm3" in status and "mitochondrion" in status

    # Save table… writes what the layer shows.
    target = tmp_path / "objects"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), "CSV table (*.csv)"))
    qtbot.mouseClick(box.save_button, Qt.MouseButton.LeftButton)
    saved = read_table_csv((tmp_path / "objects.csv").read_text())
    assert saved["index"].tolist() == [1, 2, 3]
    assert np.allclose(saved["volume_nm3"], rows["volume_nm3"])

    # Save results… into another folder: the reader opens prediction, uncertainty and objects again, in place.
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "results"), ""))
    qtbot.mouseClick(widget.predict_box.save_results_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "results saved to" in widget.status_row.status_label.text()
    reopened = {meta["name"]: (data, meta) for data, meta, _ in read(str(tmp_path / "results.zarr"))}
    assert set(reopened) == {"prediction", "uncertainty", "instances"}
    data, meta = reopened["instances"]
    assert np.array_equal(np.asarray(data), found) and meta["features"]["volume_nm3"].tolist() == pytest.approx(
        rows["volume_nm3"].tolist())
    data, meta = reopened["prediction"]
    assert np.array_equal(np.asarray(data), labels) and list(meta["features"]["class"])[1:] == NAMES
    assert np.allclose(meta["scale"], prediction.scale) and np.allclose(meta["translate"], prediction.translate)
    # ...but never over the folder the prediction is shown from.
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "pred.zarr"), ""))
    qtbot.mouseClick(widget.predict_box.save_results_button, Qt.MouseButton.LeftButton)
    assert widget.worker is None and "shown from" in str(notifications[-1].message)
    assert np.array_equal(np.asarray(prediction.data), labels)

    # Again with a minimum size above one ball: the same layer, now empty of small objects.
    box.min_size_spin.setValue(2 * ball)
    qtbot.mouseClick(box.find_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert viewer.layers["instances"] is instances and np.asarray(instances.data).max() == 0
    assert len(instances.features) == 0
