"""3D UNet segmenting at voxel resolution from patch-resolution DINOv3 features, steered by a wide context.

Inputs: raw features ``(B, C_raw, Z, Y/p, X/p)`` of one tile (plus, optionally, its intensities at full
resolution) and a :class:`ContextWindow`: the context's features and intensities over a window much wider than
the tile, on the context's own grid, with both grids placed in the world. The context branch works at the
context's resolution over the whole window (so it sees what lies beyond the tile), and only its result is
sampled, in world coordinates, onto each encoder level's grid of the tile. Output: logits ``(B, K, Z, Y, X)``,
to which the context branch's own class logits are added (see :meth:`FusedUNet3D.replace_heads`, which also
explains the class shares added at inference).

Every normalisation is a :class:`~.fusion.ChannelNorm` (statistics over a voxel's channels only), so
predictions do not depend on the tiling and training computes what inference does. Pooling follows the voxel
size (see :func:`anisotropic_pooling`).

Where the patch features enter (``UNetConfig.feature_level``): with the intensity stem, at level 1, after the
first pooling; level 0 sees the intensities alone. Added at level 0, a patch feature is the same over its whole
16-voxel patch, and the UNet drew thin membranes as bands up to half a patch wide (docs/benchmarks.md). The
logits are the decoder's plus two short paths, each a per-voxel reading: of level 0 (the sharp local cues a
classic pixel classifier uses) and of level 1 upsampled (the regions the patch features tell apart); both are
learnt within a few steps, and the deeper UNet adds what needs a wider view.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import NUM_LEVELS
from ..geometry import Grid, read_boxes, resample_batch
from .filters import FilterBank, channel_statistics, scale_sigmas
from .fusion import ContextAttentionFusion, norm

__all__ = ["FUSION_MODES", "NUM_LEVELS", "ContextWindow", "FusedUNet3D", "UNetConfig", "UNetOutput",
           "anisotropic_pooling", "count_parameters", "place"]

FUSION_MODES = ("attention", "concat", "none")
ISOTROPIC = ((2, 2, 2),) * NUM_LEVELS
_Triple = tuple[int, int, int]


def anisotropic_pooling(voxel_size, steps: int = NUM_LEVELS, tile_shape=None, min_size: int = 4
                        ) -> tuple[_Triple, ...]:
    """Per pooling step, the factor (1 or 2) per axis (z, y, x) for data of ``voxel_size`` (nm).

    The rules nnU-Net uses: an axis is pooled only while its current spacing is less than twice the finest
    current spacing (5 x 5 x 40 nm data pools y and x alone until they reach 40 nm, so 40 nm steps are never
    treated as 5 nm ones), and, given the training ``tile_shape``, only while it keeps >= ``min_size`` voxels
    (a 16-slice tile is not pooled down to one slice, where every voxel would see the tile's padded faces).
    """
    spacing = [float(v) for v in voxel_size]
    if len(spacing) != 3 or not all(v > 0 for v in spacing):
        raise ValueError(f"voxel_size needs 3 positive values (z, y, x), got {voxel_size!r}")
    size = [math.inf] * 3 if tile_shape is None else [int(n) for n in tile_shape]
    out = []
    for _ in range(steps):
        room = [n / 2 >= min_size for n in size]
        finest = min((s for s, r in zip(spacing, room) if r), default=0.0)
        factors = tuple(2 if r and s < 2 * finest else 1 for s, r in zip(spacing, room))
        spacing = [s * f for s, f in zip(spacing, factors)]
        size = [n / f for n, f in zip(size, factors)]
        out.append(factors)
    return tuple(out)


def _check_pooling(name: str, value, steps: int) -> tuple[_Triple, ...]:
    try:
        pooling = tuple(tuple(int(f) for f in step) for step in value)
    except (TypeError, ValueError, OverflowError):  # e.g. int(":"), int(inf)
        pooling = ()
    if len(pooling) != steps or any(len(s) != 3 or any(f not in (1, 2) for f in s) for s in pooling):
        raise ValueError(f"UNetConfig.{name} must be {steps} steps of 3 factors (z, y, x), each 1 or 2; "
                         f"got {value!r}")
    return pooling


@dataclass
class UNetConfig:
    raw_channels: int
    context_channels: int
    num_classes: int
    base_channels: int = 16
    fusion: str = "attention"
    patch_size: int = 16
    intensity_stem: bool = True  # raw intensities at full resolution: sharp boundaries
    context_stem: bool = True  # context intensities at the context's resolution
    # The context head's class logits (the context branch's own reading, sampled onto the tile) are added to
    # the UNet's: the direct path by which "which side of the nuclear envelope" reaches the prediction (see
    # FusedUNet3D.replace_heads). Model format 6; older models ran without it.
    context_evidence: bool = True
    # Predictions add the context head's logits times this (training adds them whole, on the tiles that keep them).
    # At 64 nm the context cannot place a thin class closer than its voxel: its membrane evidence is a band the
    # per-voxel head must cut down, and in full it left membranes thick or banded. 0.75 against 1 on 12 trained
    # models, each against itself: better on 10, worse on 2 (docs/benchmarks.md, 2026-12-05 third night).
    # Formats < 10 load with 1, as they ran.
    context_evidence_scale: float = 0.75
    pooling: tuple[_Triple, ...] = ISOTROPIC  # raw UNet: 3 steps between the 4 levels + 1 into the bottleneck
    context_pooling: tuple[_Triple, ...] = ISOTROPIC[:2]  # context encoder's 2 steps
    # How far beyond a tile the context branch reads (nm; None: the context's whole field). At least the
    # context encoder's reach (~21 context voxels, most of its weight within ~16), or tiles see the zero padding
    # of their window.
    context_margin_nm: float | None = 1024.0
    # Scales (per sigma: z, y, x in voxels) of the fixed filter banks feeding the intensity stems.
    stem_sigmas: tuple[tuple[float, float, float], ...] = scale_sigmas((1, 1, 1))
    context_stem_sigmas: tuple[tuple[float, float, float], ...] = scale_sigmas((1, 1, 1))
    # The encoder level the patch features join (see the module docstring): 1, or 0 as formats 3-6 had it (and as
    # a model without an intensity stem needs: level 0 would have nothing else to read). None: 1 with the stem.
    feature_level: int | None = None

    def __post_init__(self) -> None:
        for name in ("raw_channels", "context_channels", "num_classes", "base_channels", "patch_size"):
            value = getattr(self, name)
            # bool is an int subclass; True as a channel count is a bug, not a 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"UNetConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"UNetConfig.fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        for name in ("intensity_stem", "context_stem", "context_evidence"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UNetConfig.{name} must be a bool, got {getattr(self, name)!r}")
        scale = self.context_evidence_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 1:
            raise ValueError(f"UNetConfig.context_evidence_scale must be a number in [0, 1], got {scale!r}")
        self.pooling = _check_pooling("pooling", self.pooling, NUM_LEVELS)
        for name in ("stem_sigmas", "context_stem_sigmas"):
            try:
                value = tuple(tuple(float(v) for v in axes) for axes in getattr(self, name))
            except (TypeError, ValueError):
                value = ()
            if not value or any(len(a) != 3 or not all(0 <= v <= 16 for v in a) for a in value):
                raise ValueError(f"UNetConfig.{name} must be sigmas of 3 values (z, y, x) in [0, 16] voxels, got "
                                 f"{getattr(self, name)!r}")
            setattr(self, name, value)
        margin = self.context_margin_nm
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not 0 <= margin < math.inf):
            raise ValueError(f"UNetConfig.context_margin_nm must be a number of nm >= 0 (or None for the whole "
                             f"context), got {margin!r}")
        self.context_pooling = _check_pooling("context_pooling", self.context_pooling, 2)
        if self.feature_level is None:
            self.feature_level = 1 if self.intensity_stem else 0
        if type(self.feature_level) is not int or self.feature_level not in (0, 1):
            raise ValueError(f"UNetConfig.feature_level must be 0 or 1, got {self.feature_level!r}")
        if self.feature_level == 1 and not self.intensity_stem:
            raise ValueError("UNetConfig.feature_level=1 needs the intensity stem (level 0 would have no input)")

    @property
    def level_factors(self) -> tuple[_Triple, ...]:
        """Level k's voxel is ``level_factors[k]`` raw voxels (z, y, x); level 0 is the raw grid."""
        factors = [(1, 1, 1)]
        for step in self.pooling[:NUM_LEVELS - 1]:
            factors.append(tuple(a * b for a, b in zip(factors[-1], step)))
        return tuple(factors)

    @property
    def size_multiple(self) -> _Triple:
        """Inputs are padded to multiples of this (all four poolings divide evenly)."""
        return tuple(math.prod(step[axis] for step in self.pooling) for axis in range(3))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {unknown}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"missing UNetConfig keys: {missing}")
        return cls(**dict(data))


