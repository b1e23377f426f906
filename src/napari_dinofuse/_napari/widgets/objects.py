"""The Objects section: objects of chosen classes from the prediction, with their measurements as features.

Only the form lives here; the dock runs the engine in its worker
(:func:`~napari_dinofuse.inference.instances.find_objects` in memory, or
:func:`~napari_dinofuse.inference.instances.objects_in_prediction` on a prediction folder, memory bounded by a
block) and hands the result back to :meth:`ObjectsBox.show`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
)

from ...errors import DinofuseError
from ...geometry import Grid
from .results import MARK, ours

ROLE = "instances"


def _named(viewer, role: str):
    """The dock's own layer for ``role``, else one of that name (a saved prediction opened with the reader)."""
    layer = ours(viewer, role)
    return layer if layer is not None else next((item for item in viewer.layers if item.name == role), None)


def prediction_layer(viewer):
    """The prediction to find objects in, or None."""
    layer = _named(viewer, "prediction")
    return layer if layer is not None and layer._type_string == "labels" else None


def _beside(viewer, prediction, role: str):
    """The data of the ``role`` layer on the prediction's grid (the uncertainty), or None."""
    layer = _named(viewer, role)
    if layer is None or tuple(layer.data.shape) != tuple(prediction.data.shape) or not (
            np.allclose(layer.scale, prediction.scale) and np.allclose(layer.translate, prediction.translate)):
        return None
    return layer.data  # replaced, never written into, by a new prediction: no copy needed


def shown_results(viewer) -> dict:
    """What Save results… writes: the prediction and, on its grid, the uncertainty, attention maps and objects,
    as name in the prediction folder -> (data, Grid); {} when there is no prediction."""
    from ...defaults import NUM_LEVELS, attention_array, attention_layer

    prediction = prediction_layer(viewer)
    if prediction is None:
        return {}
    grid = Grid(prediction.data.shape, tuple(prediction.scale), tuple(prediction.translate))
    roles = {"labels": None, "uncertainty": "uncertainty", ROLE: ROLE,
             **{attention_array(k): attention_layer(k) for k in range(1, NUM_LEVELS + 1)}}
    images = {}
    for name, role in roles.items():
        data = prediction.data if role is None else _beside(viewer, prediction, role)
        if data is not None:
            images[name] = (data, grid)
    return images


@dataclass
class ObjectsRequest:
    labels: object  # the class map (numpy, or lazily read from a store)
    grid: Grid
    uncertainty: object | None
    settings: object  # ObjectSettings
    class_names: list[str] | None
    store: Path | None  # the prediction folder it was read from: objects are then written there


def shown_folder(layer) -> Path | None:
    """The prediction folder a layer shows (predicted to disk, or opened with the reader), or None."""
    path = layer.metadata.get("store") or getattr(getattr(layer, "source", None), "path", None)
    if not path:
        return None
    path = Path(path).expanduser().absolute()
    return path if (path / "labels").is_dir() else None


def prediction_store(layer) -> Path | None:
    """The prediction folder a layer shows if objects can be found there (it has the probabilities), or None."""
    path = shown_folder(layer)
    return path if path is not None and (path / "probabilities").is_dir() else None


def layer_class_names(layer) -> list[str]:
    """Class names a prediction layer carries: ours in its metadata, a saved one's in its features."""
    names = list(layer.metadata.get("class names", {}).values())
    if not names and "class" in layer.features:
        names = [str(n) for n in layer.features["class"]][1:]  # row 0 names label 0, 'unpainted'
    return names


