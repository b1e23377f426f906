"""Fine-tuning the fused UNet on sparse painted labels: the one recipe (:class:`TrainConfig`).

Labels live on the raw grid: 0 = not painted (never enters the loss), k >= 1 = class k (logit k - 1).
Training tiles are drawn around painted voxels (most of a volume is unpainted), class-balanced, augmented
(:func:`augment`); their inputs come from the cache (the backbone is never called here), with a context window
around each tile (:class:`~napari_dinofuse.features.extract.FeatureSource`). Whole strokes are held out
(:func:`split_strokes`) to score the model and stop early; the test voxels of a benchmark are never seen.

:class:`Trainer` runs as a generator of :class:`~napari_dinofuse.progress.Progress`; when the driver
closes it (Cancel) or it ends, ``trainer.model`` holds the best weights seen so far.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, defaults
from ..annotations import PaintedLabels, find_painted
from ..errors import InputError
from ..features.backbone import PATCH_SIZE, resolve_device
from ..features.extract import FeatureSource, TileInputs, sample_images
from ..geometry import Grid
from ..inference.tiling import ints3, iter_blocks
from ..modeling.checkpoint import ModelInfo
from ..modeling.filters import scale_sigmas
from ..modeling.unet import ContextWindow, FusedUNet3D, UNetConfig, anisotropic_pooling, place
from ..precision import autocast, bf16_on, training_autocast
from ..progress import Progress

PREFETCH_STEPS = 2  # training steps whose tiles are prepared ahead (host memory: a few tiles)


@dataclass
class TrainConfig:
    """The one fine-tuning recipe (the GUI, the CLI and the demo use these defaults); validated on creation."""

    iterations: int = defaults.ITERATIONS  # at most: early stopping on held-out strokes often ends sooner
    learning_rate: float = defaults.LEARNING_RATE  # peak, after a linear warm-up; cosine decay to 5 % of it
    # Continuing a model trains at this share of learning_rate: it refines what the model learned
    # (fine_tune applies it; defaults.CONTINUE_LR_SCALE says why).
    continue_lr_scale: float = defaults.CONTINUE_LR_SCALE
    weight_decay: float = 1e-4
    tile_shape: tuple[int, int, int] = defaults.TRAIN_TILE  # voxels; y/x are rounded up to the patch grid
    tiles_per_step: int = defaults.TILES_PER_STEP  # one batch, its tiles centred on painted classes in rotation
    dice_weight: float = 0.0  # add soft Dice on painted voxels
    context_loss_weight: float = 0.5  # the context head's loss beside the main one (FusedUNet3D.replace_heads)
    # Share of training tiles that go without the context head's evidence: on those the UNet itself (through its
    # gates) must tell the classes apart, so it does not leave it all to the context head, which from a few
    # strokes may learn a shortcut ("nucleus => granule": in one run of eight without it, 28 % of the background
    # became granule). Over 8 runs 0.5 raised the worst background/membrane IoU (docs/benchmarks.md, 2026-12-05);
    # with eight tiles a step, 0.25 gives the evidence back to more tiles (at 0.5 eight tiles lost granules to mito;
    # 0.25 gained the first round's context classes with no shortcut's return: 2026-12-06 evening).
    context_dropout: float = 0.25
    # Weight of the edge term on every voxel of a tile, painted or not (see edge_smoothness), after a ramp: the
    # strokes never say where a class ends, so without it the UNet draws the edges wherever its smooth upsampling
    # and the coarse context evidence put them (membranes a voxel or two too thick). 0: off (defaults.EDGE_WEIGHT).
    edge_weight: float = defaults.EDGE_WEIGHT
    # Continuing a model: weight of the term that keeps its sure calls on unpainted voxels away from the strokes it
    # got wrong (keep_loss; defaults.KEEP_WEIGHT says why). 0: off. A new model has nothing to keep.
    keep_weight: float = defaults.KEEP_WEIGHT
    keep_sure: float = defaults.KEEP_SURE  # the calls it keeps: largest posterior (at equal shares) at least this
    # Train under bf16 autocast where the device computes bf16 (CUDA; CPUs with bf16 instructions: precision.py).
    # Off by default: on a bf16 CPU steps ran 1.2-1.3x faster, but first rounds trained from scratch came out worse
    # than float32's own float noise in 11 of 14 runs (docs/benchmarks.md, 2026-12-07 late morning). Continued
    # rounds came out level with float32's (14 paired runs, 2026-12-07 late night), 1.16x faster on an idle CPU
    # but 0.83x beside one busy process: an option, not the default.
    mixed_precision: bool = False
    augment: bool = True  # flips, 90-degree in-plane rotations (where y and x voxels are equal), intensity jitter
    validation_share: float = defaults.VALIDATION_SHARE  # of each class's strokes, held out for early stopping
    validate_every: int = 25  # steps
    patience: int = 6  # validations without improvement before stopping
    min_iterations: int = 100
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        def bad(name, what):
            raise InputError(f"training setting {name} = {getattr(self, name)!r}: {what}")

        for name in ("iterations", "tiles_per_step", "validate_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "expected a whole number >= 1")
        if isinstance(self.min_iterations, bool) or not isinstance(self.min_iterations, int) or self.min_iterations < 0:
            bad("min_iterations", "expected a whole number >= 0")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1):
            bad("learning_rate", "expected a number in (0, 1], e.g. 0.002")
        if not (isinstance(self.continue_lr_scale, (int, float)) and 0 < self.continue_lr_scale <= 1):
            bad("continue_lr_scale", "expected a share in (0, 1] (1: continue at the full learning rate)")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1):
            bad("weight_decay", "expected a number in [0, 1)")
        if not (isinstance(self.context_dropout, (int, float)) and 0 <= self.context_dropout < 1):
            bad("context_dropout", "expected a share in [0, 1) (0: the evidence on every tile)")
        for name in ("dice_weight", "context_loss_weight", "edge_weight", "keep_weight"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 <= getattr(self, name) < math.inf):
                bad(name, "expected a number >= 0")
        if not (isinstance(self.keep_sure, (int, float)) and 0 < self.keep_sure < 1):
            bad("keep_sure", "expected a posterior in (0, 1), e.g. 0.95")
        if not (isinstance(self.validation_share, (int, float)) and 0 <= self.validation_share <= 0.5):
            bad("validation_share", "expected a share in [0, 0.5] (0: no validation): larger shares leave "
                "too few strokes to train on")
        for name in ("mixed_precision", "augment"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "expected True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            bad("seed", "expected a whole number from 0 to 2**32 - 1")  # numpy refuses negative seeds
        devices = "expected auto, cpu, cuda, cuda:N or mps"
        if not isinstance(self.device, str):
            bad("device", devices)
        if self.device != "auto":
            try:
                torch.device(self.device)  # only its spelling: whether it exists is known when training starts
            except RuntimeError:
                bad("device", devices)
        try:
            self.tile_shape = ints3(self.tile_shape, "tile_shape", 1)
        except ValueError as exc:
            raise InputError(f"training setting {exc}") from None


def class_weights(painted: PaintedLabels) -> torch.Tensor:
    """Tempered inverse frequency, so a class painted with a few strokes is not drowned."""
    weights = torch.zeros(painted.num_classes)
    total = sum(painted.counts.values())
    for k, n in painted.counts.items():
        weights[k - 1] = math.sqrt(total / (len(painted.counts) * n))
    return weights


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                dice_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy (+ optional soft Dice) over painted voxels only; label 0 contributes nothing."""
    target = labels.long() - 1  # unpainted -> -1, ignored
    loss = F.cross_entropy(logits.float(), target, weight=weights.to(logits.device), ignore_index=-1)
    if dice_weight:
        painted = target >= 0
        probs = logits.float().softmax(1).movedim(1, -1)[painted]  # (n, K)
        onehot = F.one_hot(target[painted], logits.shape[1]).float()
        present = onehot.sum(0) > 0
        dice = (2 * (probs * onehot).sum(0) + 1) / (probs.sum(0) + onehot.sum(0) + 1)
        loss = loss + dice_weight * (1 - dice[present]).mean()
    return loss


