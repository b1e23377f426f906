"""The one fine-tuning path of every driver (dock widget, ``dinofuse train``, the demo, the benchmarks).

:func:`fine_tune` builds a new model (or copies a given one and adapts its output heads to the painted
classes), trains it with :class:`~napari_dinofuse.training.train.Trainer` and describes it for saving. Drivers
only parse their input into a :class:`~napari_dinofuse.training.train.TrainConfig` and :class:`NewModel` and
show the progress.
:func:`inference_settings` is the matching one place that says how a saved model predicts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .. import defaults
from ..errors import InputError
from ..features.extract import FeatureSource
from ..modeling.checkpoint import ModelInfo, check_backbone_compatible
from ..modeling.unet import FUSION_MODES, FusedUNet3D
from ..progress import Preview, Progress
from .train import TrainConfig, Trainer, adapt_classes, find_painted, model_info, new_model

# Wider UNets than this do not fit any GPU at the training tile size; a larger value is a typo.
MAX_BASE_CHANNELS = 256

__all__ = ["FineTuned", "InferenceSettings", "NewModel", "StartModel", "fine_tune", "inference_settings"]


@dataclass(frozen=True)
class NewModel:
    """How a new model is built (ignored when fine-tuning an existing one: its own config rules)."""

    fusion: str = "attention"
    base_channels: int = defaults.BASE_CHANNELS
    intensity_stem: bool = True
    context_margin_nm: float | None = defaults.CONTEXT_MARGIN_NM
    class_names: tuple[str, ...] = ()  # of classes 1, 2, ... ("class k" where missing)

    def __post_init__(self) -> None:
        def bad(name, what):
            raise InputError(f"model setting {name} = {getattr(self, name)!r}: {what}")

        # Checked here, not only in UNetConfig: drivers build this before any slow work (features, labels).
        width = self.base_channels
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_BASE_CHANNELS:
            bad("base_channels", f"expected a whole number from 1 to {MAX_BASE_CHANNELS} (e.g. "
                f"{defaults.BASE_CHANNELS} on a laptop, 32-64 on a GPU)")
        if self.fusion not in FUSION_MODES:
            bad("fusion", f"expected one of {', '.join(FUSION_MODES)}")
        if not isinstance(self.intensity_stem, bool):
            bad("intensity_stem", "expected True or False")
        margin = self.context_margin_nm
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not 0 < margin < math.inf):
            bad("context_margin_nm", "expected a distance in nm > 0 (default "
                f"{defaults.CONTEXT_MARGIN_NM:g}), or None for the whole context")
        names = self.class_names
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            bad("class_names", "expected a sequence of names, one per class")
        object.__setattr__(self, "class_names", tuple(names))


class StartModel(NamedTuple):
    """A model to continue from (loaded from a folder or the session's last one), with its history."""

    model: FusedUNet3D
    info: ModelInfo
    log: list


@dataclass
class FineTuned:
    model: FusedUNet3D
    info: ModelInfo
    log: list = field(default_factory=list)  # the start model's training log, then this run's
    iterations: int = 0  # this run's
    seconds: float = 0.0
    loss: float | None = None  # smoothed, at the end
    validation: float | None = None  # best mIoU on the held-out strokes (None: too few strokes to hold out)
    stopped_early: bool = False
    shares: tuple[float, ...] = ()  # each class's estimated share of the volume
    correction_power: float = 1.0  # how much of the correction with them predictions apply (1: all of it)

    def summary(self) -> str:
        score = ("no held-out score: every stroke trained (a validation share holds some out to score and stop "
                 "early; it needs 3 or more strokes per class)"
                 if self.validation is None else f"held-out strokes mIoU {self.validation:.3f}")
        loss = f"loss {self.loss:.4f}, " if self.loss is not None else ""
        shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in zip(self.info.class_names, self.shares))
        if self.correction_power < 1:
            shares += (f" (predictions corrected for them to the power {self.correction_power:g} only: in full, the "
                       "correction would erase a class or overrule the strokes)")
        return (f"trained {self.iterations} iterations in {self.seconds:.0f} s ({loss}{score}"
                f"{', stopped early' if self.stopped_early else ''}); estimated shares of the volume: {shares}")


