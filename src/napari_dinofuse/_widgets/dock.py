"""The DINOfuse dock widget: data, features, model, fine-tune, predict, attention, cancel.

Thin driver: every action is a :class:`~napari_dinofuse.session.Session` generator run in a napari
``GeneratorWorker`` thread; this module only reads the widgets and layers (main thread), shows progress and
puts results into layers (main thread, in the worker's signal slots). Torch is imported by the worker, never
when the widget is built, so napari's start-up and the Plugins menu stay fast.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import traceback
from pathlib import Path

import numpy as np
from qtpy.QtCore import QEvent, QSettings, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .. import defaults
from ..defaults import BACKBONE_ENV, default_backbone_spec
from ..display import (
    ATTENTION_LEGEND,
    attention_style,
    class_features,
    fit_camera,
    label_colormap,
    prediction_style,
)
from ..errors import DinofuseError, InputError
from ..geometry import Volume, triple
from ..progress import CANCELLED, cancellable
from ..session import Session, SessionSettings
from .loss_plot import LossPlot
from .objects import ObjectsBox, layer_class_names, prediction_layer, shown_folder, shown_results
from .results import ATTENTION_LAYERS, MARK, ours, show_prediction

NONE = "(none)"
WRITING = "prediction (being written)"  # the temporary layer of a prediction to disk that runs
WHOLE, AROUND_VIEW = "whole volume", "region around the view"
# Below this many raw voxels "Fine-tune" and "Predict" default to the whole volume, above to the view.
WHOLE_VOLUME_DEFAULT_MAX = 256**3
SNAPSHOT_MAX_BYTES = 2**30  # labels up to this size are copied before training (the user may paint on)
# Viewer shortcuts while the dock is shown (napari key names; none is bound by napari itself).
FINE_TUNE_KEY, PREDICT_KEY = "Control-Shift-F", "Control-Shift-R"


def user_settings() -> QSettings:
    """Qt's per-user settings store (~/.config/napari-dinofuse/dinofuse.ini on Linux): it outlives napari
    sessions and is not a file in the working directory. Tests point it elsewhere with QSettings.setPath."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, "napari-dinofuse", "dinofuse")


def _key_text(key: str) -> str:
    return key.replace("Control", "Ctrl").replace("-", "+")


def _xyz_text(values) -> str:
    return ", ".join(f"{float(v):g}" for v in values)


def _parse_xyz(text: str, what: str, positive: bool = False) -> tuple[float, float, float]:
    """Three numbers 'z, y, x' (nm) typed in a field; whether they are finite (and, with ``positive``, above 0)
    is the geometry's rule (:func:`~napari_dinofuse.geometry.triple`). Anything else is a DinofuseError."""
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise DinofuseError(f"{what}: enter three numbers 'z, y, x' in nm, got {text!r}")
    return triple(values, what, positive)


def _describe_error(exc: BaseException) -> str:
    """A message that says what to do; unexpected errors keep their type and go to the log with a traceback."""
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return ("out of memory: lower the base channels or the tile size, predict a smaller region, or choose "
                "the cpu device")
    if isinstance(exc, (DinofuseError, ValueError, OSError)):
        return str(exc)
    traceback.print_exception(exc)
    return f"unexpected {name}: {exc} (details in the terminal log)"


def _level0(layer):
    """The full-resolution array of a layer (level 0 of a multiscale one)."""
    return layer.data[0] if layer.multiscale else layer.data


def _check_labels(name: str, labels, raw: Volume) -> None:
    """The chosen labels layer fits the raw: refused at once, naming it (the worker checks the strokes again)."""
    shape = tuple(labels.shape)
    if shape != tuple(raw.shape):
        raise DinofuseError(f"labels layer {name!r} has shape {shape} but the raw {raw.name!r} has {raw.shape}: "
                            "paint on a labels layer with the raw's shape (e.g. 'New annotation layer')")
    if isinstance(labels, np.ndarray) and np.dtype(labels.dtype).kind == "i" and labels.size and labels.min() < 0:
        raise DinofuseError(f"labels layer {name!r} has negative values (down to {labels.min()}): labels are "
                            f"{defaults.LABEL_CONVENTION}; set them to 0 or renumber them")


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _LayerCombo(QComboBox):
    """Layers of one kind (Image or Labels) in the viewer, kept in sync with the layer list.

    The choice follows the layer itself (item data = its id), so renaming the chosen layer keeps it chosen.
    A stand-in choice (the first layer, because none was named ``prefer``) gives way to a ``prefer`` layer when
    one appears (the sample adds the context before the raw); a layer chosen by the user or a script stays.
    """

    def __init__(self, viewer, kind: str, allow_none: bool = False, prefer: str | None = None):
        super().__init__()
        self.viewer, self.kind, self.allow_none, self.prefer = viewer, kind, allow_none, prefer
        self.stand_in = False
        # refresh() blocks signals: this sees only choices made from outside (a click, setCurrentText).
        self.currentIndexChanged.connect(lambda _: setattr(self, "stand_in", False))
        self.refresh()

    def layers(self):
        return [layer for layer in self.viewer.layers
                if type(layer).__name__ == self.kind and layer.metadata.get(MARK) is None]

    def refresh(self) -> None:
        chosen, text = self.currentData(), self.currentText()
        self.blockSignals(True)
        self.clear()
        if self.allow_none:
            self.addItem(NONE, None)
        for layer in self.layers():
            self.addItem(layer.name, id(layer))
        index = self.findData(chosen) if chosen is not None else -1
        preferred = self.findText(self.prefer) if self.prefer is not None else -1
        if index < 0 or self.stand_in:
            index = preferred
            self.stand_in = preferred < 0 and self.count() > (1 if self.allow_none else 0)
        self.setCurrentIndex(max(index, 0))
        self.blockSignals(False)
        if self.currentText() != text:
            self.currentTextChanged.emit(self.currentText())

    def layer(self):
        wanted = self.currentData()
        return next((layer for layer in self.layers() if id(layer) == wanted), None)