def edge_smoothness(logits: torch.Tensor, intensity: torch.Tensor, labels: torch.Tensor | None = None,
                    gate: float = defaults.EDGE_GATE) -> torch.Tensor:
    """How often neighbouring voxels of alike intensity get different classes: the mean over neighbour pairs
    (along z, y and x) of P(their classes differ) times exp(-beta * (intensity difference)^2), with beta per tile
    and axis from the mean squared difference (as GrabCut sets it), so contrast and anisotropy need no setting.
    Pulls the classes' edges onto the image's edges on the voxels no stroke covers. ``intensity`` (B, 1, Z, Y, X)
    on the logits' voxels.

    With ``labels`` (B, Z, Y, X; 0 unpainted, k class k) a tile counts only while the model calls at least
    ``gate`` of its painted voxels right: the term smooths what the strokes allow and never argues with them.
    Without the gate, a model trained anew on two rounds of strokes gave up its background strokes (called 73 %
    of painted voxels right) to make 92 % of the volume membrane: one class everywhere costs the term nothing."""
    probs = logits.float().softmax(1)
    image = intensity.float()
    total = logits.new_zeros(len(logits), dtype=torch.float32)
    for axis in (2, 3, 4):
        n = probs.shape[axis]
        if n < 2:
            continue
        step = (image.narrow(axis, 1, n - 1) - image.narrow(axis, 0, n - 1)).square()
        beta = 0.5 / step.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-8)
        same = (probs.narrow(axis, 1, n - 1) * probs.narrow(axis, 0, n - 1)).sum(1, keepdim=True)
        total = total + (torch.exp(-beta * step) * (1 - same)).mean(dim=(1, 2, 3, 4))
    if labels is not None:
        painted = (labels > 0).flatten(1)
        calls = logits.detach().max(1).indices  # argmax's first maximum, faster on a CPU (see keep_mask)
        right = (calls.flatten(1) == labels.flatten(1).long() - 1) & painted
        total = total * (right.sum(1) >= gate * painted.sum(1))
    return total.mean()


def new_model(source: FeatureSource, num_classes: int, base_channels: int = defaults.BASE_CHANNELS,
              fusion: str = "attention", intensity_stem: bool = True, seed: int = 0,
              context_margin_nm: float | None = defaults.CONTEXT_MARGIN_NM,
              tile_shape=defaults.TRAIN_TILE) -> FusedUNet3D:
    """A new UNet for ``source``'s features, pooling as the voxel sizes and the training ``tile_shape`` allow
    (see :func:`~napari_dinofuse.modeling.unet.anisotropic_pooling`)."""
    raw_channels, context_channels = source.channels
    if fusion != "none" and context_channels is None:
        raise InputError(f"fusion {fusion!r} needs a context volume: give one, or use fusion 'none'")
    context = source.context if source.context is not None else source.raw
    if context_margin_nm is not None and source.context is not None:
        smallest = min(source.context.voxel_size)
        if context_margin_nm < smallest:
            raise InputError(f"a context margin of {context_margin_nm:g} nm is less than one context voxel "
                             f"({smallest:g} nm): the context branch would see nothing beyond the tile. Use "
                             "at least the encoder's reach (~21 context voxels, most of its weight within ~16), "
                             "e.g. the default 1024 nm")
    try:
        config = UNetConfig(raw_channels=raw_channels, context_channels=context_channels or raw_channels,
                            num_classes=num_classes, base_channels=base_channels, fusion=fusion,
                            intensity_stem=intensity_stem, context_margin_nm=context_margin_nm,
                            stem_sigmas=scale_sigmas(source.raw.voxel_size),
                            context_stem_sigmas=scale_sigmas(context.voxel_size),
                            pooling=anisotropic_pooling(source.raw.voxel_size, tile_shape=tile_shape),
                            context_pooling=anisotropic_pooling(context.voxel_size, 2,
                                                                tile_shape=_window_shape(source, tile_shape,
                                                                                         context_margin_nm)))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FusedUNet3D(config)
    calibrate_inputs(model, source)
    return model


