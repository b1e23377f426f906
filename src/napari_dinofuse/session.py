"""The interactive session behind the dock widget: backbone, features, model and results, without Qt.

A :class:`Session` remembers what is expensive (the loaded backbone, the feature source of the current raw
and context, the model) and offers the widget's actions as generators of
:class:`~napari_dinofuse.progress.Progress` (:meth:`Session.extract`, :meth:`Session.fine_tune`,
:meth:`Session.predict`), so the GUI runs them in a worker thread and cancels them between batches, the way the
CLI and the cluster run the same engine.

Guarantees the GUI relies on:

* the labels passed in are only read, once (the widget passes a snapshot of the strokes, so the user can keep
  painting; :class:`~napari_dinofuse.annotations.PaintedLabels`);
* a fine-tune that is cancelled or fails leaves the previous model untouched ("last good model");
* the features of one raw/context pair are computed (or checked in the cache) once per session.

Lifecycle. Data is not "set" on a session and then forgotten to be reset: every action takes the raw and
context it works on, and the session keeps the features of the last pair under a key of what the data *holds*
(content hash, grids, planes, cache), so a new layer, an array edited in place or another backbone gets new
features, and the same data gets the kept ones. The model's lifecycle is explicit: :meth:`Session.fine_tune`
replaces it only once a new one is trained, :meth:`Session.load` replaces it, :meth:`Session.reset_model`
forgets it (and the strokes it was trained on).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import defaults
from .errors import InputError
from .geometry import Volume
from .progress import Progress, cancellable

if TYPE_CHECKING:  # torch-free at import: the widget imports this module
    from .features.backbone import Backbone
    from .features.extract import FeatureSource
    from .modeling.checkpoint import ModelInfo
    from .modeling.unet import FusedUNet3D

__all__ = ["Session", "SessionSettings", "memory_estimate"]

# Whole-volume predictions shown in the viewer live in memory; past this, ask for a region or the CLI.
MAX_RESULT_BYTES = 4 * 2**30
DISK_BLOCK = defaults.PREDICT_BLOCK  # predicted at once when predicting to disk (what memory holds)


@dataclass
class SessionSettings:
    backbone: str
    device: str = "auto"
    planes: str = "xy"
    cache: str | None = None  # None: the default feature cache (DINOFUSE_CACHE or the user cache folder)
    fusion: str = "attention"
    base_channels: int = defaults.BASE_CHANNELS
    intensity_stem: bool = True
    iterations: int = defaults.ITERATIONS
    tiles_per_step: int = defaults.TILES_PER_STEP
    learning_rate: float = defaults.LEARNING_RATE
    seed: int = 0


def memory_estimate(shape, num_classes: int) -> int:
    """Bytes the viewer's result layers take for ``shape``: labels, uncertainty and attention maps."""
    voxels = math.prod(int(n) for n in shape)
    labels = np.dtype(np.min_scalar_type(num_classes)).itemsize
    return int(voxels * (labels + 2 + 2 * sum(1 / 8 ** k for k in range(defaults.NUM_LEVELS))))