def fine_tune(source: FeatureSource, labels, config: TrainConfig | None = None, new: NewModel | None = None,
              start: StartModel | None = None, backbone=None, preview=None) -> Generator[Progress, None, FineTuned]:
    """Train on the painted voxels of ``labels`` (0 = unpainted, k = class k; only read: scanned once into a
    :class:`~napari_dinofuse.annotations.PaintedLabels`, or one already).

    ``start``: continue from this model (never modified: a copy is trained, so a cancelled or failed run
    leaves it as it was); else a new model per ``new``. ``backbone``: the one the features came from, to warn
    (as a progress message) when it differs from the start model's. ``preview``: a function that predicts with the
    model being trained (a Progress generator returning a sink, e.g. of the slice in view), run after each share of
    the iterations in ``defaults.PREVIEW_AT``; its sink comes as a step's ``partial``, a
    :class:`~napari_dinofuse.progress.Preview`. The model trains the same with or without previews. Returns
    :class:`FineTuned`.
    """
    config = config or TrainConfig()
    # Refuse bad labels before building anything (classes the start model has may stay unpainted).
    painted = find_painted(labels, source.raw.shape, known_classes=start.model.config.num_classes if start else 0)
    if start is not None:
        _require_fits(start.model, source)
        if backbone is not None:
            warning = check_backbone_compatible(start.info, str(backbone.spec), backbone.embed_dim)
            if warning:
                yield Progress(0, 1, f"warning: {warning}")
        model = adapt_classes(copy.deepcopy(start.model), max(painted.num_classes, start.model.config.num_classes),
                              seed=config.seed)
        names, log = start.info.class_names, list(start.log)
        if config.continue_lr_scale != 1:
            config = replace(config, learning_rate=config.learning_rate * config.continue_lr_scale, continue_lr_scale=1)
            yield Progress(0, 1, f"continuing the model at a peak learning rate of {config.learning_rate:.2g} "
                                 "(a share of the new-model rate: it refines what the model learned)")
    else:
        new = new or NewModel()
        model = new_model(source, painted.num_classes, base_channels=new.base_channels, fusion=new.fusion,
                          intensity_stem=new.intensity_stem, seed=config.seed,
                          context_margin_nm=new.context_margin_nm, tile_shape=config.tile_shape)
        names, log = new.class_names, []
    # A class painted for the first time is new to the start model too: it has no calls to keep then.
    continues = start is not None and model.config.num_classes == start.model.config.num_classes
    trainer = Trainer(model, source, painted, config, continues=continues)
    steps = trainer.run() if preview is None else _previewed(trainer.run(), model, preview, config.iterations)
    yield from steps
    last = trainer.log[-1] if trainer.log else {}
    return FineTuned(model, model_info(model, source, names), log + trainer.log, len(trainer.log),
                     last.get("seconds", 0.0), last.get("smoothed"), trainer.best_score, trainer.stopped_early,
                     tuple(trainer.shares.tolist()), trainer.correction_power)


def _previewed(steps, model: FusedUNet3D, preview, iterations: int) -> Generator[Progress, None, None]:
    """The training ``steps``, and after each share of the ``iterations`` in ``defaults.PREVIEW_AT`` a ``preview``
    of ``model`` as it is then (at equal class shares: training reset them). The preview's own steps keep the
    training's count (Cancel stops it between tiles); the weights, the train mode (``predict`` restores it) and the
    random generators are left as they were. A preview that fails (e.g. out of memory twice) is a warning, and the
    training goes on without previews."""
    due = sorted({max(1, round(share * iterations)) for share in defaults.PREVIEW_AT})
    try:
        for step in steps:
            yield step
            iteration = step.metrics.get("iteration")
            if iteration is None or not due or iteration < due[0]:
                continue
            due = [d for d in due if d > iteration]
            try:
                with closing(preview(model)) as predicting:
                    while True:
                        try:
                            next(predicting)
                        except StopIteration as finished:
                            sink = finished.value
                            break
                        yield Progress(step.done, step.total, f"{step.message}; previewing the view")
            except Exception as exc:  # noqa: BLE001 - a preview is a courtesy: training goes on without them
                due = []
                yield Progress(step.done, step.total, f"warning: the training preview failed ({type(exc).__name__}: "
                                                      f"{exc}); training goes on without previews")
                continue
            yield Progress(step.done, step.total, f"{step.message}; the view as predicted now (a preview)",
                           partial=Preview(sink, iteration, iterations))
    finally:
        steps.close()  # Cancel (this generator closed) stops the training where it is


def _require_fits(model: FusedUNet3D, source: FeatureSource) -> None:
    cfg = model.config
    raw_channels, context_channels = source.channels
    if cfg.raw_channels != raw_channels:
        raise InputError(f"the model expects {cfg.raw_channels}-channel features but these have {raw_channels}: "
                         "use the backbone the model was trained with, or start a new model")
    if cfg.fusion != "none" and context_channels != cfg.context_channels:
        have = "no context" if context_channels is None else f"{context_channels}-channel context features"
        raise InputError(f"the model fuses a context ({cfg.context_channels}-channel features) but there is "
                         f"{have}: give the context it was trained with, or start a new model")


class InferenceSettings(NamedTuple):
    planes: str  # the feature planes the model was trained on: its features must be extracted the same way
    tile_shape: tuple[int, int, int]
    overlap: tuple[int, int, int]


def inference_settings(info: ModelInfo | None, device: str = "auto") -> InferenceSettings:
    """How every driver predicts with a model on ``device`` (tiles are free to choose: predictions do not depend
    on them, so each device gets the tile it runs fastest)."""
    from ..features.backbone import resolve_device

    return InferenceSettings(info.planes if info is not None else "xy",
                             defaults.predict_tile(resolve_device(device).type), defaults.PREDICT_OVERLAP)