class DinofuseWidget(QWidget):
    """One dock widget for the whole workflow, top to bottom."""

    job_ended = Signal()  # a job and the showing of its result are over: the buttons are free again

    def __init__(self, napari_viewer, settings: QSettings | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.store = settings if settings is not None else user_settings()
        self.session = Session()
        self.worker = None
        self._cancel = threading.Event()
        self._progress = None  # napari activity-dock progress bar of the running job
        self._job_started = 0.0
        self._on_done = None  # what the running job's value goes to (see _start)
        self._steps = None  # the rest of on_done's main-thread work, one step per event-loop tick
        self._writing = None  # the ZarrSink of a prediction to disk that runs: shown while it is written
        self._writing_layer = None  # its temporary layer; False once the user removed it
        self._writing_shown = 0.0
        self._step_timer = QTimer(self)  # a child: it dies with the widget, pending steps with it
        self._step_timer.setSingleShot(True)
        self._step_timer.timeout.connect(self._step)
        self._uses = ()  # the layers the running job reads: removing one stops it
        self._lost = []  # names of those removed while it ran
        self._model_before = None  # the session's model when the running job started
        self._docked = True  # False once taken out of its dock: a job it started shows nothing
        self.last_result = None  # what the last job returned (the sink, CANCELLED, or a _Failed)
        self._fitted = None  # id of the raw layer the camera was last fitted to
        self._bound = []  # viewer shortcuts this dock bound
        self._last_good = {}  # voxel-size / offset field -> its last valid text

        layout = QVBoxLayout(self)
        layout.addWidget(self._data_box())
        layout.addWidget(self._features_box())
        layout.addWidget(self._model_box())
        layout.addWidget(self._train_box())
        layout.addWidget(self._predict_box())
        layout.addWidget(self._attention_box())
        self.objects_box = ObjectsBox(self)
        self.objects_box.find_button.clicked.connect(self.find_objects)
        self.objects_box.save_button.clicked.connect(self.save_objects_table)
        layout.addWidget(self.objects_box)
        layout.addLayout(self._status_row())
        layout.addStretch(1)

        # Closing napari mid-run: the worker stops at its next batch (the event outlives the widget).
        self.destroyed.connect(self._cancel.set)
        events = self.viewer.layers.events
        events.removed.connect(self._on_layer_removed)
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._refresh_layers)
        events.inserted.connect(self._on_layer_inserted)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        self._refresh_layers()
        self._prefill("raw")
        self._prefill("context")
        self._restore()
        self._update_buttons()
        self._bind_keys(True)  # also before the viewer window is first shown

    # -- remembered between napari sessions -------------------------------------------------------

    def _remembered(self):
        """(key, getter, setter, change signal) of every setting that persists."""
        combo = lambda c: (c.currentText, c.setCurrentText, c.currentTextChanged)  # noqa: E731
        return [
            ("backbone", self.backbone_edit.text, self.backbone_edit.setText, self.backbone_edit.editingFinished),
            ("device", *combo(self.device_combo)),
            ("planes", *combo(self.planes_combo)),
            ("cache", self.cache_edit.text, self.cache_edit.setText, self.cache_edit.editingFinished),
            ("fusion", *combo(self.fusion_combo)),
            ("base channels", self.base_spin.value, lambda v: self.base_spin.setValue(int(v)),
             self.base_spin.valueChanged),
            ("intensity stem", self.stem_check.isChecked, lambda v: self.stem_check.setChecked(str(v) == "true"),
             self.stem_check.toggled),
        ]

    def _restore(self) -> None:
        for key, _, set_value, changed in self._remembered():
            value = self.store.value(key)
            # $DINOFUSE_BACKBONE, when set, is an explicit choice for this napari session: it wins.
            if value not in (None, "") and not (key == "backbone" and os.environ.get(BACKBONE_ENV)):
                try:
                    set_value(value)
                except (TypeError, ValueError):  # a hand-edited store: keep the default
                    pass
            changed.connect(lambda *_, key=key: self._remember(key))
        self._show_cache_size()

    def _remember(self, key: str) -> None:
        value = dict((k, get) for k, get, _, _ in self._remembered())[key]()
        self.store.setValue(key, value)

    def _folder(self, key: str) -> str:
        """The folder a file dialog opens in: where the last one of its kind was chosen."""
        return str(self.store.value(f"last folder/{key}", "") or "")

    def _chose(self, key: str, path) -> None:
        if path:
            self.store.setValue(f"last folder/{key}", os.path.dirname(os.path.abspath(str(path).rstrip("/"))))

    # -- layout -----------------------------------------------------------------------------------

    def _data_box(self) -> QGroupBox:
        box = QGroupBox("Data")
        form = QFormLayout(box)
        self.raw_combo = _LayerCombo(self.viewer, "Image", prefer="raw")
        self.context_combo = _LayerCombo(self.viewer, "Image", allow_none=True, prefer="context")
        self.raw_voxel, self.raw_offset = QLineEdit(), QLineEdit()
        self.context_voxel, self.context_offset = QLineEdit(), QLineEdit()
        open_row = QHBoxLayout()
        for text, folder in (("Open .tif / .h5 / .npy…", False), ("Open .zarr…", True)):
            button = QPushButton(text)
            button.setToolTip("Open volumes as layers, placed by their voxel size and offset (drag-and-drop "
                              "works too)")
            button.clicked.connect(lambda _=False, folder=folder: self._open_files(folder))
            open_row.addWidget(button)
        self.raw_combo.setToolTip("The image to segment (3D, z y x): the only layer you paint on and predict")
        self.context_combo.setToolTip("A wider, coarser image around the raw that the model may look at "
                                      "('(none)': raw only)")
        for edit, what in ((self.raw_voxel, "raw"), (self.context_voxel, "context")):
            edit.setToolTip(f"Size of one {what} voxel in nm, three numbers 'z, y, x' (e.g. '8, 4, 4'); "
                            "filled in from the layer's scale")
        for edit, what in ((self.raw_offset, "raw"), (self.context_offset, "context")):
            edit.setToolTip(f"Where the {what}'s first voxel lies, in nm 'z, y, x': places the raw inside the "
                            "context; filled in from the layer's translate")
        form.addRow("raw", self.raw_combo)
        form.addRow("  voxel size (nm, z, y, x)", self.raw_voxel)
        form.addRow("  offset (nm)", self.raw_offset)
        form.addRow("context", self.context_combo)
        form.addRow("  voxel size (nm, z, y, x)", self.context_voxel)
        form.addRow("  offset (nm)", self.context_offset)
        self.data_status = QLabel()
        self.data_status.setWordWrap(True)
        form.addRow(open_row)
        form.addRow(self.data_status)
        self.raw_combo.currentTextChanged.connect(lambda _: self._prefill("raw"))
        self.context_combo.currentTextChanged.connect(lambda _: self._prefill("context"))
        for edit, what, positive in ((self.raw_voxel, "raw voxel size", True), (self.raw_offset, "raw offset", False),
                                     (self.context_voxel, "context voxel size", True),
                                     (self.context_offset, "context offset", False)):
            edit.editingFinished.connect(lambda edit=edit, what=what, positive=positive:
                                         self._check_field(edit, what, positive))
        return box

    def _features_box(self) -> QGroupBox:
        box = QGroupBox("Features (DINOv3)")
        form = QFormLayout(box)
        self.backbone_edit = QLineEdit(default_backbone_spec())
        self.backbone_edit.setToolTip("A hub id (gated: accept the licence and log in), a local folder with "
                                      "the weights, or random:<tiny|vits16|vitb16|vitl16> (NOT DINOv3: tests "
                                      "and offline demos only)")
        self.backbone_edit.textChanged.connect(self._backbone_hint)
        self.backbone_folder_button = QPushButton("Choose folder…")
        self.backbone_folder_button.setToolTip("A folder with DINOv3 weights as transformers' save_pretrained "
                                               "writes them (config.json + model.safetensors), e.g. copied from "
                                               "a machine that has hub access")
        self.backbone_folder_button.clicked.connect(self._choose_backbone_folder)
        self.backbone_note = QLabel()
        self.backbone_note.setWordWrap(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_combo.setToolTip("Where the backbone and the model run: auto picks a GPU (cuda, mps) when "
                                     "there is one, else the cpu")
        self.planes_combo = QComboBox()
        self.planes_combo.addItems(["xy", "ortho"])
        self.planes_combo.setToolTip("xy: one pass over the z slices; ortho: xy + xz + yz (3x the time and disk)")
        self.cache_edit = QLineEdit()
        self.cache_edit.setPlaceholderText("default (DINOFUSE_CACHE or your user cache folder)")
        self.cache_edit.setToolTip("Folder for the extracted features (can take several GB per volume); "
                                   "reused by later runs and after Cancel")
        self.cache_edit.editingFinished.connect(self._show_cache_size)
        self.cache_size = QLabel()
        self.extract_button = QPushButton("Extract features")
        self.extract_button.setToolTip("Compute (or find in the cache) the backbone features of the raw and "
                                       "context now; optional: Fine-tune and Predict do it when needed")
        self.extract_button.clicked.connect(self.extract)
        row = QHBoxLayout()
        row.addWidget(self.backbone_edit, 1)
        row.addWidget(self.backbone_folder_button)
        form.addRow("backbone", row)
        form.addRow(self.backbone_note)
        form.addRow("device", self.device_combo)
        form.addRow("planes", self.planes_combo)
        form.addRow("cache folder", self.cache_edit)
        form.addRow(self.cache_size)
        form.addRow(self.extract_button)
        self._backbone_hint()
        self._show_cache_size()
        return box

    def _model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.fusion_combo = QComboBox()
        self.fusion_combo.addItems(["attention", "concat", "none"])
        self.fusion_combo.setToolTip("attention: context gates the raw skips (shows attention maps); concat: "
                                     "ablation; none: raw only")
        self.base_spin = QSpinBox()
        self.base_spin.setRange(2, 128)
        self.base_spin.setValue(defaults.BASE_CHANNELS)
        self.base_spin.setToolTip("UNet width (channels at the first level) of a new model: 16 suits a "
                                  "laptop, 32-128 a GPU")
        self.stem_check = QCheckBox("raw-intensity stem (sharper boundaries)")
        self.stem_check.setChecked(True)
        self.stem_check.setToolTip("A new model also reads the raw intensities at full resolution (a fixed "
                                   "filter bank), for sharper boundaries than the 16-voxel backbone patches")
        row = QHBoxLayout()
        self.new_model_button = QPushButton("New")
        self.new_model_button.setToolTip("Forget the current model: the next Fine-tune starts from scratch "
                                         "with the settings above")
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Load a model folder (config.json + model.safetensors) to predict or "
                                    "fine-tune further")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the current model to a folder (for `dinofuse predict` or later)")
        self.new_model_button.clicked.connect(self.new_model)
        self.load_button.clicked.connect(lambda: self._ask_folder(self.load_model, "Load a model folder"))
        self.save_button.clicked.connect(lambda: self._ask_folder(self.save_model, "Save the model to a folder"))
        for button in (self.new_model_button, self.load_button, self.save_button):
            row.addWidget(button)
        form.addRow(self.model_label)
        form.addRow("fusion", self.fusion_combo)
        form.addRow("base channels", self.base_spin)
        form.addRow(self.stem_check)
        form.addRow(row)
        return box

    def _train_box(self) -> QGroupBox:
        box = QGroupBox("Fine-tune")
        form = QFormLayout(box)
        self.labels_combo = _LayerCombo(self.viewer, "Labels", prefer="annotations")
        self.labels_combo.setToolTip("The Labels layer with your strokes on the raw's grid: 0 = unpainted, 1 = "
                                     "background, 2, 3 … = your classes")
        self.new_labels_button = QPushButton("New annotation layer")
        self.new_labels_button.setToolTip("An empty Labels layer 'annotations' aligned to the raw: paint 1 = "
                                          "background, 2, 3 … = your classes")
        self.new_labels_button.clicked.connect(self.new_annotation_layer)
        self.restore_button = QPushButton("Restore annotations")
        self.restore_button.setToolTip("Add the strokes the current model was trained on (kept in its model "
                                       "folder), or else those of the last Fine-tune started (autosaved in your "
                                       "user data folder), as a new Labels layer")
        self.restore_button.clicked.connect(self.restore_annotations)
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 100_000)
        self.iterations_spin.setValue(defaults.ITERATIONS)
        self.iterations_spin.setToolTip("Training steps (one step: a few tiles around your strokes); every stroke "
                                        "trains")
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(defaults.LEARNING_RATE)
        self.lr_spin.setToolTip("Peak learning rate of the optimiser (no unit), after a warm-up, then decaying")
        self.train_button = QPushButton("Fine-tune")
        self.train_button.setToolTip(f"Train on the painted voxels, then update the prediction "
                                     f"({_key_text(FINE_TUNE_KEY)} in the viewer)")
        self.train_button.clicked.connect(self.fine_tune)
        self.loss_plot = LossPlot()
        self.eta_label = QLabel()
        form.addRow("labels", self.labels_combo)
        row = QHBoxLayout()
        row.addWidget(self.new_labels_button)
        row.addWidget(self.restore_button)
        form.addRow(row)
        form.addRow("iterations", self.iterations_spin)
        form.addRow("learning rate", self.lr_spin)
        form.addRow(self.train_button)
        form.addRow(self.loss_plot)
        form.addRow(self.eta_label)
        return box

    def _predict_box(self) -> QGroupBox:
        box = QGroupBox("Predict")
        form = QFormLayout(box)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems([WHOLE, AROUND_VIEW])
        self.scope_combo.setToolTip("Also used by the prediction after a Fine-tune. For volumes too large to "
                                    "hold in memory, use Predict to disk…")
        self.predict_button = QPushButton("Predict")
        self.predict_button.setToolTip(f"Segment the region with the current model ({_key_text(PREDICT_KEY)} "
                                       "in the viewer)")
        self.predict_button.clicked.connect(self.predict)
        self.predict_disk_button = QPushButton("Predict to disk…")
        self.predict_disk_button.setToolTip("Write the prediction of the region as OME-Zarr into a folder you "
                                            "choose, block by block (any volume size, memory bounded by a block), "
                                            "showing blocks as they are written, then the result read lazily from "
                                            "there; objects are then found on disk")
        self.predict_disk_button.clicked.connect(self._ask_prediction_folder)
        form.addRow("region", self.scope_combo)
        row = QHBoxLayout()
        row.addWidget(self.predict_button)
        row.addWidget(self.predict_disk_button)
        form.addRow(row)
        self.save_results_button = QPushButton("Save results…")
        self.save_results_button.setToolTip("Write the prediction, uncertainty, attention maps and objects with "
                                            "their measurements into an OME-Zarr folder that napari opens again "
                                            "in place (drag it in, or File > Open Folder)")
        self.save_results_button.clicked.connect(self._ask_results_folder)
        form.addRow(self.save_results_button)
        return box

    def _attention_box(self) -> QGroupBox:
        box = QGroupBox("Attention maps (where the context steered)")
        layout = QVBoxLayout(box)
        row = QHBoxLayout()
        self.attention_checks = []
        for k, role in enumerate(ATTENTION_LAYERS, start=1):
            check = QCheckBox(f"level {k}")
            check.setToolTip(f"Show '{role}': the context gate at the k-th encoder level (coarser than the raw by "
                             "that level's pooling)")
            check.toggled.connect(lambda on, role=role: self._set_attention(role, visible=on))
            self.attention_checks.append(check)
            row.addWidget(check)
        layout.addLayout(row)
        legend = QLabel(ATTENTION_LEGEND)  # what the colours mean, where the maps are switched on
        legend.setWordWrap(True)
        layout.addWidget(legend)
        self.attention_legend = legend
        opacity_row = QHBoxLayout()
        opacity_row.addWidget(QLabel("opacity"))
        self.attention_opacity = QSlider(Qt.Orientation.Horizontal)
        self.attention_opacity.setRange(0, 100)
        self.attention_opacity.setValue(round(100 * attention_style(1)["opacity"]))
        self.attention_opacity.setToolTip("Opacity of the attention layers, 0-100 %")
        self.attention_opacity.valueChanged.connect(
            lambda v: [self._set_attention(role, opacity=v / 100) for role in ATTENTION_LAYERS])
        opacity_row.addWidget(self.attention_opacity)
        layout.addLayout(opacity_row)
        return box

    def _status_row(self) -> QVBoxLayout:
        column = QVBoxLayout()
        self.status_label = QLabel("ready")
        self.status_label.setWordWrap(True)
        row = QHBoxLayout()
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current batch; the cache and the last good model stay")
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.progress_bar)
        row.addWidget(self.cancel_button)
        column.addWidget(self.status_label)
        column.addLayout(row)
        return column

    # -- data -------------------------------------------------------------------------------------

    def _on_layer_inserted(self, event) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _on_layer_removed(self, event) -> None:
        """A layer the running job reads was removed: stop the job (its result has nowhere to go)."""
        if self.worker is not None and any(event.value is layer for layer in self._uses):
            self._lost.append(event.value.name)
            self._cancel.set()
            self.status_label.setText(f"layer {event.value.name!r} was removed: stopping {self._job_name}…")

    def _refresh_layers(self, event=None) -> None:
        for combo in (self.raw_combo, self.context_combo, self.labels_combo):
            combo.refresh()
        self._check_data()

    def _prefill(self, role: str) -> None:
        combo = self.raw_combo if role == "raw" else self.context_combo
        voxel, offset = (self.raw_voxel, self.raw_offset) if role == "raw" else (self.context_voxel,
                                                                                  self.context_offset)
        layer = combo.layer()
        voxel.setText(_xyz_text(layer.scale[-3:]) if layer is not None else "")
        offset.setText(_xyz_text(layer.translate[-3:]) if layer is not None else "")
        for edit in (voxel, offset):
            self._last_good[edit] = edit.text()
        voxel.setEnabled(layer is not None)
        offset.setEnabled(layer is not None)
        if role == "raw" and layer is not None:
            big = int(np.prod(_level0(layer).shape)) > WHOLE_VOLUME_DEFAULT_MAX
            self.scope_combo.setCurrentText(AROUND_VIEW if big else WHOLE)
            if id(layer) != self._fitted:  # a newly chosen raw, not a rename of the same one
                self.show_raw(layer)
        self._check_data()

    def _camera(self):
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9 moved the camera there
        return scene.camera if scene is not None else self.viewer.camera

    def _canvas_size(self):
        return np.array(getattr(getattr(self.viewer, "canvas", None), "size", (512, 512)), float)[-2:]

    def show_raw(self, layer) -> None:
        """Fit the camera to the raw's field (only there can one paint), not to the much wider context, and
        move the slider into the raw if the current slice lies outside it."""
        self._fitted = id(layer)
        if layer.ndim < 2:
            return
        lo, hi = np.array(layer.extent.world, float)
        half = np.abs(np.asarray(layer.scale, float)) / 2  # napari fits voxel edges, not centres
        lo, hi = lo - half, hi + half
        dims = self.viewer.dims
        first = dims.ndim - layer.ndim  # the layer's axes are the viewer's last ones
        for axis in range(layer.ndim):
            world_axis = first + axis
            if world_axis in dims.displayed:
                continue
            if not lo[axis] <= dims.point[world_axis] <= hi[axis]:
                dims.set_point(world_axis, (lo[axis] + hi[axis]) / 2)
        shown = [a - first for a in dims.displayed if a >= first]
        if len(shown) < 2:
            return
        center, zoom = fit_camera(lo[shown], hi[shown], self._canvas_size(), ndisplay=len(shown))
        camera = self._camera()
        camera.center, camera.zoom = center, zoom

    def volumes(self):
        """(raw, context or None) as Volumes over the chosen layers with the voxel sizes shown here."""
        raw_layer, context_layer = self.raw_combo.layer(), self.context_combo.layer()
        if raw_layer is None:
            raise DinofuseError("choose a raw image layer (or open a volume, or File > Open Sample > DINOfuse)")
        for layer in (raw_layer, context_layer):
            if layer is not None and getattr(layer, "rgb", False):
                raise DinofuseError(f"layer {layer.name!r} is an RGB image: dinofuse segments grayscale 3D volumes "
                                    "(EM has one channel); convert it to grayscale first")
            if layer is not None and layer.ndim != 3:
                raise DinofuseError(f"layer {layer.name!r} is {layer.ndim}D: dinofuse segments 3D volumes (z, y, x); "
                                    "choose a 3D image layer")
        raw = Volume(_level0(raw_layer), _parse_xyz(self.raw_voxel.text(), "raw voxel size", positive=True),
                     _parse_xyz(self.raw_offset.text(), "raw offset"), raw_layer.name)
        context = None
        if context_layer is not None:
            if context_layer is raw_layer:
                raise DinofuseError("the context must be a different layer from the raw (or '(none)')")
            context = Volume(_level0(context_layer),
                             _parse_xyz(self.context_voxel.text(), "context voxel size", positive=True),
                             _parse_xyz(self.context_offset.text(), "context offset"), context_layer.name)
            context.require_covers(raw)
        return raw, context

    def _check_field(self, edit: QLineEdit, what: str, positive: bool) -> None:
        """A typo in a voxel size or offset is said at once and undone: the last good value stays in force."""
        if edit.text() == self._last_good.get(edit):
            return
        try:
            values = _parse_xyz(edit.text(), what, positive)
        except DinofuseError as exc:
            edit.setText(self._last_good.get(edit, ""))
            self._notify_error(f"{exc}; kept {edit.text() or 'the previous value'!s}")
            return
        edit.setText(_xyz_text(values))
        self._last_good[edit] = edit.text()
        self._check_data()

    def _check_data(self) -> None:
        """Say plainly what is wrong with the data choice (or what will be segmented)."""
        try:
            raw, context = self.volumes()
        except (DinofuseError, ValueError) as exc:
            self.data_status.setText(f"⚠ {exc}")
            self.data_status.setStyleSheet("color: #ff8c69")
            return
        notes = [f"raw {raw.shape}, {raw.dtype}"]
        if tuple(raw.voxel_size) == (1.0, 1.0, 1.0):
            notes.append("⚠ raw voxel size missing (scale 1): enter it in nm")
        if context is None:
            notes.append("no context: fusion falls back to 'none'")
        else:
            notes.append(f"context {context.shape} covers the raw")
            if tuple(context.voxel_size) == (1.0, 1.0, 1.0):
                notes.append("⚠ context voxel size missing (scale 1): enter it in nm")
        self.data_status.setText("; ".join(notes))
        self.data_status.setStyleSheet("color: #ff8c69" if any("⚠" in n for n in notes) else "")

    def _open_files(self, folder: bool) -> None:
        if folder:
            chosen = QFileDialog.getExistingDirectory(self, "Open a .zarr / OME-Zarr volume", self._folder("data"))
            paths = [chosen] if chosen else []
        else:
            paths, _ = QFileDialog.getOpenFileNames(self, "Open volumes", self._folder("data"),
                                                    "Volumes (*.tif *.tiff *.h5 *.hdf5 *.npy)")
        if paths:
            self._chose("data", paths[0])
        for path in paths:
            self.viewer.open(path, plugin="napari-dinofuse")

    def _choose_backbone_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder with DINOv3 weights (save_pretrained)",
                                                  self._folder("backbone"))
        if folder:
            self._chose("backbone", folder)
            self.backbone_edit.setText(folder)

    def _backbone_hint(self) -> None:
        """What the backbone field will load, or (once loaded) what it loaded: DINOv3 or random weights."""
        spec = self.backbone_edit.text().strip()
        loaded = self.session.backbone
        random = spec.startswith("random:")
        if loaded is not None and self.session.loaded_backbone_spec == spec:
            random = loaded.is_random
            text = f"loaded: {loaded.describe()}" if random else f"loaded: DINOv3, {loaded.describe()}"
        elif random:
            text = "⚠ RANDOM WEIGHTS, NOT DINOv3: for tests and offline demos only"
        else:
            text = ("official DINOv3 hub ids are gated: accept the licence on the model's hub page, then "
                    "`hf auth login`; or, on a machine with access, save_pretrained the model to a folder and "
                    "choose that folder here")
        self.backbone_note.setText(text)
        self.backbone_note.setStyleSheet("color: #ff8c69" if random else "")

    def _show_cache_size(self) -> None:
        from ..cache import FeatureCache, format_bytes

        try:
            cache = FeatureCache(self.cache_edit.text().strip() or None)
            # Said before Extract fails on it: the nearest existing folder on the path must be a writable folder.
            there = next(p for p in (cache.root, *cache.root.parents) if p.exists())
            if not there.is_dir():
                self.cache_size.setText(f"⚠ cache folder {cache.root} cannot be created: {there} is a file")
            elif not os.access(there, os.W_OK | os.X_OK):
                self.cache_size.setText(f"⚠ cache folder {cache.root} is not writable")
            else:
                self.cache_size.setText(f"{cache.root}: {format_bytes(cache.size_bytes())} cached")
        except (OSError, DinofuseError) as exc:
            self.cache_size.setText(f"⚠ cache folder: {exc}")

    def new_annotation_layer(self):
        """An empty Labels layer named 'annotations' on the raw's grid, selected with the paint brush."""
        raw_layer = self.raw_combo.layer()
        if raw_layer is None:
            self._notify_error("choose or open a raw image layer first")
            return None
        # np.zeros maps untouched pages lazily: a big volume costs memory only where painted.
        # The same class colours as the prediction (background visible here: its strokes must show).
        named = {"features": class_features(self.session.class_names)} if self.session.class_names else {}
        layer = self.viewer.add_labels(np.zeros(_level0(raw_layer).shape, np.uint8), name="annotations",
                                       scale=raw_layer.scale, translate=raw_layer.translate,
                                       colormap=label_colormap(show_background=True), **named)
        self.labels_combo.refresh()
        self.labels_combo.setCurrentText(layer.name)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        layer.brush_size = 6
        layer.selected_label = 1
        return layer

    def restore_annotations(self):
        """The model's annotations (else the last autosaved ones) as a new Labels layer; the saved copy is
        never painted into."""
        from ..annotations import autosave_path, load_annotations
        from ..io import read_region

        try:
            saved, where = self.session.annotations, "the current model"
            if saved is None:
                saved, where = load_annotations(autosave_path()), "the last Fine-tune (autosaved)"
        except (DinofuseError, OSError) as exc:
            self._notify_error(f"the saved annotations could not be read: {exc}")
            return None
        if saved is None:
            self._notify_error("no saved annotations yet: they are kept when a Fine-tune starts and saved with "
                               "the model")
            return None
        named = {"features": class_features(self.session.class_names)} if self.session.class_names else {}
        layer = self.viewer.add_labels(read_region(saved.data, (slice(None),)), name="annotations (restored)",
                                       scale=saved.voxel_size, translate=saved.offset,
                                       colormap=label_colormap(show_background=True), **named)
        self.labels_combo.refresh()
        self.labels_combo.setCurrentText(layer.name)
        self.status_label.setText(f"annotations of {where} restored as layer {layer.name!r}")
        return layer

    # -- settings ---------------------------------------------------------------------------------

    def settings(self) -> SessionSettings:
        backbone = self.backbone_edit.text().strip()
        if not backbone:
            raise DinofuseError("enter a backbone: a hub id, a local folder or random:<arch>")
        return SessionSettings(backbone=backbone, device=self.device_combo.currentText(),
                               planes=self.planes_combo.currentText(), cache=self.cache_edit.text().strip() or None,
                               fusion=self.fusion_combo.currentText(), base_channels=self.base_spin.value(),
                               intensity_stem=self.stem_check.isChecked(), iterations=self.iterations_spin.value(),
                               learning_rate=self.lr_spin.value())

    def region(self, raw):
        """The prediction region in raw voxels: None (whole volume) or slices around the current view."""
        scope = self.scope_combo.currentText()
        if scope == WHOLE:
            return None
        voxel, offset = np.array(raw.voxel_size), np.array(raw.offset)
        z = (self.viewer.dims.point[-3] - offset[0]) / voxel[0]
        camera = self._camera()
        center = (np.array(camera.center[-2:]) - offset[1:]) / voxel[1:]
        canvas = self._canvas_size()
        half = np.clip(canvas / 2 / max(camera.zoom, 1e-6) / voxel[1:], 32, 512)
        lo = [z - 16, *(center - half)]
        hi = [z + 16, *(center + half)]
        roi = []
        for a, b, n in zip(lo, hi, raw.shape):
            a, b = int(np.clip(np.floor(a), 0, n - 1)), int(np.clip(np.ceil(b), 1, n))
            roi.append(slice(a, max(b, a + 1)))
        return tuple(roi)

    # -- actions ----------------------------------------------------------------------------------

    def extract(self) -> None:
        def job(cancel):
            raw, context = self.volumes()
            return self.session.extract(raw, context, self._settings, cancel=cancel)

        self._start("extract", job, lambda source: self._show_cache_size(), uses=self._chosen_layers())

    def fine_tune(self) -> None:
        if self.worker is not None:  # a second click (or key press) must not reset the running job's plot
            self._notify_error("another task is running: wait for it or click Cancel")
            return
        try:
            layer = self.labels_combo.layer()
            if layer is None:
                raise DinofuseError("choose a Labels layer with painted strokes, or click 'New annotation "
                                    "layer' and paint (1 = background, 2, 3 … = your classes)")
            raw, context, roi = self._inputs()
            labels = _level0(layer)
            if isinstance(labels, np.ndarray) and labels.nbytes <= SNAPSHOT_MAX_BYTES:
                labels = labels.copy()  # the user may keep painting while this trains
            _check_labels(layer.name, labels, raw)
        except (DinofuseError, ValueError) as exc:
            self._notify_error(str(exc))
            return
        self.loss_plot.reset(self.iterations_spin.value())
        self._start("fine-tune", lambda cancel: self.session.fine_tune(raw, context, labels, self._settings, roi,
                                                                       cancel=cancel), self._show_prediction,
                    uses=(*self._chosen_layers(), layer))

    def predict(self) -> None:
        """Predict the region into layers held in memory."""
        self._predict()

    def predict_to_disk(self, path) -> None:
        """Write the prediction of the region into the folder ``path`` block by block, then show it from there."""
        self._predict(path)

    def _predict(self, out=None) -> None:
        def job(cancel):
            raw, context, roi = self._inputs()
            target = out
            if out is not None:
                from ..outputs import ZarrSink

                # Refused here, before any work, if the folder holds anything but an earlier prediction.
                target = self._writing = ZarrSink(out)
            return self.session.predict(raw, context, self._settings, roi, cancel=cancel, out=target)

        self._start("predict" if out is None else "predict to disk", job, self._show_prediction,
                    uses=self._chosen_layers())

    def _ask_prediction_folder(self) -> None:
        self._ask_zarr_folder("Write the prediction to (an OME-Zarr folder)", self.predict_to_disk)

    def _ask_results_folder(self) -> None:
        self._ask_zarr_folder("Save the results to (an OME-Zarr folder)", self.save_results)

    def _ask_zarr_folder(self, title: str, then) -> None:
        path, _ = QFileDialog.getSaveFileName(self, title, self._folder("prediction"), "OME-Zarr (*.zarr)")
        if path:
            path = path if path.lower().endswith(".zarr") else path + ".zarr"
            self._chose("prediction", path)
            then(path)

    def save_results(self, path) -> None:
        """Write the shown results into the prediction folder ``path`` (in a worker: they may be large)."""
        from ..outputs import save_results

        def job(cancel):
            images = shown_results(self.viewer)
            if not images:
                raise InputError("there is no prediction to save: click Predict (or Fine-tune) first")
            layer = prediction_layer(self.viewer)
            store = shown_folder(layer)
            if store is not None and store == Path(path).expanduser().absolute():
                raise InputError(f"the prediction is shown from {store} already: choose another folder")
            table = self.objects_box.table if "instances" in images else None
            names = layer_class_names(layer) or self.session.class_names or None
            return cancellable(save_results(path, images, names, table), cancel)

        self._start("save results", job, lambda folder: self.status_label.setText(f"results saved to {folder}"))

    def find_objects(self) -> None:
        from ..instances import find_objects, objects_in_prediction

        try:
            request = self.objects_box.request(self.viewer, self.session.class_names)
        except DinofuseError as exc:
            self._notify_error(str(exc))
            return
        if request.store is not None:  # on disk: written beside the prediction, shown from there
            def job(cancel):
                return cancellable(objects_in_prediction(request.store, request.settings), cancel)

            def done(table):
                from ..io import open_volume

                self._objects_found((open_volume(request.store / "instances").data, table), request.grid,
                                    where=request.store / "instances")
        else:
            def job(cancel):
                return cancellable(find_objects(request.labels, request.grid, request.settings,
                                                uncertainty=request.uncertainty, class_names=request.class_names),
                                   cancel)

            def done(result):
                self._objects_found(result, request.grid)
        self._start("objects", job, done, uses=(prediction_layer(self.viewer),))

    def _objects_found(self, result, grid, where=None) -> None:
        self.objects_box.show(self.viewer, result, grid)
        self.status_label.setText(f"objects: {result[1].summary()}" + (f" (written to {where})" if where else ""))

    def save_objects_table(self) -> None:
        try:
            path = self.objects_box.save_table(self._folder("table"))
        except OSError as exc:
            self._notify_error(f"the table was not saved: {exc}")
            return
        if path:
            self._chose("table", path)
            self.status_label.setText(f"measurements saved to {path}")

    def new_model(self) -> None:
        self.session.reset_model()
        self._update_buttons()

    def load_model(self, folder) -> None:
        def job(cancel):
            yield from ()
            return self.session.load(folder)

        self._start("load model", job, self._model_loaded)

    def save_model(self, folder) -> None:
        def job(cancel):
            yield from ()
            self.session.save(folder)

        self._start("save model", job, lambda _: self.status_label.setText(f"model saved to {folder}"))

    def cancel(self) -> None:
        if self.worker is not None:
            self._cancel.set()
            self.status_label.setText("cancelling after the current batch…")

    def _ask_folder(self, action, title: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, title, self._folder("model"))
        if folder:
            self._chose("model", folder)
            action(folder)

    # -- running jobs -----------------------------------------------------------------------------

    def _chosen_layers(self) -> tuple:
        return tuple(layer for layer in (self.raw_combo.layer(), self.context_combo.layer()) if layer is not None)

    def _inputs(self):
        raw, context = self.volumes()
        return raw, context, self.region(raw)

    def _start(self, name: str, make_job, on_done, uses=()) -> None:
        """Run ``make_job(cancel)`` (a Progress generator) in a worker thread, unless one runs already; then
        ``on_done(its value)`` on the main thread, unless it failed or was cancelled (a generator: one step per
        event-loop tick, the job still counting as running). Removing one of the layers it ``uses`` stops it,
        and its value is not shown."""
        from napari.qt.threading import GeneratorWorker
        from napari.utils import progress

        if self.worker is not None:
            self._notify_error("another task is running: wait for it or click Cancel")
            return
        try:
            self._settings = self.settings()
            job = make_job(self._cancel.is_set)
        except (DinofuseError, ValueError) as exc:
            self._notify_error(str(exc))
            return

        def run():
            try:
                return (yield from job)
            except Exception as exc:  # noqa: BLE001 - reported on the main thread as a notification
                return _Failed(exc)

        self._cancel.clear()
        self._job_name, self._job_started, self._on_done = name, time.perf_counter(), on_done
        self._uses, self._lost = tuple(uses), []
        self._model_before = self.session.model
        self.worker = GeneratorWorker(run)
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        self._progress = progress(total=0, desc=f"DINOfuse: {name}")
        self.status_label.setText(f"{name}…")
        self.progress_bar.setRange(0, 0)
        self._update_buttons()
        self.worker.start()

    def _on_progress(self, p) -> None:
        self.status_label.setText(f"{self._job_name}: {p.message}")
        if p.message.startswith("warning: "):
            self._notify_warning(p.message[len("warning: "):])
        total = max(int(p.total), 1)
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(int(p.done))
        if self._progress is not None:
            self._progress.total = total
            self._progress.n = int(p.done)
            self._progress.set_description(f"DINOfuse {self._job_name}: {p.message}")
        if self._writing is not None:
            self._show_writing()
        if "loss" in p.metrics:
            self.loss_plot.add(p.metrics["loss"], p.metrics["smoothed"])
            seconds = p.metrics["seconds"]
            left = seconds / max(p.done, 1) * (p.total - p.done)
            best = p.metrics.get("best_validation")
            scored = f"; held-out strokes mIoU {best:.2f} (best so far)" if best is not None else ""
            self.eta_label.setText(f"iteration {p.done}/{p.total}, {seconds:.0f} s, at most {left:.0f} s left "
                                   f"(then the prediction){scored}")

    def _on_returned(self, result) -> None:
        self.last_result = result
        seconds = time.perf_counter() - self._job_started
        if not self._docked:  # the dock was closed: nothing to show, no one to tell
            return
        if self._lost:
            self._report_lost(result)
        elif isinstance(result, _Failed):
            self.status_label.setText(f"{self._job_name} failed: {_describe_error(result.exc)}")
            self._notify_error(f"DINOfuse {self._job_name}: {_describe_error(result.exc)}")
        elif result is CANCELLED:
            self.status_label.setText(f"{self._job_name} cancelled: the cache and the last good model are intact")
        else:
            self.status_label.setText(f"{self._job_name} done in {seconds:.0f} s")
            steps = self._on_done(result)
            self._steps = steps if inspect.isgenerator(steps) else None

    def _report_lost(self, result) -> None:
        """One notification: which input layer was removed, and what became of the job and the model."""
        names = " and ".join(repr(name) for name in self._lost)
        removed = f"layer {names} {'was' if len(self._lost) == 1 else 'were'} removed while it ran"
        if result is CANCELLED or isinstance(result, _Failed):
            message = f"DINOfuse {self._job_name} stopped: {removed}; the cache and the last good model are intact"
        else:  # it ended before it could stop
            message = f"DINOfuse {self._job_name} finished, but {removed}: its result is not shown"
            if self.session.model is not self._model_before:
                message += "; the new model is kept: Predict shows it"
        self.status_label.setText(message)
        self._notify_warning(message)

    def _show_writing(self) -> None:
        """While predicting to disk: the labels written so far as a temporary layer, refreshed at most twice a
        second (blocks appear as they are written; the finished layers replace it)."""
        labels = self._writing.being_written("labels")
        now = time.perf_counter()
        if labels is None or self._writing_layer is False or now - self._writing_shown < 0.5:
            return
        self._writing_shown = now
        if self._writing_layer is None:
            grid = self._writing.grids["labels"]
            self._writing_layer = self.viewer.add_labels(labels, name=WRITING, metadata={MARK: WRITING},
                                                         scale=grid.voxel_size, translate=grid.offset,
                                                         **prediction_style())
        elif self._writing_layer in self.viewer.layers:
            self._writing_layer.refresh()
        else:
            self._writing_layer = False  # removed by the user: not brought back

    def _stop_showing_writing(self) -> None:
        if self._writing_layer and self._writing_layer in self.viewer.layers:
            self.viewer.layers.remove(self._writing_layer)
        self._writing, self._writing_layer, self._writing_shown = None, None, 0.0

    def _show_prediction(self, sink):
        yield from show_prediction(self.viewer, sink, self.session.class_names)
        # Where it is stored (predicted to disk), so objects are found there, not in memory.
        ours(self.viewer, "prediction").metadata["store"] = str(getattr(sink, "path", "") or "")
        self._sync_attention_checks()

    def _model_loaded(self, backbone: str) -> None:
        from ..finetune import inference_settings  # torch is loaded by now

        self.backbone_edit.setText(backbone)
        self.fusion_combo.setCurrentText(self.session.model.config.fusion)
        self.planes_combo.setCurrentText(inference_settings(self.session.info).planes)
        self.base_spin.setValue(self.session.model.config.base_channels)
        kept = "; it carries the strokes it was trained on: Restore annotations adds them" if (
            self.session.annotations is not None) else ""
        self.status_label.setText(f"model loaded ({self.session.describe_model()}){kept}")

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self._step()

    def _step(self) -> None:
        """One step of the finished job's main-thread work; the next on the next tick, so the viewer repaints and
        handles input in between. The job ends after the last."""
        try:
            if self._steps is not None and self._docked and next(self._steps, None) is not None:
                self._step_timer.start(0)
                return
        except Exception as exc:  # noqa: BLE001 - e.g. napari refusing a layer: say so, free the buttons
            self._notify_error(f"DINOfuse {self._job_name}: showing the result failed: {_describe_error(exc)}")
        self._steps = None
        self._stop_showing_writing()
        self.worker = None
        self._uses = ()  # the job's layers are not kept alive by the widget
        self._backbone_hint()  # a job may have loaded the backbone
        self._update_buttons()
        self.job_ended.emit()

    def _update_buttons(self) -> None:
        busy = self.worker is not None
        for button in (self.extract_button, self.train_button, self.predict_button, self.predict_disk_button,
                       self.save_results_button, self.new_model_button,
                       self.load_button, self.new_labels_button, self.restore_button, self.objects_box.find_button):
            button.setEnabled(not busy)
        self.save_button.setEnabled(not busy and self.session.model is not None and self.session.info is not None)
        self.predict_button.setEnabled(not busy and self.session.model is not None)
        self.predict_disk_button.setEnabled(not busy and self.session.model is not None)
        self.cancel_button.setEnabled(busy)
        self.model_label.setText(self.session.describe_model())

    def wait(self, timeout: float = 60.0) -> bool:
        """Process events until the running job (if any) ends; True if none is left running."""
        if self.worker is not None:
            from qtpy.QtCore import QEventLoop

            loop = QEventLoop()
            self.job_ended.connect(loop.quit)
            QTimer.singleShot(int(timeout * 1000), loop.quit)
            loop.exec()
            self.job_ended.disconnect(loop.quit)
        return self.worker is None

    def closeEvent(self, event):
        self.cancel()
        self.wait()
        self._bind_keys(False)
        super().closeEvent(event)

    # -- keyboard shortcuts: bound on the viewer while the dock is shown -----------------------------------

    def showEvent(self, event):
        super().showEvent(event)
        self._bind_keys(True)

    def hideEvent(self, event):
        super().hideEvent(event)
        if not event.spontaneous():  # the dock closed or removed, not the window minimised
            self._bind_keys(False)

    def event(self, event):
        if event.type() == QEvent.Type.ParentChange:
            self._docked = self.parent() is not None
            if not self._docked:  # taken out of its dock (closed): keys free, the running job stops
                self._bind_keys(False)
                self.cancel()
        return super().event(event)

    def _bind_keys(self, on: bool) -> None:
        # click(): a disabled button (a job running, no model) ignores the key as it ignores the mouse.
        for key, button in ((FINE_TUNE_KEY, self.train_button), (PREDICT_KEY, self.predict_button)):
            if on and key not in self._bound:
                try:
                    self.viewer.bind_key(key, lambda viewer, button=button: button.click())
                except ValueError:  # the user bound this key to something else: theirs wins
                    continue
                self._bound.append(key)
            elif not on and key in self._bound:
                self.viewer.bind_key(key, None)
                self._bound.remove(key)

    # -- attention overlays -----------------------------------------------------------------------

    def _set_attention(self, role: str, **props) -> None:
        layer = ours(self.viewer, role)
        if layer is not None:
            for key, value in props.items():
                setattr(layer, key, value)

    def _sync_attention_checks(self) -> None:
        for check, role in zip(self.attention_checks, ATTENTION_LAYERS):
            layer = ours(self.viewer, role)
            check.setEnabled(layer is not None)
            check.blockSignals(True)
            check.setChecked(layer is not None and layer.visible)
            check.blockSignals(False)
            if layer is not None:
                layer.opacity = self.attention_opacity.value() / 100

    # -- notifications ----------------------------------------------------------------------------

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status_label.setText(f"⚠ {message}")
        show_error(message)

    def _notify_warning(self, message: str) -> None:
        from napari.utils.notifications import show_warning

        show_warning(message)