def calibrate_inputs(model: FusedUNet3D, source: FeatureSource, planes: int = 16) -> None:
    """Set the input statistics of a new model: its filter banks' from blocks spread over the raw and the
    context (see :mod:`~napari_dinofuse.modeling.filters`), the context features' from up to ``planes`` z planes
    of them. Only for a new model: a trained one keeps the statistics its weights were fitted to."""
    if model.intensity_stem is not None:
        bank = model.intensity_stem[0]
        bank.calibrate(sample_images(source.raw, source.low, source.high, bank.halo))
    encoder = model.context_encoder
    if encoder is not None and encoder.stem is not None:
        bank = encoder.stem[0]
        intensity = source.context_features.signature["intensity"]
        bank.calibrate(sample_images(source.context, intensity["low"], intensity["high"], bank.halo))
    if encoder is not None:
        entry = source.context_features
        _, z, gy, gx = entry.shape
        picked = np.unique(np.linspace(0, z - 1, min(z, planes)).round().astype(int))
        encoder.calibrate(torch.cat([torch.from_numpy(np.asarray(entry.read((slice(int(k), int(k) + 1),
                                                                             slice(0, gy), slice(0, gx)))))
                                     for k in picked], dim=1))


def _window_shape(source: FeatureSource, tile_shape, margin_nm) -> tuple[int, int, int]:
    """The context window a training tile of ``tile_shape`` gets (see :meth:`FeatureSource.window_shape`): what
    the context branch's pooling must fit."""
    if source.context is None:
        return tuple(tile_shape)
    return source.window_shape(tile_shape, margin_nm) or source.context.shape


def adapt_classes(model: FusedUNet3D, num_classes: int, seed: int = 0) -> FusedUNet3D:
    """Keep everything a saved model learnt; replace only the output heads when the class count differs."""
    if model.config.num_classes == num_classes:
        return model
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.replace_heads(num_classes)
    model.to(device)
    model.config = UNetConfig.from_dict({**model.config.to_dict(), "num_classes": num_classes})
    return model


def model_info(model: FusedUNet3D, source: FeatureSource, class_names=None, extra: dict | None = None) -> ModelInfo:
    """What a model folder records besides the weights: backbone, normalisation, grids, classes."""
    signature = source.raw_features.signature
    k = model.config.num_classes
    names = list(class_names or [])[:k]
    names += [f"class {i}" for i in range(len(names) + 1, k + 1)]
    return ModelInfo(unet=model.config, class_names=names, backbone=signature["backbone"],
                     normalization=signature["normalization"], backbone_dim=source.channels[0],
                     raw_voxel_size=source.raw.voxel_size,
                     context_voxel_size=source.context.voxel_size if source.context is not None else None,
                     package_version=__version__, planes=signature["planes"],
                     feature_tile_size=signature["tile_size"], intensity_mode=signature["intensity"]["mode"],
                     extra=dict(extra or {}))


# -- held-out strokes ---------------------------------------------------------------------------------------