class ObjectsBox(QGroupBox):
    def __init__(self, parent):
        super().__init__("Objects (instances and measurements)", parent)
        self.table = None  # the last ObjectTable shown
        form = QFormLayout(self)
        self.classes_edit = QLineEdit()
        self.classes_edit.setPlaceholderText("e.g. 3,4 or mitochondrion")
        self.classes_edit.setToolTip("Classes whose objects to find: label values (2, 3, …) or the model's class "
                                     "names, comma-separated. Empty: every class but background (1)")
        self.min_size_spin = QDoubleSpinBox()
        self.min_size_spin.setRange(0, 1e15)
        self.min_size_spin.setDecimals(0)
        self.min_size_spin.setSingleStep(10_000)
        self.min_size_spin.setSuffix(" nm³")
        self.min_size_spin.setToolTip("Objects smaller than this volume are dropped (nm³; a 50 nm ball is "
                                      "~65,000 nm³). 0 keeps every object")
        self.split_spin = QDoubleSpinBox()
        self.split_spin.setRange(0, 10_000)
        self.split_spin.setDecimals(1)
        self.split_spin.setSuffix(" nm")
        self.split_spin.setToolTip("Split touching objects where the neck between them is at least this much "
                                   "narrower (in radius, nm) than the objects; 0 = no splitting (e.g. 20 for "
                                   "touching mitochondria)")
        self.fill_check = QCheckBox("fill enclosed holes")
        self.fill_check.setChecked(True)
        self.fill_check.setToolTip("Voxels of another class enclosed by an object belong to it (e.g. cristae "
                                   "inside a mitochondrion)")
        self.find_button = QPushButton("Find objects")
        self.find_button.setToolTip("Objects of the chosen classes in the 'prediction' layer, as an 'instances' "
                                    "Labels layer; hover an object to see its measurements")
        self.save_button = QPushButton("Save table…")
        self.save_button.setToolTip("Write the objects' measurements (volume, surface, centroid, box in nm, mean "
                                    "probability and uncertainty) as CSV")
        self.save_button.setEnabled(False)
        form.addRow("classes", self.classes_edit)
        form.addRow("min size", self.min_size_spin)
        form.addRow("split necks", self.split_spin)
        form.addRow(self.fill_check)
        row = QHBoxLayout()
        row.addWidget(self.find_button)
        row.addWidget(self.save_button)
        form.addRow(row)

    def request(self, viewer, class_names) -> ObjectsRequest:
        """What to find objects in, and how, read on the main thread; DinofuseError when there is no prediction
        or the settings are wrong."""
        from ...inference.instances import ObjectSettings, parse_classes

        layer = prediction_layer(viewer)
        if layer is None:
            raise DinofuseError("no prediction yet: click Predict (or Fine-tune), or open a saved prediction")
        store = prediction_store(layer)
        labels = layer.data
        if isinstance(labels, np.ndarray):
            labels = labels.copy()  # the layer may change (a new prediction) while this runs
        names = layer_class_names(layer) or list(class_names or [])
        num_classes = len(names) if names else int(np.max(labels)) if isinstance(labels, np.ndarray) else 0
        text = self.classes_edit.text().strip()
        classes = parse_classes(text, names) if text else tuple(range(2, max(num_classes, 2) + 1))
        settings = ObjectSettings(classes, min_size_nm3=self.min_size_spin.value(),
                                  fill_holes=self.fill_check.isChecked(), split_depth_nm=self.split_spin.value())
        if names:
            settings.check_classes(len(names), names)
        grid = Grid(labels.shape, tuple(layer.scale), tuple(layer.translate))
        return ObjectsRequest(labels, grid, _beside(viewer, layer, "uncertainty"), settings, names or None, store)

    def show(self, viewer, result, grid):
        """Add or update the ``instances`` layer, its measurements as the layer's features."""
        out, table = result
        self.table = table
        layer = ours(viewer, ROLE)
        features = {name: values for name, values in table.columns.items()}
        if layer is None:
            layer = viewer.add_labels(out, name=ROLE, metadata={MARK: ROLE}, scale=grid.voxel_size,
                                      translate=grid.offset, opacity=0.6)
        else:
            layer.data = out
            layer.scale, layer.translate = grid.voxel_size, grid.offset
        layer.features = features
        self.save_button.setEnabled(True)
        return layer

    def save_table(self, folder: str) -> str | None:
        """Ask where, then write the table; the path written, or None if the user cancelled."""
        if self.table is None:
            return None
        path, _ = QFileDialog.getSaveFileName(self, "Save the objects' measurements", folder,
                                              "CSV table (*.csv)")
        if not path:
            return None
        if not path.lower().endswith(".csv"):
            path += ".csv"
        self.table.save_csv(path)
        return path
