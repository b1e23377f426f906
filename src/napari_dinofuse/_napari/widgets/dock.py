"""The DINOfuse dock widget: the forms (one per module in this package) top to bottom, wired to the session.

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
from qtpy.QtCore import QEvent, QSettings, QTimer, Signal
from qtpy.QtWidgets import QFileDialog, QVBoxLayout, QWidget

from ...annotations import autosave_path, load_annotations, take_snapshot
from ...defaults import BACKBONE_ENV
from ...display import VIEW_HALF_DEPTH, class_features, fit_camera, label_colormap, prediction_style, view_region
from ...errors import DinofuseError, InputError
from ...geometry import Volume
from ...progress import CANCELLED, Preview, cancellable
from ...session import Session, SessionSettings
from .attention_box import AttentionBox
from .data_box import DataBox
from .features_box import FeaturesBox
from .fields import level0
from .model_box import ModelBox
from .objects import ObjectsBox, layer_class_names, prediction_layer, shown_folder, shown_results
from .predict_box import PredictBox
from .results import MARK, ours, show_prediction
from .status_row import StatusRow
from .train_box import TrainBox

WRITING = "prediction (being written)"  # the temporary layer of a prediction to disk that runs
PREVIEW = "prediction (training preview)"  # the temporary layer of the slice in view while Fine-tune trains
# Viewer shortcuts while the dock is shown (napari key names; none is bound by napari itself).
FINE_TUNE_KEY, PREDICT_KEY = "Control-Shift-F", "Control-Shift-R"


def user_settings() -> QSettings:
    """Qt's per-user settings store (~/.config/napari-dinofuse/dinofuse.ini on Linux): it outlives napari
    sessions and is not a file in the working directory. Tests point it elsewhere with QSettings.setPath."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, "napari-dinofuse", "dinofuse")


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