class ContextWindow(NamedTuple):
    """The context around one tile, and where both lie in the world.

    ``features`` (B, C, Z, gy, gx): context features on the patch grid of the window (y/x start on a patch);
    ``image`` (B, 1, Z, Y, X) or None: context intensities in [0, 1] on ``grid``, the window's voxel grid;
    ``target``: the tile's (level-0, raw) voxel grid. The window should reach well beyond the tile (the
    context encoder's receptive field, ~1 um at 64 nm): voxels near a window edge see zero padding.
    """

    features: torch.Tensor
    image: torch.Tensor | None
    grid: Grid
    target: Grid


class UNetOutput(NamedTuple):
    logits: torch.Tensor
    # One gate per encoder level in "attention" mode, () otherwise.
    attention: tuple[torch.Tensor, ...] = ()
    # With ``auxiliary=True`` and a context branch: the classes as the context branch alone reads them, on the
    # tile's grid (B, K, Z, Y, X); training supervises them too (see FusedUNet3D.context_head).
    context_logits: torch.Tensor | None = None


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _norm_relu(channels: int) -> list[nn.Module]:
    return [norm(channels), nn.ReLU()]


class ConvBlock(nn.Sequential):
    """(conv3x3x3 -> ChannelNorm -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            *_norm_relu(out_channels),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            *_norm_relu(out_channels),
        )


class UpBlock(nn.Module):
    """Upsampling + 1x1x1 conv, concat skip, ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.block = ConvBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # The 1x1x1 conv commutes with linear interpolation, so applying it first gives the same result cheaper.
        x = _upsample(self.reduce(x), skip.shape[2:])
        return self.block(torch.cat([x, skip], dim=1))


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _patches_to_voxels(feats: torch.Tensor, proj: nn.Module, shape: Sequence[int], patch: int) -> torch.Tensor:
    """Patch-grid features -> ``proj`` at patch resolution -> upsampled onto whole patches -> cropped to ``shape``.

    Upsampling ``g`` patches onto exactly ``g * patch`` voxels puts each patch feature on its own voxels; the
    1x1x1 ``proj`` commutes with the interpolation, so running it first is equal and ~patch^2 times cheaper.
    """
    z, gy, gx = feats.shape[2:]
    up = _upsample(proj(feats), (int(shape[0]), gy * patch, gx * patch))
    return up[:, :, :, :int(shape[1]), :int(shape[2])]