@dataclass
class Session:
    """State kept between the widget's actions. Not thread-safe: run one action at a time."""

    backbone: Backbone | None = None
    source: FeatureSource | None = None  # features of the current raw (and context)
    model: FusedUNet3D | None = None
    info: ModelInfo | None = None  # of a loaded or trained model (class names, backbone, feature planes)
    validation: float | None = None  # the last fine-tune's best mIoU on held-out strokes
    log: list = field(default_factory=list)
    annotations: Volume | None = None  # the strokes the current model was trained on (saved with it)
    _backbone_key: tuple | None = None
    _source_key: tuple | None = None

    # -- features ---------------------------------------------------------------------------------

    def _load_backbone(self, settings: SessionSettings) -> Generator[Progress, None, object]:
        key = (settings.backbone, settings.device)
        if self.backbone is None or self._backbone_key != key:
            from .features.backbone import load_backbone

            yield Progress(0, 1, f"loading backbone {settings.backbone}")
            self.backbone, self._backbone_key = None, None
            self.backbone = load_backbone(settings.backbone, device=settings.device)
            self._backbone_key = key
            self.source, self._source_key = None, None
        return self.backbone

    @property
    def loaded_backbone_spec(self) -> str | None:
        """The backbone field's text that the loaded backbone came from (None: none loaded)."""
        return self._backbone_key[0] if self.backbone is not None and self._backbone_key else None

    def extract(self, raw: Volume, context: Volume | None, settings: SessionSettings, cancel=lambda: False
                ) -> Generator[Progress, None, object]:
        """Load the backbone if needed and extract (or find in the cache) the features of raw and context."""
        return cancellable(self._extract(raw, context, settings), cancel)

    def _extract(self, raw, context, settings):
        if context is not None:
            context.require_covers(raw)
        backbone = yield from self._load_backbone(settings)
        # What the data holds, not where it lives: an array edited in place, or a new one at a reused id(),
        # must not be served the old features (the content hash takes bounded time: sampled past 256 MB, and
        # remembered by the cache for unchanged files on disk).
        from .features.cache import FeatureCache
        from .features.extract import extract_sources
        from .io import content_hash

        def identity(volume):
            return FeatureCache(settings.cache).remembered(volume.data, {"content_hash":
                                                                         lambda: content_hash(volume.data)})

        key = (identity(raw), raw.grid, identity(context) if context is not None else None,
               context.grid if context is not None else None, settings.planes, settings.cache)
        if self.source is None or self._source_key != key:
            self.source, self._source_key = None, None
            self.source = yield from extract_sources(raw, context, backbone, FeatureCache(settings.cache),
                                                     planes=settings.planes)
            self._source_key = key
        return self.source

    # -- model ------------------------------------------------------------------------------------

    def reset_model(self) -> None:
        self.model, self.info, self.log, self.validation = None, None, [], None
        self.annotations = None

    def describe_model(self) -> str:
        if self.model is None:
            return "no model yet: Fine-tune creates one"
        cfg = self.model.config
        trained = f", {len(self.log)} iterations trained" if self.log else ", untrained"
        scored = (f", held-out strokes mIoU {self.validation:.2f}" if self.validation is not None else "")
        return f"{cfg.num_classes} classes, base {cfg.base_channels}, fusion {cfg.fusion}{trained}{scored}"

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names) if self.info is not None else []

    def load(self, folder) -> str:
        """Load a model folder (safetensors + JSON); returns the backbone spec it was trained with."""
        from .modeling.checkpoint import load_model, read_training_log

        model, info = load_model(folder)
        self.model, self.info, self.log = model, info, read_training_log(folder)
        self.annotations = _model_annotations(folder)
        return info.backbone

    def backbone_warning(self) -> str:
        from .modeling.checkpoint import check_backbone_compatible

        if self.info is None or self.backbone is None:
            return ""
        return check_backbone_compatible(self.info, str(self.backbone.spec), self.backbone.embed_dim) or ""

    def save(self, folder) -> None:
        from .modeling.checkpoint import save_model

        if self.model is None or self.info is None:
            raise InputError("there is no trained model to save yet: paint and Fine-tune first")
        save_model(folder, self.model, self.info, self.log, annotations=self.annotations)
        if self.annotations is not None:  # read from the saved copy from now on (the old one may be gone)
            self.annotations = _model_annotations(folder)

    # -- actions ----------------------------------------------------------------------------------

    def fine_tune(self, raw, context, labels, settings: SessionSettings, roi=None, cancel=lambda: False,
                  first=None, preview=None) -> Generator[Progress, None, object]:
        """Train on the painted voxels of ``labels`` (a snapshot), then predict ``roi`` (``first``, e.g. the
        region in view, before the rest: see :meth:`predict`); returns the sink.

        ``preview`` (slices of raw voxels, or a function that gives them when called, e.g. the slice in view as the
        user moves; only their middle ``defaults.PREVIEW_HALF_WIDTH`` voxels either side in y and x):
        predicted with the weights so far after each share of the iterations in ``defaults.PREVIEW_AT``, each time a
        step carrying a :class:`~napari_dinofuse.progress.Preview` (labels only) as ``Progress.partial``. Training
        is the same without it. On cancel or error the model from before the call stays in place.
        """
        return cancellable(self._fine_tune(raw, context, labels, settings, roi, first, preview), cancel)

    def _fine_tune(self, raw, context, labels, settings, roi, first=None, preview=None):
        from .annotations import find_painted

        # Refuse bad labels before any slow work (classes the current model has may stay unpainted); from here
        # on the snapshot stands for them (autosaved, trained on, saved with the model).
        painted = find_painted(labels, raw.shape,
                               known_classes=self.model.config.num_classes if self.model is not None else 0)
        annotations = Volume(painted, raw.voxel_size, raw.offset, "annotations")
        # Autosaved while the features are checked and the model trains; done, also on cancel or error, before
        # this ends (the previous autosave stays whole until the new one is swapped in).
        with ThreadPoolExecutor(1, "dinofuse-autosave") as saver:
            saving = saver.submit(_autosave, annotations)
            source = yield from self._extract(raw, context, settings)
            yield from self._train(source, painted, settings, preview)
            warning = saving.result()
            if warning:
                yield Progress(0, 1, warning)
        self.annotations = annotations  # what the current model was trained on: saved with it
        return (yield from self._predict(source, settings, roi, first))

    def _train(self, source, labels, settings, preview=None):
        from .training.finetune import NewModel, StartModel, fine_tune
        from .training.train import TrainConfig

        config = TrainConfig(iterations=settings.iterations, tiles_per_step=settings.tiles_per_step,
                             learning_rate=settings.learning_rate, seed=settings.seed, device=settings.device)
        new = NewModel(fusion=settings.fusion if source.context is not None else "none",
                       base_channels=settings.base_channels, intensity_stem=settings.intensity_stem)
        start = StartModel(self.model, self.info, self.log) if self.model is not None else None
        # The current model is only replaced once the new one is trained (cancel or error: it stays).
        previewer = None
        if preview is not None:
            where = preview if callable(preview) else lambda: preview
            previewer = partial(self._preview, source, settings, where)
        result = yield from fine_tune(source, labels, config, new, start, backbone=self.backbone, preview=previewer)
        self.model, self.info, self.log, self.validation = result.model, result.info, result.log, result.validation
        return result

    @staticmethod
    def _preview(source, settings, where, model):
        """The labels of the region ``where()`` gives as ``model`` predicts them now (a training preview: no
        attention maps), corrected for the class shares its own posteriors give (the volume's are estimated after
        training; a model in training predicts at equal shares)."""
        from .inference.outputs import MemorySink
        from .inference.predict import predict
        from .training.finetune import inference_settings
        from .training.train import labels_at_own_shares

        region = defaults.preview_region(where())
        tiles = inference_settings(None, settings.device)
        sink = yield from predict(model, source, region, tile_shape=tiles.tile_shape, overlap=tiles.overlap,
                                  attention=False, device=settings.device, sink=MemorySink(skip=("uncertainty",)))
        labels = sink.arrays["labels"]
        labels[...] = labels_at_own_shares(sink.arrays.pop("probabilities"))
        return sink

    def predict(self, raw, context, settings: SessionSettings, roi=None, cancel=lambda: False, out=None,
                first=None) -> Generator[Progress, None, object]:
        """Segment ``roi`` (None: the whole raw) with the current model; returns the sink of layer arrays.

        ``first`` (slices of raw voxels, e.g. the region in view) is computed before the rest of ``roi``; once it
        is done a step carries the sink, partly filled, as ``Progress.partial``.

        With ``out`` (a folder, or a :class:`~.outputs.ZarrSink` on it that the caller watches), the prediction
        is written there as OME-Zarr block by block (memory bounded by a block, any volume size) and returned as
        lazily read arrays (:class:`~.outputs.StoredPrediction`).
        """
        return cancellable(self._predict_action(raw, context, settings, roi, out, first), cancel)

    def _predict_action(self, raw, context, settings, roi, out=None, first=None):
        if self.model is None:
            raise InputError("there is no model yet: paint a few strokes of two classes and click Fine-tune, "
                             "or load a model folder")
        source = yield from self._extract(raw, context, settings)
        warning = self.backbone_warning()
        if warning:
            yield Progress(0, 1, f"warning: {warning}")
        if out is not None:
            return (yield from self._predict_to_disk(source, settings, roi, out, first))
        return (yield from self._predict(source, settings, roi, first))

    def _predict_to_disk(self, source, settings, roi, out, first=None):
        from .inference.outputs import StoredPrediction, ZarrSink
        from .inference.predict import predict
        from .training.finetune import inference_settings

        # ZarrSink refuses to replace anything but an earlier prediction, before any work.
        sink = out if isinstance(out, ZarrSink) else ZarrSink(out)
        tiles = inference_settings(self.info, settings.device)
        yield from predict(self.model, source, roi, tile_shape=tiles.tile_shape, overlap=tiles.overlap,
                           block_shape=DISK_BLOCK, device=settings.device, sink=sink,
                           class_names=self.class_names or None, first=first)
        return StoredPrediction(sink.path)

    def _predict(self, source, settings, roi, first=None):
        from .inference.outputs import MemorySink
        from .inference.plan import snap_roi
        from .inference.predict import predict
        from .training.finetune import inference_settings

        z, y, x = snap_roi(roi, source.raw.shape)
        shape = (z.stop - z.start, y.stop - y.start, x.stop - x.start)
        need = memory_estimate(shape, self.model.config.num_classes)
        if need > MAX_RESULT_BYTES:
            raise InputError(f"showing a prediction of {shape} voxels takes ~{need / 2**30:.1f} GiB of memory: "
                             "predict the region around the view instead, or Predict to disk… (`dinofuse "
                             "predict` on the command line), which writes block by block to disk")
        tiles = inference_settings(self.info, settings.device)
        return (yield from predict(self.model, source, (z, y, x), tile_shape=tiles.tile_shape, overlap=tiles.overlap,
                                   device=settings.device, sink=MemorySink(skip=("probabilities",)), first=first))


def _model_annotations(folder):
    from .annotations import FILE, load_annotations

    return load_annotations(Path(folder) / FILE)


def _autosave(annotations: Volume) -> str | None:
    """Keep a copy of the strokes a fine-tune starts from, so a crash or a closed viewer loses no painting.
    Returns the warning to show if that failed."""
    from .annotations import autosave_path, save_annotations

    try:
        save_annotations(autosave_path(), annotations.data, annotations.grid)
    except Exception as exc:  # noqa: BLE001 - a full or read-only disk must not fail the fine-tune: say so
        return f"warning: the annotations could not be autosaved ({exc}); save the model to keep them"
    return None
