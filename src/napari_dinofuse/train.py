"""Fine-tuning the fused UNet on sparse painted labels.

Labels live on the raw grid: 0 = not painted (never enters the loss), k >= 1 = class k (logit k - 1).
Training tiles are drawn around painted voxels (most of a volume is unpainted), class-balanced; their
features come from the cache (the backbone is never called here) with the context resampled onto each
tile in world coordinates by :class:`~napari_dinofuse.features.FeatureSource`.

:class:`Trainer` runs as a generator of :class:`~napari_dinofuse.progress.Progress`; when the driver
closes it (Cancel) or it ends, ``trainer.model`` holds the best weights seen so far.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import PATCH_SIZE, resolve_device
from . import __version__
from .checkpoint import ModelInfo
from .errors import InputError
from .features import FeatureSource
from .modeling.unet import FusedUNet3D, UNetConfig
from .progress import Progress


@dataclass
class TrainConfig:
    iterations: int = 300
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    tile_shape: tuple[int, int, int] = (16, 96, 96)  # voxels; y/x are rounded up to the patch grid
    batch_size: int = 1  # tiles per step (accumulated gradients: tiles may differ in size at edges)
    dice_weight: float = 0.0  # add soft Dice on painted voxels
    seed: int = 0
    patience: int = 60  # stop when the smoothed loss has not improved by 1% for this many steps
    min_iterations: int = 40
    device: str = "auto"


@dataclass(frozen=True)
class PaintedLabels:
    """Where the painted voxels are, per class (1-based), found slab by slab (bounded memory)."""

    coords: dict[int, np.ndarray]  # class -> (n, 3) voxel indices
    num_classes: int  # the highest painted label: logits for 1..num_classes

    @property
    def counts(self) -> dict[int, int]:
        return {k: len(v) for k, v in self.coords.items()}


def find_painted(labels, raw_shape, slab: int = 16) -> PaintedLabels:
    """Validate sparse labels against the raw and list painted voxels; clear refusals otherwise."""
    shape = tuple(getattr(labels, "shape", ()))
    if shape != tuple(raw_shape):
        raise InputError(f"the labels have shape {shape} but the raw has {tuple(raw_shape)}: paint on a labels "
                         "layer with the raw's shape (e.g. 'New annotation layer')")
    dtype = np.dtype(labels.dtype)
    if dtype.kind not in "iu":
        raise InputError(f"labels must be integers (0 = unpainted, k = class k), got {dtype}")
    found: dict[int, list[np.ndarray]] = {}
    for z0 in range(0, shape[0], slab):
        block = labels[z0:z0 + slab]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        if block.min(initial=0) < 0:
            raise InputError("labels must not be negative (0 = unpainted, k = class k)")
        idx = np.nonzero(block)
        if not idx[0].size:
            continue
        values = block[idx]
        points = np.stack([idx[0] + z0, idx[1], idx[2]], axis=1)
        for k in np.unique(values):
            found.setdefault(int(k), []).append(points[values == k])
    if not found:
        raise InputError("no painted voxels: paint a few strokes of every class, background included")
    if len(found) == 1:
        k = next(iter(found))
        raise InputError(f"only class {k} is painted: paint the background (and any other class) too, "
                         "training needs at least two classes")
    coords = {k: np.concatenate(v) for k, v in sorted(found.items())}
    return PaintedLabels(coords, max(coords))


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


def new_model(source: FeatureSource, num_classes: int, base_channels: int = 16, fusion: str = "attention",
              intensity_stem: bool = False, seed: int = 0) -> FusedUNet3D:
    raw_channels, context_channels = source.channels
    if fusion != "none" and context_channels is None:
        raise InputError(f"fusion {fusion!r} needs a context volume: give one, or use fusion 'none'")
    config = UNetConfig(raw_channels=raw_channels, context_channels=context_channels or raw_channels,
                        num_classes=num_classes, base_channels=base_channels, fusion=fusion,
                        intensity_stem=intensity_stem)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FusedUNet3D(config)


def adapt_classes(model: FusedUNet3D, num_classes: int, seed: int = 0) -> FusedUNet3D:
    """Keep everything a saved model learnt; replace only the output head when the class count differs."""
    if model.config.num_classes == num_classes:
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Conv3d(model.head.in_channels, num_classes, kernel_size=1)
    model.head = head.to(next(model.parameters()).device)
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
                     package_version=__version__,
                     extra={"planes": signature["planes"], "tile_size": signature["tile_size"],
                            "intensity_mode": signature["intensity"]["mode"], **(extra or {})})


class Trainer:
    """Fine-tunes ``model`` in place on the painted voxels of ``labels``."""

    def __init__(self, model: FusedUNet3D, source: FeatureSource, labels, config: TrainConfig | None = None):
        self.config = config or TrainConfig()
        self.source = source
        self.painted = find_painted(labels, source.raw.shape)
        self.labels = labels
        if self.painted.num_classes > model.config.num_classes:
            raise InputError(f"class {self.painted.num_classes} is painted but the model has "
                             f"{model.config.num_classes} classes: adapt it first (adapt_classes)")
        self.model = model
        self.log: list[dict] = []
        self.best_loss = math.inf
        self.stopped_early = False
        z, y, x = (int(v) for v in self.config.tile_shape)
        self.tile_shape = (z, -(-y // PATCH_SIZE) * PATCH_SIZE, -(-x // PATCH_SIZE) * PATCH_SIZE)

    def sample_region(self, rng: np.random.Generator, painted_class: int | None = None):
        """A tile containing a painted voxel of ``painted_class`` (default: a class chosen uniformly)."""
        classes = list(self.painted.coords)
        points = self.painted.coords[painted_class if painted_class is not None else
                                     classes[rng.integers(len(classes))]]
        voxel = points[rng.integers(len(points))]
        region = []
        for axis, (v, n, size) in enumerate(zip(voxel, self.source.raw.shape, self.tile_shape)):
            step = PATCH_SIZE if axis else 1  # y/x starts on the patch grid
            lowest = max(0, -(-(v - size + 1) // step))
            highest = min(v // step, max(0, n - 1) // step)
            start = step * int(rng.integers(lowest, highest + 1))
            region.append(slice(start, min(start + size, n)))
        return tuple(region)

    def _batch(self, region, device):
        cfg = self.model.config
        raw, ctx, image = self.source.tile(region, context=cfg.fusion != "none", intensity=cfg.intensity_stem)
        to = lambda a: None if a is None else torch.from_numpy(a)[None].to(device)  # noqa: E731
        block = self.labels[region]
        labels = np.asarray(block.compute() if hasattr(block, "compute") else block).astype(np.int64)
        return to(raw), to(ctx), to(image), torch.from_numpy(labels)[None].to(device)

    def run(self) -> Generator[Progress, None, "Trainer"]:
        cfg = self.config
        device = resolve_device(cfg.device)
        model = self.model.to(device).train()
        weights = class_weights(self.painted)
        if weights.numel() < model.config.num_classes:
            weights = F.pad(weights, (0, model.config.num_classes - weights.numel()))
        rng = np.random.default_rng(cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        best_state, best_step, smoothed = copy.deepcopy(model.state_dict()), 0, None
        warmup = min(20, cfg.iterations // 5)
        classes = list(self.painted.coords)
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                for step in range(1, cfg.iterations + 1):
                    optimizer.zero_grad(set_to_none=True)
                    total = 0.0
                    for i in range(cfg.batch_size):
                        # Class-balanced batches: each tile centred on the next class in turn, so one step
                        # does not pull every prediction towards the single class its tile happened to show.
                        region = self.sample_region(rng, classes[(step * cfg.batch_size + i) % len(classes)])
                        raw, ctx, image, labels = self._batch(region, device)
                        with autocast:
                            out = model(raw, ctx, out_shape=labels.shape[1:], intensity=image)
                        loss = masked_loss(out.logits, labels, weights, cfg.dice_weight) / cfg.batch_size
                        loss.backward()
                        total += float(loss.detach())
                    optimizer.step()
                    smoothed = total if smoothed is None else 0.9 * smoothed + 0.1 * total
                    if step <= warmup:  # the average is still mostly its first noisy samples
                        best_step = step
                    elif smoothed < self.best_loss * 0.99:
                        self.best_loss, best_step = smoothed, step
                        best_state = copy.deepcopy(model.state_dict())
                    elapsed = time.perf_counter() - start
                    self.log.append({"iteration": step, "loss": total, "smoothed": smoothed, "seconds": elapsed})
                    yield Progress(step, cfg.iterations, f"loss {smoothed:.4f}",
                                   {"loss": total, "smoothed": smoothed, "seconds": elapsed})
                    if step >= cfg.min_iterations and step - best_step >= cfg.patience:
                        self.stopped_early = True
                        break
        finally:  # also on Cancel (generator closed): keep the best weights, ready for inference
            if self.best_loss < math.inf:  # (still warming up: the current weights are all there is)
                model.load_state_dict(best_state)
            model.eval()
        return self