def crop_to_reads(values: torch.Tensor, sources: Sequence[Grid], low: np.ndarray, high: np.ndarray):
    """``values`` (B, C, Z, Y, X), element b on ``sources[b]``, cut to the voxels ``low[b]``..``high[b]`` that
    resampling reads (:func:`~napari_dinofuse.geometry.read_boxes`), and the grids of the cut: (values, sources).
    One box size for the batch, the largest element's. Resampling the cut gives what resampling the whole gives,
    so pointwise work on the values can skip the rest (a training tile reads 3x4x4 voxels of its 12x64x64 context
    window)."""
    shape = np.array(sources[0].shape)
    size = np.minimum((high - low).max(axis=0), shape)
    if np.all(size == shape):
        return values, list(sources)
    start = np.minimum(low, shape - size)  # the box shifted back inside where an element needs less than it
    return cut_boxes(values, start, size), [src.crop(a, a + size) for src, a in zip(sources, start)]


def cut_boxes(values: torch.Tensor, start: np.ndarray, size) -> torch.Tensor:
    """Of ``values`` (B, C, Z, Y, X), element b's box of ``size`` voxels from ``start[b]``, as one batch."""
    boxes = tuple((b, slice(z, z + size[0]), slice(y, y + size[1]), slice(x, x + size[2]))
                  for b, (z, y, x) in enumerate(start.tolist()))
    if len(boxes) == 1:
        return values[:1, :, boxes[0][1], boxes[0][2], boxes[0][3]]
    return _CutBoxes.apply(values, boxes)


class _CutBoxes(torch.autograd.Function):
    """Boxes cut from each element of a batch, whose backward fills one gradient for the batch: autograd's own (a
    slice per element and axis) filled one of the whole batch's size per element and summed them (on the sample
    9 fills of 8 x 16 x 12 x 64 x 64 a training step, 37 ms of 720 on a CPU; on a GPU, launches)."""

    @staticmethod
    def forward(ctx, values, boxes):
        ctx.boxes, ctx.shape, ctx.stride = boxes, values.shape, values.stride()
        return torch.cat([values[b:b + 1, :, z, y, x] for b, z, y, x in boxes])

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty_strided(ctx.shape, ctx.stride).zero_()
        for i, (b, z, y, x) in enumerate(ctx.boxes):
            out[b, :, z, y, x] = grad[i]
        return out, None