def _snapshot(name: str, labels, raw: Volume):
    """The chosen labels layer fits the raw, else refused at once, naming it. A layer in memory gives the
    snapshot of its strokes the fine-tune works on (the user may paint on meanwhile; the worker checks the
    classes); one read from disk is read by the worker."""
    shape = tuple(labels.shape)
    if shape != tuple(raw.shape):
        raise DinofuseError(f"labels layer {name!r} has shape {shape} but the raw {raw.name!r} has {raw.shape}: "
                            "paint on a labels layer with the raw's shape (e.g. 'New annotation layer')")
    if not isinstance(labels, np.ndarray):
        return labels
    try:
        return take_snapshot(labels)
    except InputError as exc:
        raise DinofuseError(f"labels layer {name!r}: {exc}") from None


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


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
        self._job_started = 0.0
        self._on_done = None  # what the running job's value goes to (see _start)
        self._steps = None  # the rest of on_done's main-thread work, one step per event-loop tick
        self._writing = None  # the ZarrSink of a prediction to disk that runs: shown while it is written
        self._writing_layer = None  # its temporary layer; False once the user removed it
        self._writing_shown = 0.0
        self._preview_layer = None  # the running fine-tune's preview layer; False once the user removed it
        self._previewed_raw, self._shown = None, None  # its raw, and the slice in view its next preview covers
        self._step_timer = QTimer(self)  # a child: it dies with the widget, pending steps with it
        self._step_timer.setSingleShot(True)
        self._step_timer.timeout.connect(self._step)
        self._partial_steps = None  # the same for the region in view, shown while the job runs on
        self._partial_timer = QTimer(self)
        self._partial_timer.setSingleShot(True)
        self._partial_timer.timeout.connect(self._step_partial)
        self._uses = ()  # the layers the running job reads: removing one stops it
        self._lost = []  # names of those removed while it ran
        self._model_before = None  # the session's model when the running job started
        self._docked = True  # False once taken out of its dock: a job it started shows nothing
        self.last_result = None  # what the last job returned (the sink, CANCELLED, or a _Failed)
        self._fitted = None  # id of the raw layer the camera was last fitted to
        self._bound = []  # viewer shortcuts this dock bound

        # The forms (one per file); this class wires their buttons to the session's jobs.
        self.data_box = DataBox(self.viewer, self._notify_error)
        self.features_box = FeaturesBox()
        self.model_box = ModelBox()
        self.train_box = TrainBox(self.viewer, FINE_TUNE_KEY)
        self.predict_box = PredictBox(PREDICT_KEY)
        self.attention_box = AttentionBox(self.viewer)
        self.objects_box = ObjectsBox(self)
        self.status_row = StatusRow()
        layout = QVBoxLayout(self)
        for part in (self.data_box, self.features_box, self.model_box, self.train_box, self.predict_box,
                     self.attention_box, self.objects_box, self.status_row):
            layout.addWidget(part)
        layout.addStretch(1)
        self._connect()

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

    def _connect(self) -> None:
        """Each form's buttons and choices to what they do."""
        data, features, model, train, predict = (self.data_box, self.features_box, self.model_box, self.train_box,
                                                 self.predict_box)
        data.raw_combo.currentTextChanged.connect(lambda _: self._prefill("raw"))
        data.context_combo.currentTextChanged.connect(lambda _: self._prefill("context"))
        for folder, button in data.open_buttons.items():
            button.clicked.connect(lambda _=False, folder=folder: self._open_files(folder))
        features.backbone_edit.textChanged.connect(self._backbone_hint)
        features.backbone_folder_button.clicked.connect(self._choose_backbone_folder)
        features.extract_button.clicked.connect(self.extract)
        model.new_model_button.clicked.connect(self.new_model)
        model.load_button.clicked.connect(lambda: self._ask_folder(self.load_model, "Load a model folder"))
        model.save_button.clicked.connect(lambda: self._ask_folder(self.save_model, "Save the model to a folder"))
        train.new_labels_button.clicked.connect(self.new_annotation_layer)
        train.restore_button.clicked.connect(self.restore_annotations)
        train.train_button.clicked.connect(self.fine_tune)
        predict.predict_button.clicked.connect(self.predict)
        predict.predict_disk_button.clicked.connect(self._ask_prediction_folder)
        predict.save_results_button.clicked.connect(self._ask_results_folder)
        self.objects_box.find_button.clicked.connect(self.find_objects)
        self.objects_box.save_button.clicked.connect(self.save_objects_table)
        self.status_row.cancel_button.clicked.connect(self.cancel)
        self._backbone_hint()

    # -- remembered between napari sessions -------------------------------------------------------

    def _remembered(self):
        """(key, getter, setter, change signal) of every setting that persists."""
        combo = lambda c: (c.currentText, c.setCurrentText, c.currentTextChanged)  # noqa: E731
        features, model, train = self.features_box, self.model_box, self.train_box
        return [
            ("backbone", features.backbone_edit.text, features.backbone_edit.setText,
             features.backbone_edit.editingFinished),
            ("device", *combo(features.device_combo)),
            ("planes", *combo(features.planes_combo)),
            ("cache", features.cache_edit.text, features.cache_edit.setText, features.cache_edit.editingFinished),
            ("fusion", *combo(model.fusion_combo)),
            ("base channels", model.base_spin.value, lambda v: model.base_spin.setValue(int(v)),
             model.base_spin.valueChanged),
            ("intensity stem", model.stem_check.isChecked, lambda v: model.stem_check.setChecked(str(v) == "true"),
             model.stem_check.toggled),
            ("tiles per step", train.tiles_spin.value, lambda v: train.tiles_spin.setValue(int(v)),
             train.tiles_spin.valueChanged),
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
        self.features_box.show_cache_size()

    def _remember(self, key: str) -> None:
        value = dict((k, get) for k, get, _, _ in self._remembered())[key]()
        self.store.setValue(key, value)

    def _folder(self, key: str) -> str:
        """The folder a file dialog opens in: where the last one of its kind was chosen."""
        return str(self.store.value(f"last folder/{key}", "") or "")

    def _chose(self, key: str, path) -> None:
        if path:
            self.store.setValue(f"last folder/{key}", os.path.dirname(os.path.abspath(str(path).rstrip("/"))))

    # -- data -------------------------------------------------------------------------------------

    def _on_layer_inserted(self, event) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _on_layer_removed(self, event) -> None:
        """A layer the running job reads was removed: stop the job (its result has nowhere to go)."""
        if self.worker is not None and any(event.value is layer for layer in self._uses):
            self._lost.append(event.value.name)
            self._cancel.set()
            self.status_row.say(f"layer {event.value.name!r} was removed: stopping {self._job_name}…")

    def _refresh_layers(self, event=None) -> None:
        self.data_box.refresh()
        self.train_box.labels_combo.refresh()

    def _prefill(self, role: str) -> None:
        layer = self.data_box.prefill(role)
        if role == "raw" and layer is not None:
            self.predict_box.default_scope(level0(layer).shape)
            if id(layer) != self._fitted:  # a newly chosen raw, not a rename of the same one
                self.show_raw(layer)

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
            self.features_box.backbone_edit.setText(folder)

    def _backbone_hint(self) -> None:
        self.features_box.show_backbone(self.session.backbone, self.session.loaded_backbone_spec)

    def new_annotation_layer(self):
        """An empty Labels layer named 'annotations' on the raw's grid, selected with the paint brush."""
        raw_layer = self.data_box.raw_combo.layer()
        if raw_layer is None:
            self._notify_error("choose or open a raw image layer first")
            return None
        # np.zeros maps untouched pages lazily: a big volume costs memory only where painted.
        # The same class colours as the prediction (background visible here: its strokes must show).
        named = {"features": class_features(self.session.class_names)} if self.session.class_names else {}
        layer = self.viewer.add_labels(np.zeros(level0(raw_layer).shape, np.uint8), name="annotations",
                                       scale=raw_layer.scale, translate=raw_layer.translate,
                                       colormap=label_colormap(show_background=True), **named)
        self.train_box.labels_combo.refresh()
        self.train_box.labels_combo.setCurrentText(layer.name)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        layer.brush_size = 6
        layer.selected_label = 1
        return layer

    def restore_annotations(self):
        """The model's annotations (else the last autosaved ones) as a new Labels layer; the saved copy is
        never painted into."""
        from ...io import read_region

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
        self.train_box.labels_combo.refresh()
        self.train_box.labels_combo.setCurrentText(layer.name)
        self.status_row.say(f"annotations of {where} restored as layer {layer.name!r}")
        return layer

    # -- settings ---------------------------------------------------------------------------------

    def settings(self) -> SessionSettings:
        features, model, train = self.features_box, self.model_box, self.train_box
        return SessionSettings(backbone=features.backbone_spec(), device=features.device_combo.currentText(),
                               planes=features.planes_combo.currentText(), cache=features.cache_folder(),
                               fusion=model.fusion_combo.currentText(), base_channels=model.base_spin.value(),
                               intensity_stem=model.stem_check.isChecked(), iterations=train.iterations_spin.value(),
                               tiles_per_step=train.tiles_spin.value(), learning_rate=train.lr_spin.value())

    def view(self, raw, half_depth: int = VIEW_HALF_DEPTH):
        """The raw voxels around the current view (slices): what a prediction computes and shows first; with
        ``half_depth`` 0 the slice shown (what Fine-tune previews while it trains)."""
        camera = self._camera()
        return view_region(raw.shape, raw.voxel_size, raw.offset, self.viewer.dims.point[-3], camera.center,
                           camera.zoom, self._canvas_size(), half_depth)

    # -- actions ----------------------------------------------------------------------------------

    def extract(self) -> None:
        def job(cancel):
            raw, context = self.data_box.volumes()
            return self.session.extract(raw, context, self._settings, cancel=cancel)

        self._start("extract", job, lambda source: self.features_box.show_cache_size(),
                    uses=self.data_box.chosen_layers())

    def fine_tune(self) -> None:
        if self.worker is not None:  # a second click (or key press) must not reset the running job's plot
            self._notify_error("another task is running: wait for it or click Cancel")
            return
        try:
            layer = self.train_box.labels_combo.layer()
            if layer is None:
                raise DinofuseError("choose a Labels layer with painted strokes, or click 'New annotation "
                                    "layer' and paint (1 = background, 2, 3 … = your classes)")
            raw, context, roi, view = self._inputs()
            labels = _snapshot(layer.name, level0(layer), raw)
        except (DinofuseError, ValueError) as exc:
            self._notify_error(str(exc))
            return
        self.train_box.loss_plot.reset(self.train_box.iterations_spin.value())
        # The slice in view, kept current by each training step's progress (on this thread), read by the worker's
        # previews: they follow the user around the volume.
        self._previewed_raw, self._shown = raw, self.view(raw, half_depth=0)
        self._start("fine-tune", lambda cancel: self.session.fine_tune(raw, context, labels, self._settings, roi,
                                                                       cancel=cancel, first=view,
                                                                       preview=lambda: self._shown),
                    self._show_prediction,
                    uses=(*self.data_box.chosen_layers(), layer))

    def predict(self) -> None:
        """Predict the region into layers held in memory."""
        self._predict()

    def predict_to_disk(self, path) -> None:
        """Write the prediction of the region into the folder ``path`` block by block, then show it from there."""
        self._predict(path)

    def _predict(self, out=None) -> None:
        def job(cancel):
            raw, context, roi, view = self._inputs()
            target = out
            if out is not None:
                from ...inference.outputs import ZarrSink

                # Refused here, before any work, if the folder holds anything but an earlier prediction.
                target = self._writing = ZarrSink(out)
            return self.session.predict(raw, context, self._settings, roi, cancel=cancel, out=target, first=view)

        self._start("predict" if out is None else "predict to disk", job, self._show_prediction,
                    uses=self.data_box.chosen_layers())

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
        from ...inference.outputs import save_results

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

        self._start("save results", job, lambda folder: self.status_row.say(f"results saved to {folder}"))

    def find_objects(self) -> None:
        from ...inference.instances import find_objects, objects_in_prediction

        try:
            request = self.objects_box.request(self.viewer, self.session.class_names)
        except DinofuseError as exc:
            self._notify_error(str(exc))
            return
        if request.store is not None:  # on disk: written beside the prediction, shown from there
            def job(cancel):
                return cancellable(objects_in_prediction(request.store, request.settings), cancel)

            def done(table):
                from ...io import open_volume

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
        self.status_row.say(f"objects: {result[1].summary()}" + (f" (written to {where})" if where else ""))

    def save_objects_table(self) -> None:
        try:
            path = self.objects_box.save_table(self._folder("table"))
        except OSError as exc:
            self._notify_error(f"the table was not saved: {exc}")
            return
        if path:
            self._chose("table", path)
            self.status_row.say(f"measurements saved to {path}")

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

        self._start("save model", job, lambda _: self.status_row.say(f"model saved to {folder}"))

    def cancel(self) -> None:
        if self.worker is not None:
            self._cancel.set()
            self.status_row.say("cancelling after the current batch…")

    def _ask_folder(self, action, title: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, title, self._folder("model"))
        if folder:
            self._chose("model", folder)
            action(folder)

    # -- running jobs -----------------------------------------------------------------------------

    def _inputs(self):
        """The raw and context volumes, the region to predict and the region in view (predicted first)."""
        raw, context = self.data_box.volumes()
        view = self.view(raw)
        return raw, context, self.predict_box.region(view), view

    def _start(self, name: str, make_job, on_done, uses=()) -> None:
        """Run ``make_job(cancel)`` (a Progress generator) in a worker thread, unless one runs already; then
        ``on_done(its value)`` on the main thread, unless it failed or was cancelled (a generator: one step per
        event-loop tick, the job still counting as running). Removing one of the layers it ``uses`` stops it,
        and its value is not shown."""
        from napari.qt.threading import GeneratorWorker

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
        self.status_row.say(f"{name}…")
        self.status_row.busy()
        self._update_buttons()
        self.worker.start()

    def _on_progress(self, p) -> None:
        self.status_row.say(f"{self._job_name}: {p.message}")
        if p.message.startswith("warning: "):
            self._notify_warning(p.message[len("warning: "):])
        total = max(int(p.total), 1)
        self.status_row.show_progress(p.done, total)
        if self._writing is not None:
            self._show_writing()
        elif isinstance(p.partial, Preview):
            if not self._lost and self._docked:
                self._show_preview(p.partial)
        elif p.partial is not None and not self._lost and self._docked:
            self._stop_preview()  # the new model's own prediction from here on
            self._partial_steps = show_prediction(self.viewer, p.partial, self.session.class_names, partial=True)
            self._step_partial()
            self.status_row.say(f"{self._job_name}: the region in view is shown; predicting the rest…")
        if "loss" in p.metrics:
            self.train_box.show_step(p)
            if self._previewed_raw is not None:
                self._shown = self.view(self._previewed_raw, half_depth=0)

    def _on_returned(self, result) -> None:
        self.last_result = result
        self._partial_steps = None  # the finished result is shown whole next
        seconds = time.perf_counter() - self._job_started
        if not self._docked:  # the dock was closed: nothing to show, no one to tell
            return
        if self._lost:
            self._report_lost(result)
        elif isinstance(result, _Failed):
            self.status_row.say(f"{self._job_name} failed: {_describe_error(result.exc)}")
            self._notify_error(f"DINOfuse {self._job_name}: {_describe_error(result.exc)}")
        elif result is CANCELLED:
            self.status_row.say(f"{self._job_name} cancelled: the cache and the last good model are intact")
        else:
            self.status_row.say(f"{self._job_name} done in {seconds:.0f} s")
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
        self.status_row.say(message)
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

    def _show_preview(self, preview: Preview) -> None:
        """While Fine-tune trains: the slice in view as the weights so far predict it, in a temporary layer over
        the prediction (removed when the job ends; not brought back once the user removes it). The selected layer
        stays selected: the user may be painting on."""
        sink = preview.sink
        labels, grid = sink.arrays["labels"], sink.grids["labels"]
        layer = self._preview_layer
        if layer is False:
            return
        if layer is not None and layer not in self.viewer.layers:
            self._preview_layer = False
            return
        if layer is None:
            selected = self.viewer.layers.selection.active
            self._preview_layer = self.viewer.add_labels(labels, name=PREVIEW, metadata={MARK: PREVIEW},
                                                         scale=grid.voxel_size, translate=grid.offset,
                                                         **prediction_style())
            if selected is not None:
                self.viewer.layers.selection.active = selected
        else:
            layer.data = labels
            layer.scale, layer.translate = grid.voxel_size, grid.offset
        self.status_row.say(f"fine-tune: the slice in view after {preview.iteration} of {preview.iterations} "
                            "iterations (a preview; the finished prediction replaces it)")

    def _stop_preview(self) -> None:
        if self._preview_layer and self._preview_layer in self.viewer.layers:
            self.viewer.layers.remove(self._preview_layer)
        self._preview_layer, self._previewed_raw = None, None

    def _stop_showing_writing(self) -> None:
        if self._writing_layer and self._writing_layer in self.viewer.layers:
            self.viewer.layers.remove(self._writing_layer)
        self._writing, self._writing_layer, self._writing_shown = None, None, 0.0

    def _show_prediction(self, sink):
        yield from show_prediction(self.viewer, sink, self.session.class_names)
        # Where it is stored (predicted to disk), so objects are found there, not in memory.
        ours(self.viewer, "prediction").metadata["store"] = str(getattr(sink, "path", "") or "")
        self.attention_box.sync()

    def _model_loaded(self, backbone: str) -> None:
        from ...training.finetune import inference_settings  # torch is loaded by now

        self.features_box.backbone_edit.setText(backbone)
        self.features_box.planes_combo.setCurrentText(inference_settings(self.session.info).planes)
        self.model_box.show_model(self.session.model.config)
        kept = "; it carries the strokes it was trained on: Restore annotations adds them" if (
            self.session.annotations is not None) else ""
        self.status_row.say(f"model loaded ({self.session.describe_model()}){kept}")

    def _on_finished(self) -> None:
        self.status_row.finished()
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
        self._stop_preview()
        self.worker = None
        self._uses = ()  # the job's layers are not kept alive by the widget
        self._backbone_hint()  # a job may have loaded the backbone
        self._update_buttons()
        self.job_ended.emit()

    def _step_partial(self) -> None:
        """One layer of the region in view per event-loop tick (as :meth:`_step`), while the job runs on."""
        try:
            if (self._partial_steps is not None and self._docked
                    and next(self._partial_steps, None) is not None):
                self._partial_timer.start(0)
                return
        except Exception as exc:  # noqa: BLE001 - napari refusing a layer: the finished result is tried again
            self._notify_error(f"DINOfuse {self._job_name}: showing the region in view failed: "
                               f"{_describe_error(exc)}")
        self._partial_steps = None

    def _update_buttons(self) -> None:
        busy = self.worker is not None
        model, predict, train = self.model_box, self.predict_box, self.train_box
        for button in (self.features_box.extract_button, train.train_button, train.new_labels_button,
                       train.restore_button, predict.save_results_button, model.new_model_button, model.load_button,
                       self.objects_box.find_button):
            button.setEnabled(not busy)
        trained = self.session.model is not None
        model.save_button.setEnabled(not busy and trained and self.session.info is not None)
        predict.predict_button.setEnabled(not busy and trained)
        predict.predict_disk_button.setEnabled(not busy and trained)
        self.status_row.cancel_button.setEnabled(busy)
        model.model_label.setText(self.session.describe_model())

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
        for key, button in ((FINE_TUNE_KEY, self.train_box.train_button),
                            (PREDICT_KEY, self.predict_box.predict_button)):
            if on and key not in self._bound:
                try:
                    self.viewer.bind_key(key, lambda viewer, button=button: button.click())
                except ValueError:  # the user bound this key to something else: theirs wins
                    continue
                self._bound.append(key)
            elif not on and key in self._bound:
                self.viewer.bind_key(key, None)
                self._bound.remove(key)

    # -- notifications ----------------------------------------------------------------------------

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status_row.say(f"⚠ {message}")
        show_error(message)

    def _notify_warning(self, message: str) -> None:
        from napari.utils.notifications import show_warning

        show_warning(message)