def strokes(points: np.ndarray) -> list[np.ndarray]:
    """The 26-connected components ("strokes") of a set of voxels (n, 3), largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    if len(points) == 0:
        return []
    pairs = cKDTree(points).query_pairs(r=1.75, output_type="ndarray")  # sqrt(3) < 1.75 < 2
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(points),) * 2)
    _, which = connected_components(graph, directed=False)
    parts = [points[which == c] for c in np.unique(which)]
    return sorted(parts, key=len, reverse=True)


def split_strokes(painted: PaintedLabels, share: float, seed: int = 0) -> tuple[PaintedLabels, dict[int, np.ndarray]]:
    """Hold out whole strokes of each class, about ``share`` of its voxels (at most twice that), for validation.

    Whole strokes, not scattered voxels: a voxel next to a training voxel says nothing about generalisation.
    Every class keeps at least one stroke for training; a class painted in a single stroke has no held-out
    voxels. Returns (the training part, held-out voxels per class).
    """
    rng = np.random.default_rng(seed)
    train, held = {}, {}
    for k, points in painted.coords.items():
        parts = strokes(points) if share > 0 else [points]
        budget, kept, out = share * len(points), [], []
        for i, j in enumerate(rng.permutation(len(parts))):
            taken = sum(len(p) for p in out)
            left = len(parts) - i - 1 + len(kept)  # strokes that would still train
            if taken < budget and left >= 1 and taken + len(parts[j]) <= 2 * budget:
                out.append(parts[j])
            else:
                kept.append(parts[j])
        train[k] = np.concatenate(kept)
        if out:
            held[k] = np.concatenate(out)
    if not held:
        return painted, held
    return painted.without(np.concatenate(list(held.values())), train), held


# -- augmentation -------------------------------------------------------------------------------------------


def transform_grid(grid: Grid, centre, transpose: bool, flips) -> Grid:
    """``grid`` after transposing y/x and then mirroring ``flips`` axes about the world point ``centre``: what
    happens in the world when the arrays on it are transposed/flipped the same way."""
    shape, vs, off = list(grid.shape), list(grid.voxel_size), list(grid.offset)
    if transpose:
        shape[1], shape[2] = shape[2], shape[1]
        vs[1], vs[2] = vs[2], vs[1]
        off[1], off[2] = centre[1] + off[2] - centre[2], centre[2] + off[1] - centre[1]
    for a in flips:
        off[a] = 2 * centre[a] - (off[a] + (shape[a] - 1) * vs[a])
    return Grid(tuple(shape), tuple(vs), tuple(off))


def augment(inputs: TileInputs, labels: torch.Tensor, rng: np.random.Generator) -> tuple[TileInputs, torch.Tensor]:
    """Random flips, y/x transposition (with flips: the 90-degree in-plane rotations) and intensity jitter.

    Geometry stays consistent: the context window is flipped/transposed with the tile, about the tile's
    centre in the world, so every voxel still gets the context of its (mirrored) location. Transposition
    only where the raw and the context have square voxels in y/x (anisotropy is respected); a y/x flip only
    where tile and window are whole patches along that axis (a partial last patch must stay last).
    """
    ctx = inputs.context
    target = ctx.target if ctx is not None else None
    shape = labels.shape[1:]

    def whole(n):
        return n % PATCH_SIZE == 0

    square = ctx is None or ctx.grid.voxel_size[1] == ctx.grid.voxel_size[2]
    square = square and (target is None or target.voxel_size[1] == target.voxel_size[2])
    transpose = bool(square and shape[1] == shape[2] and rng.random() < 0.5)  # square tiles keep their shape
    flips = [a for a in range(3) if rng.random() < 0.5 and
             (a == 0 or (whole(shape[a]) and (ctx is None or whole(ctx.grid.shape[a]))))]

    def apply(t, first_spatial):  # t: a tensor whose last 3 axes are (z, y, x)
        if t is None:
            return None
        if transpose:
            t = t.transpose(-1, -2)
        return t.flip([first_spatial + a for a in flips]) if flips else t

    labels = apply(labels, 1)
    raw = apply(inputs.raw, 2)
    intensity = inputs.intensity
    if intensity is not None:  # brightness and contrast of the stems' input; the features stay as computed
        intensity = apply(intensity, 2) * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.1, 0.1))
    if ctx is not None:
        centre = target.offset + (np.array(target.shape) - 1) / 2 * np.array(target.voxel_size)
        image = apply(ctx.image, 2)
        if image is not None:
            image = image * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.1, 0.1))
        ctx = ContextWindow(apply(ctx.features, 2), image, transform_grid(ctx.grid, centre, transpose, flips),
                            transform_grid(target, centre, transpose, flips))
    return TileInputs(raw, ctx, intensity), labels


# -- class shares -------------------------------------------------------------------------------------------


def estimate_class_prior(posteriors, floor: float = 1e-3) -> np.ndarray:
    """Each class's share of the voxels whose ``posteriors`` (K, n) a model trained on equal shares gave: the
    mean posterior (no labels needed, so it runs on unpainted voxels), at least about ``floor`` each (a class
    the sample missed is not ruled out everywhere).

    One step of the EM of Saerens, Latinne & Decaestecker (2002), whose fixed point is the maximum-likelihood
    shares. One step undershoots a little (it stays nearer equal shares) but cannot run away: iterated on the
    posteriors of real models, EM sharpened a few over-confident ones into absurd shares (membrane at 0.1 %,
    background at 42 %), while one step kept nearly all of its IoU gain (measured, docs/benchmarks.md).
    """
    prior = np.maximum(np.asarray(posteriors, np.float64).mean(axis=1), floor)
    return prior / prior.sum()


def temper_class_prior(prior, power: float) -> np.ndarray:
    """The shares inference corrects with: ``prior`` raised to ``power`` (:func:`correction_power`), normalised."""
    tempered = np.asarray(prior, np.float64) ** power
    return tempered / tempered.sum()


def labels_at_own_shares(probabilities) -> np.ndarray:
    """Labels (class k = k) from ``probabilities`` (K, ...) of a model at equal shares, corrected for the shares
    these posteriors themselves give (:func:`estimate_class_prior`, as far as :func:`correction_power` allows):
    what a training preview of a slice shows before the volume's shares are estimated after training. On the
    sample the finished model's labels so on 99.9 % of a slice, at equal shares on 97.8 % (mitochondrion IoU .74
    against .96; docs/benchmarks.md, "Training previews")."""
    posteriors = np.asarray(probabilities, np.float32).reshape(len(probabilities), -1)
    shares = estimate_class_prior(posteriors)
    prior = temper_class_prior(shares, correction_power(posteriors, shares))
    scores = np.log(np.maximum(posteriors, 1e-12)) + np.log(prior).astype(np.float32)[:, None]
    return (scores.argmax(0) + 1).reshape(probabilities.shape[1:])


def correction_power(posteriors, prior, stroke_posteriors=None, stroke_classes=None, erased: float = 0.05,
                     kept: float = 0.5, overruled: float = 0.1, min_stroke_voxels: int = 20) -> float:
    """How much of the correction with ``prior`` (the estimated shares) to apply: 1 (all of it), or where it
    would all but erase a class (call it on less than ``erased`` of its *room*: the smaller of its estimated
    share and the share the uncorrected predictions of ``posteriors`` (K, n) call it on) or overrule the user's
    strokes (call a class on a share of its painted voxels more than ``overruled`` below the uncorrected
    predictions' share; ``stroke_posteriors`` (K, m) at painted voxels of ``stroke_classes`` (m,), 1-based; a
    class with fewer than ``min_stroke_voxels`` of them is not judged), the largest power t of 3/4, 1/2, 1/4, 0
    the shares can be raised to (:func:`temper_class_prior`) without either (every class keeping ``kept`` of
    its room).

    The correction multiplies the posteriors by the shares, which is exact for calibrated posteriors. A model
    continued on correction strokes was unsure everywhere instead: membrane voxels called membrane with 0.84
    against 0.13 background on average, and the shares (78 % background, 8 % membrane) turned all of them into
    background (membrane IoU 0.50 uncorrected, 0 corrected; docs/benchmarks.md, 2026-12-05). A class called
    nowhere contradicts both its estimated share and the model's own predictions: the posteriors are too unsure
    for the full correction. Where the correction only cuts an over-predicted class, as it is meant to (a granule
    class called on 24 % of the volume, 3 % corrected: 0.16 of its room, the lowest seen in models that
    predicted well), the shares stay as estimated. A class with no room (one the sample missed) does not count.

    The strokes catch what the shares cannot: models trained anew on first strokes plus corrections (background
    painted hard against the membrane, where the first model was wrong) called every class on about its true
    share uncorrected, but with membrane posteriors near 0.8 rather than 0.98; the full correction called 31-58 %
    of the painted membrane background and cut its IoU from 0.66-0.71 to 0.12-0.33, while still calling it on
    more than a twentieth of its room (docs/benchmarks.md, 2026-12-05 second night). First-round models lost
    at most 1.6 % of any class's strokes to the correction.
    """
    def log(p):
        return np.log(np.maximum(np.asarray(p, np.float32), 1e-12))

    log_prior = np.log(np.asarray(prior, np.float64)).astype(np.float32)[:, None]
    log_posteriors = log(posteriors)

    def called(t):  # each class's share of the voxels, corrected with the shares to the power t
        calls = (log_posteriors + t * log_prior).argmax(0)
        return np.bincount(calls, minlength=len(prior)) / calls.size

    judged = []
    if stroke_posteriors is not None:
        log_strokes, stroke_classes = log(stroke_posteriors), np.asarray(stroke_classes)
        judged = [k for k in np.unique(stroke_classes) if np.count_nonzero(stroke_classes == k) >= min_stroke_voxels]

    def recall(t):  # per judged class, the share of its painted voxels called that class
        predicted = (log_strokes + t * log_prior).argmax(0) + 1
        return np.array([np.mean(predicted[stroke_classes == k] == k) for k in judged])

    room = np.minimum(prior, called(0.0))
    erasing = np.any(called(1.0) < erased * room)
    uncorrected = recall(0.0) if judged else None

    def acceptable(t):
        return ((not erasing or np.all(called(t) >= kept * room))
                and (not judged or np.all(recall(t) >= uncorrected - overruled)))

    return next((t for t in (1.0, 0.75, 0.5, 0.25) if acceptable(t)), 0.0)


# -- training -----------------------------------------------------------------------------------------------


@torch.no_grad()
def keep_mask(start_log_p: torch.Tensor, labels: torch.Tensor, sure: float = defaults.KEEP_SURE,
              reach=defaults.KEEP_REACH) -> torch.Tensor:
    """Where :func:`keep_loss` holds the start model's calls (``start_log_p``: its log-posteriors at equal shares,
    (B, K, Z, Y, X)): unpainted voxels (``labels`` (B, Z, Y, X) == 0) whose
    largest posterior at equal shares is at least ``sure``, more than ``reach`` voxels (z, y, x) from any stroke
    the start model called wrong (there the user showed it wrong: its calls nearby are what the strokes correct).

    Why sure calls only: on ten of the sample's first-round models, a bar of 0.95 kept 96-98 % of the right calls
    there and 17-42 % of the wrong ones (docs/benchmarks.md, 2026-12-06 late night).
    """
    # max() rather than argmax() and amax(): the same first maximum, but torch's CPU argmax over a short dim 1 of
    # a contiguous tensor took 25 ms here (max: 1 ms), 3 % of a continuing step.
    best, call = start_log_p.max(1)
    near = ((labels > 0) & (call + 1 != labels)).float()[:, None]
    for axis, r in enumerate(reach):  # a box's maximum, one axis at a time (a tenth of the time of the 3D box)
        kernel, padding = [1, 1, 1], [0, 0, 0]
        kernel[axis], padding[axis] = 2 * r + 1, r
        near = F.max_pool3d(near, kernel, 1, padding)
    near = near[:, 0] > 0
    return (labels == 0) & ~near & (best >= math.log(sure))


def keep_loss(logits: torch.Tensor, start_log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL divergence from the start model's posteriors (log, at equal shares) to the model's, averaged over
    ``mask``."""
    kl = (start_log_p.exp() * (start_log_p - logits.float().log_softmax(1))).sum(1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _tensors(tile: tuple[TileInputs, torch.Tensor], convert) -> tuple[TileInputs, torch.Tensor]:
    """A training tile (inputs, labels) with ``convert`` applied to each of its tensors."""
    inputs, labels = tile

    def each(t):
        return None if t is None else convert(t)

    ctx = inputs.context
    if ctx is not None:
        ctx = ctx._replace(features=convert(ctx.features), image=each(ctx.image))
    return TileInputs(convert(inputs.raw), ctx, each(inputs.intensity)), convert(labels)


def _whole_patches(region) -> tuple[int, int, int]:
    z, y, x = (s.stop - s.start for s in region)
    return z, -(-y // PATCH_SIZE) * PATCH_SIZE, -(-x // PATCH_SIZE) * PATCH_SIZE


def _adamw(model: FusedUNet3D, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on a CPU or CUDA (not tried elsewhere: an unsupported device fails at the
    first step, not here). A loop per parameter launches ~1,200 ops a step: 59 ms at base 32 on 2 CPU cores,
    14 ms fused."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=fused or None)


class Trainer:
    """Fine-tunes ``model`` in place on the painted voxels of ``labels``; validates on held-out strokes.

    When :meth:`run` ends (or the driver closes it: Cancel), ``model`` holds the weights that scored best on
    the held-out strokes (without validation: the last weights), in eval mode.
    """

    MAX_VALIDATION_TILES = 8
    PRIOR_TILES = 8  # tiles of defaults.PRIOR_TILE (at most) that the class shares are estimated on
    STROKE_TILES = 4  # and at most this many more, where the strokes are, to check the correction against them
    MIN_IMPROVEMENT = 0.005  # of the held-out mIoU: smaller gains are noise, not a reason to train on

    def __init__(self, model: FusedUNet3D, source: FeatureSource, labels, config: TrainConfig | None = None,
                 continues: bool = False):
        self.config = config or TrainConfig()
        self.continues = continues  # model is a trained one, continued: keep_loss holds its sure calls
        self.source = source
        # The snapshot training reads (``labels`` may be one already): the layer may be painted on meanwhile.
        self.painted = find_painted(labels, source.raw.shape, known_classes=model.config.num_classes)
        if self.painted.num_classes > model.config.num_classes:
            raise InputError(f"class {self.painted.num_classes} is painted but the model has "
                             f"{model.config.num_classes} classes: adapt it first (adapt_classes)")
        self.model = model
        self.log: list[dict] = []
        self.stopped_early = False
        self.best_score: float | None = None  # mean IoU on the held-out strokes
        self.shares: np.ndarray | None = None  # each class's estimated share of the volume (estimate_prior)
        self.correction_power: float | None = None  # how much of the correction with them inference applies
        self.train_painted, self.held_out = split_strokes(self.painted, self.config.validation_share,
                                                          self.config.seed)
        z, y, x = self.config.tile_shape
        self.tile_shape = (z, -(-y // PATCH_SIZE) * PATCH_SIZE, -(-x // PATCH_SIZE) * PATCH_SIZE)
        self.validation_tiles = self._validation_tiles()
        # Every training tile's context window widened to one shape (away from the context's far faces), so a
        # step runs the context branch once for all its tiles, not once per window shape (2-3 of 4 windows).
        self.window_shape = (source.window_shape(self.tile_shape, model.config.context_margin_nm)
                             if source.context is not None else None)
        self._validation_inputs: tuple[torch.device | None, list[TileInputs]] = (None, [])

    def sample_region(self, rng: np.random.Generator, painted_class: int | None = None, points=None):
        """A tile of ``tile_shape`` (clipped to the volume) containing a training voxel of ``painted_class``
        (default: a class chosen uniformly), or one of ``points``.

        Tiles keep their full size (shifted inside the volume rather than cut at its faces; y/x may run into
        the last patch's padding), so the tiles of a step can form one batch.
        """
        coords = self.train_painted.coords
        classes = list(coords)
        if points is None:
            points = coords[painted_class if painted_class is not None else classes[rng.integers(len(classes))]]
        voxel = points[rng.integers(len(points))]
        region = []
        for axis, (v, n, size) in enumerate(zip(voxel, self.source.raw.shape, self.tile_shape)):
            step = PATCH_SIZE if axis else 1  # y/x starts on the patch grid
            room = -(-n // step) * step  # y/x: the volume rounded up to whole patches
            size = min(size, room)
            lowest = max(0, -(-(v - size + 1) // step))
            highest = min(v // step, (room - size) // step)
            start = step * int(rng.integers(lowest, highest + 1))
            region.append(slice(start, min(start + size, n)))
        return tuple(region)

    def _validation_tiles(self) -> list[tuple[tuple, np.ndarray, np.ndarray]]:
        """(region, held-out voxels inside it, their classes) for up to MAX_VALIDATION_TILES tiles."""
        if not self.held_out:
            return []
        points = np.concatenate(list(self.held_out.values()))
        classes = np.concatenate([np.full(len(v), k) for k, v in self.held_out.items()])
        rng = np.random.default_rng(self.config.seed + 1)
        tiles = []
        while len(points) and len(tiles) < self.MAX_VALIDATION_TILES:
            region = self.sample_region(rng, points=points)
            inside = np.all([(points[:, a] >= s.start) & (points[:, a] < s.stop) for a, s in enumerate(region)], 0)
            tiles.append((region, points[inside], classes[inside]))
            points, classes = points[~inside], classes[~inside]
        return tiles

    def _inputs(self, region, device, window_shape=None) -> TileInputs:
        cfg = self.model.config
        return self.source.tile(region, context=cfg.fusion != "none", intensity=cfg.intensity_stem,
                                margin_nm=cfg.context_margin_nm, device=device, full_yx=_whole_patches(region)[1:],
                                halo=self.model.intensity_halo, window_shape=window_shape)

    def _batch(self, region, device, rng):
        """A training tile at whole patches: inputs and labels (held-out strokes and padding unpainted)."""
        inputs = self._inputs(region, device, self.window_shape)
        labels = self.train_painted[region].astype(np.int64)
        full = _whole_patches(region)
        labels = np.pad(labels, [(0, f - n) for f, n in zip(full, labels.shape)])
        labels = torch.from_numpy(labels)[None].to(device)
        if self.config.augment:
            inputs, labels = augment(inputs, labels, rng)
        return inputs, labels

    @torch.no_grad()
    def validate(self, device=None) -> float | None:
        """Mean IoU over the classes of the held-out strokes (None without any); the model is left in eval mode."""
        if not self.validation_tiles:
            return None
        model = self.model.eval()
        device = device or next(model.parameters()).device
        k = self.painted.num_classes
        confusion = np.zeros((k, k), np.int64)
        # Read once per device: the same tiles are scored every `validate_every` steps, and reading them again
        # would leave the device idle meanwhile.
        if self._validation_inputs[0] != device:
            self._validation_inputs = (device, [self._inputs(region, device) for region, _, _ in self.validation_tiles])
        for (region, points, classes), inputs in zip(self.validation_tiles, self._validation_inputs[1]):
            with autocast(device):  # scored as it will predict
                out = model(inputs.raw, inputs.context, out_shape=_whole_patches(region), intensity=inputs.intensity)
            local = points - np.array([s.start for s in region])
            predicted = out.logits[0].float().argmax(0).cpu().numpy()[tuple(local.T)] + 1
            np.add.at(confusion, (classes - 1, np.minimum(predicted, k) - 1), 1)
        present = confusion.sum(1) > 0
        inter = np.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - inter
        return float(np.mean(inter[present] / union[present]))

    @torch.no_grad()
    def estimate_prior(self, device) -> np.ndarray:
        """Set ``model.class_prior`` from the model's own posteriors (:func:`estimate_class_prior`, softened
        where they would erase a class or overrule the strokes: :func:`correction_power`) on the volume, cut
        into tiles of ``defaults.PRIOR_TILE``: all of it, or PRIOR_TILES of its tiles chosen at random, checked
        against the strokes in them and in up to STROKE_TILES more, those holding the most strokes. Returns the
        shares; deterministic for a seed.

        Prediction-sized tiles, not training ones: small tiles are mostly faces, where the padded convs see
        less, and a few small tiles of a volume of large objects are a poor sample (measured: on 32 tiles of
        16 x 32 x 32 the shares of the sample's rare classes came out at 3-5x the whole volume's estimate).
        """
        model = self.model.eval()
        model.class_prior.fill_(1.0 / model.config.num_classes)  # posteriors as trained: equal shares
        shape = self.source.raw.shape
        regions = [block.core for block in iter_blocks(shape, defaults.PRIOR_TILE)]
        sampled = list(range(len(regions)))
        if len(regions) > self.PRIOR_TILES:
            rng = np.random.default_rng(self.config.seed + 2)
            sampled = sorted(int(i) for i in rng.choice(len(regions), self.PRIOR_TILES, replace=False))
        painted = np.concatenate(list(self.painted.coords.values()))
        tiles = [-(-n // t) for n, t in zip(shape, defaults.PRIOR_TILE)]  # iter_blocks' grid, in its order
        strokes = np.bincount(np.ravel_multi_index(tuple((painted // defaults.PRIOR_TILE).T), tiles),
                              minlength=len(regions))
        strokes[sampled] = 0
        most = np.argsort(-strokes, kind="stable")[:self.STROKE_TILES]
        chosen = sorted({*sampled, *(int(i) for i in most if strokes[i])})
        posteriors, stroke_posteriors, stroke_classes = [], [], []
        with ThreadPoolExecutor(1, "dinofuse-prior-read") as reader:  # the next tile read while this one runs
            ahead = reader.submit(self._inputs, regions[chosen[0]], device)
            for i, index in enumerate(chosen):
                region = regions[index]
                inputs = ahead.result()
                if i + 1 < len(chosen):
                    ahead = reader.submit(self._inputs, regions[chosen[i + 1]], device)
                with autocast(device):  # the posteriors the shares will correct
                    out = model(inputs.raw, inputs.context, out_shape=_whole_patches(region),
                                intensity=inputs.intensity)
                z, y, x = (s.stop - s.start for s in region)
                probs = out.logits[0, :, :z, :y, :x].float().softmax(0).cpu().numpy()
                if index in sampled:
                    posteriors.append(probs.reshape(len(probs), -1))
                labels = self.painted[region]
                painted_here = labels > 0
                stroke_posteriors.append(probs[:, painted_here])
                stroke_classes.append(labels[painted_here])
        posteriors = np.concatenate(posteriors, axis=1)
        self.shares = estimate_class_prior(posteriors)
        self.correction_power = correction_power(posteriors, self.shares, np.concatenate(stroke_posteriors, axis=1),
                                                 np.concatenate(stroke_classes))
        prior = temper_class_prior(self.shares, self.correction_power)
        model.class_prior.copy_(torch.from_numpy(prior))
        return prior

    def run(self) -> Generator[Progress, None, "Trainer"]:
        cfg = self.config
        device = resolve_device(cfg.device)
        model = place(self.model, device).train()  # before the optimizer: it keeps the weights' layout
        model.class_prior.fill_(1.0 / model.config.num_classes)  # re-estimated below, from the new weights
        weights = class_weights(self.train_painted)
        if weights.numel() < model.config.num_classes:
            weights = F.pad(weights, (0, model.config.num_classes - weights.numel()))
        weights = weights.to(device)  # once: a copy per step would make the host wait for the device
        rng = np.random.default_rng(cfg.seed)
        optimizer = _adamw(model, cfg)
        warmup = max(1, min(25, cfg.iterations // 10))

        def schedule(step):  # linear warm-up, then cosine decay to 5 %
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, cfg.iterations - warmup)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        bf16 = cfg.mixed_precision and bf16_on(device)  # float32 unless asked (precision.py says why)
        mixed = training_autocast(device, bf16)
        best_state, best_step, smoothed, message = None, 0, None, ""
        classes = list(self.train_painted.coords)
        auxiliary = bool(cfg.context_loss_weight) and model.context_head is not None
        dropout = cfg.context_dropout if model.adds_context_evidence else 0
        # The start model as it was, for keep_loss: in eval mode, as it predicts (the context evidence at its
        # prediction weight) at equal shares (the prior was just reset), on every tile of a step: in the model's
        # training mode, on half the tiles, with its calls predicted once per round, or with the evidence dropped
        # where the model drops it, the drift came back (docs/benchmarks.md, 2026-12-07). At its predictions'
        # precision too (bf16 where they compute in it, `precision.autocast`): the calls the user saw, level with
        # fp32's over 14 paired rounds, and on a bf16 CPU the round 1.07x faster (docs/benchmarks.md, 2026-12-07 noon).
        start_model = (copy.deepcopy(model).eval().requires_grad_(False) if self.continues and cfg.keep_weight
                       else None)
        as_predicted = autocast(device)

        # On a GPU, tiles are made in pinned host memory and copied over by this thread without waiting: a
        # copy from ordinary memory makes the host wait until the device has finished what it was given.
        pinned = device.type == "cuda"

        def step_tiles(step):
            # One batch per step, its tiles centred on different classes: a step does not pull every
            # prediction towards the single class one tile happened to show.
            first = (step - 1) * cfg.tiles_per_step
            tiles = [self._batch(self.sample_region(rng, classes[(first + i) % len(classes)]),
                                 torch.device("cpu") if pinned else device, rng) for i in range(cfg.tiles_per_step)]
            return [_tensors(tile, torch.Tensor.pin_memory) for tile in tiles] if pinned else tiles

        start = time.perf_counter()
        # The next steps' tiles (cache reads, context windows, augmentation) are prepared on a thread while this
        # step runs on the device. One thread, in step order: `rng` is drawn exactly as without it.
        prefetch = ThreadPoolExecutor(1, "dinofuse-train-tiles")
        ahead = deque(prefetch.submit(step_tiles, step) for step in range(1, min(cfg.iterations, PREFETCH_STEPS) + 1))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                for step in range(1, cfg.iterations + 1):
                    optimizer.zero_grad(set_to_none=True)
                    tiles = ahead.popleft().result()
                    if pinned:
                        tiles = [_tensors(tile, lambda t: t.to(device, non_blocking=True)) for tile in tiles]
                    if step + PREFETCH_STEPS <= cfg.iterations:
                        ahead.append(prefetch.submit(step_tiles, step + PREFETCH_STEPS))
                    labels = torch.cat([t[1] for t in tiles])
                    inputs = tiles[0][0]
                    keep = None
                    if dropout:  # drawn here (torch's seeded generator), not on the tile thread: `rng` stays as is
                        keep = torch.rand(len(tiles)) >= dropout
                        keep = (keep.pin_memory() if pinned else keep).to(device, non_blocking=pinned)
                    intensity = None if inputs.intensity is None else torch.cat([t[0].intensity for t in tiles])
                    raw = torch.cat([t[0].raw for t in tiles])
                    context = None if inputs.context is None else [t[0].context for t in tiles]
                    with mixed:
                        out = model(raw, context, out_shape=labels.shape[1:], intensity=intensity,
                                    auxiliary=auxiliary, evidence_keep=keep)
                    loss = masked_loss(out.logits, labels, weights, cfg.dice_weight)
                    if out.context_logits is not None:
                        loss = loss + cfg.context_loss_weight * masked_loss(out.context_logits, labels, weights)
                    if cfg.edge_weight and intensity is not None:  # on the stem's input, less its halo
                        inside = tuple(slice(h, h + n) for h, n in zip(model.intensity_halo, labels.shape[1:]))
                        ramp = min(1.0, step / defaults.EDGE_RAMP_STEPS)
                        edges = edge_smoothness(out.logits, intensity[(..., *inside)], labels)
                        loss = loss + cfg.edge_weight * ramp * edges
                    if start_model is not None:
                        with torch.no_grad(), as_predicted:
                            start_log_p = start_model(raw, context, out_shape=labels.shape[1:],
                                                      intensity=intensity).logits.float().log_softmax(1)
                        mask = keep_mask(start_log_p, labels, cfg.keep_sure)
                        loss = loss + cfg.keep_weight * keep_loss(out.logits, start_log_p, mask)
                    loss.backward()
                    total = float(loss.detach())
                    rate = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    scheduler.step()
                    smoothed = total if smoothed is None else 0.9 * smoothed + 0.1 * total
                    entry = {"iteration": step, "loss": total, "smoothed": smoothed, "learning_rate": rate,
                             "tiles": len(tiles), "precision": "bf16" if bf16 else "float32"}
                    message = f"loss {smoothed:.4f}"
                    if self.validation_tiles and (step % cfg.validate_every == 0 or step == cfg.iterations):
                        score = self.validate(device)
                        model.train()
                        entry["validation"] = score
                        if self.best_score is None or score > self.best_score + self.MIN_IMPROVEMENT:
                            self.best_score, best_step = score, step
                            best_state = copy.deepcopy(model.state_dict())
                    if self.best_score is not None:
                        message += f", held-out strokes mIoU {self.best_score:.3f} (best)"
                        entry["best_validation"] = self.best_score
                    entry["seconds"] = time.perf_counter() - start
                    self.log.append(entry)
                    yield Progress(step, cfg.iterations, message, dict(entry))
                    if (best_state is not None and step >= cfg.min_iterations
                            and step - best_step >= cfg.patience * cfg.validate_every):
                        self.stopped_early = True
                        break
        finally:  # also on Cancel (generator closed): keep the best weights, ready for inference
            prefetch.shutdown(wait=True, cancel_futures=True)
            if best_state is not None:
                model.load_state_dict(best_state)
            model.eval()
        # Not on Cancel: the model then predicts with equal shares (over-predicting rare classes) until trained on.
        yield Progress(len(self.log), len(self.log), f"{message}; estimating the classes' shares of the volume")
        self.estimate_prior(device)
        return self