def _check_5d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 5:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 5D tensor (B, C, Z, Y, X), got {shape}")


# Devices whose 3D convolutions run channels-last (activations and weights): on 2 CPU cores a training step took
# 0.46 instead of 0.54 s and a prediction 10.5 instead of 11.3 s (base 16; the per-voxel LayerNorm then reads
# its channels contiguously). On CUDA unmeasured, so unchanged (bench_model.py --channels-last measures it).
CHANNELS_LAST_DEVICES = {"cpu"}


def memory_format(device: torch.device) -> torch.memory_format:
    """The memory format of the UNet's activations and conv weights on ``device``."""
    return torch.channels_last_3d if device.type in CHANNELS_LAST_DEVICES else torch.contiguous_format


def place(model: nn.Module, device) -> nn.Module:
    """``model`` moved to ``device`` (in place), its conv weights in the memory format its forward uses there:
    otherwise every convolution would reorder its weights on every call. Results are the same either way."""
    device = torch.device(device)
    return model.to(device).to(memory_format=memory_format(device))


def _filter_dtype(x: torch.Tensor) -> torch.dtype:
    """What a filter bank reads intensities in next to features ``x``: float32 at least (intensities rounded to
    bf16 moved the sample's standardised responses by up to 0.04)."""
    return torch.promote_types(x.dtype, torch.float32)


def _stem(sigmas, width: int) -> nn.Sequential:
    """Intensities (with the bank's halo) -> fixed filter bank -> 1x1x1 conv -> ChannelNorm -> ReLU."""
    bank = FilterBank(sigmas)
    return nn.Sequential(bank, nn.Conv3d(bank.channels, width, kernel_size=1, bias=False), *_norm_relu(width))


class ContextEncoder(nn.Module):
    """The context branch, at the context's own resolution over the window (or a box of it around what is read,
    with the same values there: :meth:`forward`).

    Features (projected at patch resolution, then upsampled) plus intensities through a small stem, then three
    scales (1, 1/2, 1/4 of the context's voxel size, pooling per :func:`anisotropic_pooling`) summed back at
    full context resolution: receptive field +-21 context voxels in-plane (+-1.3 um at 64 nm), plus the stem's
    filter halo (13 voxels at sigma 4); most of the weight lies in the central ~1 um. Of that, the trunk (fine,
    mid, coarse) reads +-18 voxels of its input on the sample's pooling (measured; :meth:`reach` bounds it at 20):
    what a box around the read voxels must add.
    """

    def __init__(self, feature_channels: int, width: int, intensity: bool, pooling, patch_size: int,
                 sigmas) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pooling = pooling
        # Per-channel statistics of the context's features over the volume (identity until calibrated): a
        # feature's spatial variation is small next to its offset (a random ViT's tokens are nearly alike,
        # DINOv3 has a few huge channels), and the per-voxel norms downstream would keep the offset alone: the
        # gates then came out constant over the volume.
        self.register_buffer("feature_mean", torch.zeros(feature_channels))
        self.register_buffer("feature_std", torch.ones(feature_channels))
        self.proj = nn.Conv3d(feature_channels, width, kernel_size=1)
        self.stem = _stem(sigmas, width) if intensity else None
        self.fine = ConvBlock(width, width)
        self.mid = ConvBlock(width, 2 * width)
        self.coarse = ConvBlock(2 * width, 2 * width)
        self.from_mid = nn.Conv3d(2 * width, width, kernel_size=1)
        self.from_coarse = nn.Conv3d(2 * width, width, kernel_size=1)

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor) -> None:
        """Measure the context features' per-channel mean and spread from ``features`` (C, ...), e.g. a few
        planes of the cached features; channels that hardly vary are not blown up."""
        mean, std = channel_statistics(features)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def reach(self) -> np.ndarray:
        """Per axis, how many voxels an output voxel of the trunk (fine, mid, coarse) reads on each side: a bound
        from its two 3x3x3 convolutions per scale, the pooling and the linear upsampling back (on the sample's
        context 20 voxels in-plane; 18 measured)."""
        return np.ceil(3.5 * self._cell() + 2 * np.array(self.pooling[0]) + 1.5).astype(int)

    def _cell(self) -> np.ndarray:
        """Per axis, the voxels of one coarse cell (both poolings)."""
        return np.array(self.pooling[0]) * np.array(self.pooling[1])

    def _box(self, shape, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The box (start per element, one size) the trunk runs on so that its outputs on each element's
        ``low``..``high`` are what it gives on the whole window: those voxels and the trunk's reach, starting on
        the pooling's lattice and a whole number of its cells long, so every pooled cell and upsampled position
        is the whole window's. An axis the cells do not divide stays whole (its upsampling scale would change)."""
        shape = np.array(shape)
        step, reach = self._cell(), self.reach()
        lo = np.clip(low - reach, 0, shape) // step * step
        hi = np.clip(high + reach, 0, shape)
        size = np.minimum(-(-(hi - lo).max(axis=0) // step) * step, shape)
        whole = shape % step != 0
        size[whole] = shape[whole]
        return np.minimum(lo, shape - size), size

    def forward(self, window: ContextWindow, need: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[torch.Tensor, np.ndarray]:
        """The map over the window, or with ``need`` = (low, high) (per element, window voxels, high exclusive:
        what will be read) over a box around those only, with the same values there. Returns (map, the box's
        start per element (B, 3))."""
        shape = window.grid.shape
        batch = window.features.shape[0]
        start, size = np.zeros((batch, 3), int), np.array(shape)
        if need is not None:
            start, size = self._box(shape, *need)
        cut = not np.array_equal(size, shape)
        stats = (1, -1, 1, 1, 1)
        features = (window.features - self.feature_mean.view(stats)) / self.feature_std.view(stats)
        x = _patches_to_voxels(features, self.proj, shape, self.patch_size)
        if cut:  # the upsampled patches are cheap; the stem and the trunk below run on the box only
            x = cut_boxes(x, start, size)
        if self.stem is not None:
            if window.image is None:
                raise ValueError("config.context_stem is enabled but the context window has no image")
            expected = (batch, 1, *shape)
            if tuple(window.image.shape) != expected:
                raise ValueError(f"context image must have shape {expected}, got {tuple(window.image.shape)}")
            halo = self.stem[0].halo  # the window's far edges: replicate (they are beyond the encoder's reach)
            image = F.pad(window.image.to(_filter_dtype(x)), [h for h in reversed(halo) for _ in range(2)],
                          mode="replicate")
            if cut:
                image = cut_boxes(image, start, size + 2 * np.array(halo))
            x = x + self.stem(image)
        fine = self.fine(x.contiguous(memory_format=memory_format(x.device)))
        mid = self.mid(F.max_pool3d(fine, self.pooling[0], ceil_mode=True))
        coarse = self.coarse(F.max_pool3d(mid, self.pooling[1], ceil_mode=True))
        size = fine.shape[2:]
        out = torch.relu(fine + _upsample(self.from_mid(mid), size) + _upsample(self.from_coarse(coarse), size))
        return out, start


class FusedUNet3D(nn.Module):
    """3D UNet on upsampled DINOv3 features with optional context fusion.

    Fusion modes:
      * ``"none"``: context ignored.
      * ``"concat"``: the context branch's map, sampled onto the tile, concatenated at the encoder input.
      * ``"attention"``: the context branch gates every encoder skip connection through
        :class:`ContextAttentionFusion`; the gates are returned in ``UNetOutput.attention``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"expected a UNetConfig, got {type(config).__name__}")
        self.config = config
        base = config.base_channels
        self.level_channels = tuple(base * 2**k for k in range(NUM_LEVELS))

        self.raw_proj = nn.Conv3d(config.raw_channels, base, kernel_size=1)
        self.intensity_stem = _stem(config.stem_sigmas, base) if config.intensity_stem else None

        self.context_encoder = self.context_pyramid = self.fusions = self.context_to_input = None
        self.context_width = width = max(16, base)
        if config.fusion != "none":
            self.context_encoder = ContextEncoder(config.context_channels, width, config.context_stem,
                                                  config.context_pooling, config.patch_size,
                                                  config.context_stem_sigmas)
            if config.fusion == "attention":
                # Per level: the context map -> that level's width, then the gate; all pointwise, so run at the
                # context's resolution and only the gate logits are sampled onto the level's grid.
                self.context_pyramid = nn.ModuleList(
                    nn.Sequential(nn.Conv3d(width, c, kernel_size=1, bias=False), *_norm_relu(c))
                    for c in self.level_channels
                )
                self.fusions = nn.ModuleList(ContextAttentionFusion(c) for c in self.level_channels)
            else:
                self.context_to_input = nn.Conv3d(width, base, kernel_size=1)

        in_channels = 2 * base if config.fusion == "concat" else base
        encoders = []
        for c in self.level_channels:
            encoders.append(ConvBlock(in_channels, c))
            in_channels = c
        self.encoders = nn.ModuleList(encoders)
        self.pools = nn.ModuleList(nn.MaxPool3d(step, step) for step in config.pooling)
        self.bottleneck = ConvBlock(self.level_channels[-1], 16 * base)
        decoders = []
        in_channels = 16 * base
        for c in reversed(self.level_channels):
            decoders.append(UpBlock(in_channels, c))
            in_channels = c
        self.decoders = nn.ModuleList(decoders)  # deepest level first
        self.replace_heads(config.num_classes)

    def replace_heads(self, num_classes: int) -> None:
        """New output layers for ``num_classes``: the decoder's head, the short paths from the fused skips of
        level 0 and (features at level 1) level 1 straight to the logits (see the module docstring) and the
        context branch's own head. Everything else is kept.

        The context head reads the classes from the context branch alone, and (``config.context_evidence``) its
        logits are added to the UNet's. Measured (docs/benchmarks.md): the context branch soon tells the two
        sides of a nuclear envelope apart perfectly, but through the gates alone that reached the prediction in
        some runs and not in others (the UNet fits the few strokes from raw appearance first, and the gates then
        get little gradient); added to the logits, it always does. Training may also supervise the context head
        on its own (an auxiliary loss, ``TrainConfig.context_loss_weight``).

        ``class_prior``: each class's share of the volume, added (as log(prior * K)) to the logits at inference
        only. Training sees the classes about equally often (tiles centred on each class in turn, a few strokes
        each), so its posteriors assume equal shares; with a thin membrane at 3 % of the volume every rare class
        is then over-predicted. Estimated after training (:func:`~napari_dinofuse.training.train.estimate_class_prior`);
        uniform (no correction) until then.
        """
        base = self.level_channels[0]
        self.head = nn.Conv3d(base, num_classes, kernel_size=1)
        self.local_head = nn.Conv3d(base, num_classes, kernel_size=1, bias=False)
        self.region_head = (nn.Conv3d(self.level_channels[1], num_classes, kernel_size=1, bias=False)
                            if self.config.feature_level == 1 else None)
        self.context_head = (nn.Conv3d(self.context_width, num_classes, kernel_size=1)
                             if self.context_encoder is not None else None)
        self.register_buffer("class_prior", torch.full((num_classes,), 1.0 / num_classes))

    # -- geometry -----------------------------------------------------------------------

    @property
    def adds_context_evidence(self) -> bool:
        """Whether predictions add the context head's logits (see :meth:`replace_heads`)."""
        return self.config.context_evidence and self.context_head is not None

    @property
    def intensity_halo(self) -> tuple[int, int, int]:
        """Voxels of real neighbouring intensities the stem needs on each side of a tile (0 without a stem)."""
        return self.intensity_stem[0].halo if self.intensity_stem is not None else (0, 0, 0)

    def default_out_shape(self, raw_feats: torch.Tensor) -> tuple[int, int, int]:
        """Full-resolution shape for patch features: Z is per-slice, Y and X are patched."""
        z, y, x = raw_feats.shape[2:]
        p = self.config.patch_size
        return int(z), int(y) * p, int(x) * p

    @staticmethod
    def project_and_upsample(feats: torch.Tensor, proj: nn.Module, out_shape: Sequence[int]) -> torch.Tensor:
        """Apply a 1x1x1 ``proj`` at patch resolution, then upsample trilinearly.

        Equal to upsample-then-project (interpolation weights sum to 1, so even the bias passes through), but
        the conv runs on ~patch_size**2 fewer voxels.
        """
        return _upsample(proj(feats), out_shape)

    # -- forward ------------------------------------------------------------------------

    def _check_context(self, raw_feats: torch.Tensor, context) -> list[ContextWindow]:
        """The context as a list of windows, each with its batch of tiles (one window for the whole batch, or
        one per tile: tiles of one batch may lie in different places)."""
        cfg = self.config
        if context is None:
            raise ValueError(f"fusion={cfg.fusion!r} needs a context window, got None")
        windows = [context] if isinstance(context, ContextWindow) else list(context)
        if not windows or not all(isinstance(w, ContextWindow) for w in windows):
            raise ValueError(f"context must be a ContextWindow or a list of them, got {type(context).__name__}")
        for w in windows:
            _check_5d("context features", w.features)
            if w.features.shape[1] != cfg.context_channels:
                raise ValueError(f"context features have {w.features.shape[1]} channels, config expects "
                                 f"{cfg.context_channels}")
        if sum(w.features.shape[0] for w in windows) != raw_feats.shape[0]:
            raise ValueError("context and raw features must have the same batch size")
        return windows

    def forward(self, raw_feats: torch.Tensor, context: ContextWindow | Sequence[ContextWindow] | None = None,
                out_shape: Sequence[int] | None = None, intensity: torch.Tensor | None = None,
                auxiliary: bool = False, evidence_keep: torch.Tensor | None = None) -> UNetOutput:
        """``evidence_keep`` (training): per tile (B,), 1 to add the context head's evidence, 0 to leave it out
        (training drops it on some tiles: see TrainConfig.context_dropout); None: added to every tile. Predictions
        (eval mode) add it times ``config.context_evidence_scale``."""
        cfg = self.config
        _check_5d("raw_feats", raw_feats)
        if raw_feats.shape[1] != cfg.raw_channels:
            raise ValueError(f"raw_feats has {raw_feats.shape[1]} channels, config expects {cfg.raw_channels}")
        if out_shape is None:
            out_shape = self.default_out_shape(raw_feats)
        out_shape = tuple(int(s) for s in out_shape)
        if len(out_shape) != 3 or min(out_shape) < 1:
            raise ValueError(f"out_shape must be three positive ints (Z, Y, X), got {out_shape}")
        use_context = cfg.fusion != "none"
        if use_context:
            windows = self._check_context(raw_feats, context)

        projected = self.project_and_upsample(raw_feats, self.raw_proj, out_shape)
        x, features = (projected, None) if cfg.feature_level == 0 else (0, projected)
        if self.intensity_stem is not None:
            if intensity is None:
                raise ValueError("config.intensity_stem is enabled but no intensity was given")
            _check_5d("intensity", intensity)
            expected = (raw_feats.shape[0], 1, *(n + 2 * h for n, h in zip(out_shape, self.intensity_halo)))
            if tuple(intensity.shape) != expected:
                raise ValueError(f"intensity must have shape {expected} (the tile and a halo of "
                                 f"{self.intensity_halo}), got {tuple(intensity.shape)}")
            # Full-resolution detail: patch features alone give 16-voxel blocky boundaries.
            x = x + self.intensity_stem(intensity.to(_filter_dtype(projected)))
        del projected  # a full-resolution tensor: not kept through the encoder

        # Pad at the end of each axis so all poolings divide evenly; replicate (not zeros) so the padding does
        # not look like a dark boundary to the convs.
        padded = tuple(-(-s // m) * m for s, m in zip(out_shape, cfg.size_multiple))
        if padded != out_shape:
            spec = (0, padded[2] - out_shape[2], 0, padded[1] - out_shape[1], 0, padded[0] - out_shape[0])
            x = F.pad(x, spec, mode="replicate")
            features = None if features is None else F.pad(features, spec, mode="replicate")
        if features is not None:  # on level 1's grid: each voxel gets the mean of the features on its voxels
            features = F.avg_pool3d(features, cfg.pooling[0], cfg.pooling[0])

        gates, context_logits = [], None
        evidence = self.adds_context_evidence
        if use_context:
            head = auxiliary or evidence
            parts = self._contexts(windows, padded, head)
            if head:
                context_logits = self._crop(parts.pop(), out_shape, (1, 1, 1))
            if cfg.fusion == "concat":
                x = torch.cat([x, parts[0]], dim=1)
            else:
                gates = parts

        x = x.contiguous(memory_format=memory_format(x.device))
        skips, attention = [], []
        for k, encoder in enumerate(self.encoders):
            if k > 0:
                x = self.pools[k - 1](x)
            if k == 1 and features is not None:
                x = x + features
            x = encoder(x)
            skip = x
            if gates:
                skip, att = self.fusions[k].fuse(skip, gates[k])
                attention.append(self._crop(att, out_shape, cfg.level_factors[k]))
            skips.append(skip)

        x = self.bottleneck(self.pools[-1](x))
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        logits = self.head(x) + self.local_head(skips[0])
        if self.region_head is not None:
            logits = logits + _upsample(self.region_head(skips[1]), logits.shape[2:])
        logits = self._crop(logits, out_shape, (1, 1, 1))
        if evidence:
            if not self.training:  # predictions weigh it down (see UNetConfig.context_evidence_scale)
                weight = cfg.context_evidence_scale
            else:
                weight = 1 if evidence_keep is None else evidence_keep.to(context_logits.dtype).view(-1, 1, 1, 1, 1)
            logits = logits + context_logits * weight
        if not self.training:  # the classes' share of the volume, not of the strokes (see class_prior)
            logits = logits + self.class_prior.log().add(math.log(cfg.num_classes)).view(1, -1, 1, 1, 1)
        return UNetOutput(logits=logits, attention=tuple(attention),
                          context_logits=context_logits if auxiliary else None)

    def _contexts(self, windows: list[ContextWindow], padded, auxiliary: bool = False) -> list[torch.Tensor]:
        """The context branch's outputs for the batch of tiles, in the tiles' order: [its map on the tiles' grid]
        ("concat") or the gate logits on each level's grid of the tiles ("attention"); with ``auxiliary``, the
        context head's logits on the tiles' grid last.

        Windows of one shape run the branch as one batch (it is per voxel: nothing mixes across a batch), and
        each map is sampled onto every tile of that batch at once, each tile from its own window: a training step
        on a GPU is bound by the host launching the kernels, one launch per op of the batch rather than per
        window. The gates, the pyramid before them and the head are pointwise, so they run only on the voxels that
        sampling reads (on the sample a training tile reads 3x4x4 of its window's 12x64x64 context voxels: a warm
        step at base 32 on 2 CPU cores took 2.5 s, 1.4 s then; a prediction tile of 32x128x128 reads 4x10x10), the
        encoder on those voxels and its reach (12x48x48 or 12x56x56 of the sample's training windows: a step at
        base 16 1.2x faster).
        """
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault((w.grid.shape, tuple(w.features.shape[1:]),
                               None if w.image is None else tuple(w.image.shape[1:])), []).append(i)
        starts = np.cumsum([0] + [w.features.shape[0] for w in windows])
        factors = [(1, 1, 1)] if self.config.fusion == "concat" else list(self.config.level_factors)
        per_group, order = [], []
        for members in groups.values():
            group = [windows[i] for i in members]
            batch = group[0]
            if len(group) > 1:
                batch = batch._replace(features=torch.cat([w.features for w in group]),
                                       image=None if batch.image is None else torch.cat([w.image for w in group]))
            sources = [w.grid for w in group for _ in range(w.features.shape[0])]
            tiles = [Grid(padded, w.target.voxel_size, w.target.offset)
                     for w in group for _ in range(w.features.shape[0])]
            targets = [[t.coarsen(f) for t in tiles] for f in factors] + [tiles]  # each level's grid, the head's
            # The encoder runs around what sampling reads (and its reach), the pointwise rest on the reads alone.
            low, high = read_boxes(sources, targets)
            context_map, start = self.context_encoder(batch, (low, high))
            sources = [src.crop(a, a + context_map.shape[2:]) for src, a in zip(sources, start)]
            context_map, sources = crop_to_reads(context_map, sources, low - start, high - start)
            maps = self._pointwise_maps(context_map, auxiliary)
            per_group.append([resample_batch(m, sources, level).contiguous() for m, level in zip(maps, targets)])
            order += [j for i in members for j in range(starts[i], starts[i + 1])]
        parts = [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*per_group)]
        if order != sorted(order):  # back to the tiles' order (the index sent without making the host wait)
            device = parts[0].device
            index = torch.from_numpy(np.argsort(order))
            index = (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)
            parts = [p.index_select(0, index) for p in parts]
        return parts

    def _pointwise_maps(self, context_map: torch.Tensor, auxiliary: bool) -> list[torch.Tensor]:
        """What :meth:`_contexts` samples onto the tiles, computed from the context branch's map pointwise."""
        if self.config.fusion == "concat":
            maps = [self.context_to_input(context_map)]
        else:
            maps = [self.fusions[k].gate(self.context_pyramid[k](context_map)) for k in range(NUM_LEVELS)]
        if auxiliary:
            maps.append(self.context_head(context_map))
        return maps

    @staticmethod
    def _crop(t: torch.Tensor, out_shape: Sequence[int], factors: Sequence[int]) -> torch.Tensor:
        z, y, x = (-(-s // f) for s, f in zip(out_shape, factors))  # ceil division
        return t[:, :, :z, :y, :x]
