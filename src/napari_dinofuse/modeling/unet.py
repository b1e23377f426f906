"""3D UNet segmenting at voxel resolution from patch-resolution DINOv3 features.

Inputs are raw features ``(B, C_raw, Z, Y/p, X/p)`` and context features already
resampled onto the same patch grid ``(B, C_ctx, Z, Y/p, X/p)``; the output is logits
``(B, K, Z, Y, X)`` at full resolution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import ContextAttentionFusion, group_count

__all__ = ["FUSION_MODES", "FusedUNet3D", "UNetConfig", "UNetOutput", "count_parameters"]

FUSION_MODES = ("attention", "concat", "none")
NUM_LEVELS = 4
# Levels 2-4 and the bottleneck each pool by 2: inputs must divide by 2**4.
_SIZE_MULTIPLE = 2**NUM_LEVELS


@dataclass
class UNetConfig:
    raw_channels: int
    context_channels: int
    num_classes: int
    base_channels: int = 128
    fusion: str = "attention"
    patch_size: int = 16
    intensity_stem: bool = False

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
        if not isinstance(self.intensity_stem, bool):
            raise ValueError(f"UNetConfig.intensity_stem must be a bool, got {self.intensity_stem!r}")

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


class UNetOutput(NamedTuple):
    logits: torch.Tensor
    # One gate per encoder level in "attention" mode, () otherwise.
    attention: tuple[torch.Tensor, ...] = ()


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _norm_relu(channels: int) -> list[nn.Module]:
    return [nn.GroupNorm(group_count(channels), channels), nn.ReLU(inplace=True)]


class ConvBlock(nn.Sequential):
    """(conv3x3x3 -> GroupNorm -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            *_norm_relu(out_channels),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            *_norm_relu(out_channels),
        )


class UpBlock(nn.Module):
    """x2 trilinear upsampling + 1x1x1 conv, concat skip, ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.block = ConvBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # The 1x1x1 conv commutes with linear interpolation, so applying it first gives
        # the same result at 1/8 of the cost.
        x = _upsample(self.reduce(x), skip.shape[2:])
        return self.block(torch.cat([x, skip], dim=1))


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _check_5d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 5:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 5D tensor (B, C, Z, Y, X), got {shape}")


class FusedUNet3D(nn.Module):
    """3D UNet on upsampled DINOv3 features with optional context fusion.

    Fusion modes:
      * ``"none"``: context ignored.
      * ``"concat"``: raw and context concatenated at the encoder input.
      * ``"attention"``: a context pyramid gates every encoder skip connection through
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
        self.context_proj = (
            nn.Conv3d(config.context_channels, base, kernel_size=1) if config.fusion != "none" else None
        )
        self.intensity_stem = (
            nn.Sequential(nn.Conv3d(1, base, 3, padding=1, bias=False), *_norm_relu(base))
            if config.intensity_stem
            else None
        )

        if config.fusion == "attention":
            # Light pyramid: one 1x1x1 conv per level keeps context cheap relative to the encoder.
            self.context_pyramid = nn.ModuleList(
                nn.Sequential(nn.Conv3d(base, c, kernel_size=1, bias=False), *_norm_relu(c))
                for c in self.level_channels
            )
            self.fusions = nn.ModuleList(ContextAttentionFusion(c) for c in self.level_channels)
        else:
            self.context_pyramid = None
            self.fusions = None

        in_channels = 2 * base if config.fusion == "concat" else base
        encoders = []
        for c in self.level_channels:
            encoders.append(ConvBlock(in_channels, c))
            in_channels = c
        self.encoders = nn.ModuleList(encoders)
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = ConvBlock(self.level_channels[-1], 16 * base)
        decoders = []
        in_channels = 16 * base
        for c in reversed(self.level_channels):
            decoders.append(UpBlock(in_channels, c))
            in_channels = c
        self.decoders = nn.ModuleList(decoders)  # deepest level first
        self.head = nn.Conv3d(base, config.num_classes, kernel_size=1)

    # -- geometry -----------------------------------------------------------------------

    def default_out_shape(self, raw_feats: torch.Tensor) -> tuple[int, int, int]:
        """Full-resolution shape for patch features: Z is per-slice, Y and X are patched."""
        z, y, x = raw_feats.shape[2:]
        p = self.config.patch_size
        return int(z), int(y) * p, int(x) * p

    @staticmethod
    def project_and_upsample(
        feats: torch.Tensor, proj: nn.Module, out_shape: Sequence[int]
    ) -> torch.Tensor:
        """Apply a 1x1x1 ``proj`` at patch resolution, then upsample trilinearly.

        Equal to upsample-then-project (interpolation weights sum to 1, so even the bias
        passes through), but the conv runs on ~patch_size**2 fewer voxels.
        """
        return _upsample(proj(feats), out_shape)

    # -- forward ------------------------------------------------------------------------

    def forward(
        self,
        raw_feats: torch.Tensor,
        context_feats: torch.Tensor | None = None,
        out_shape: Sequence[int] | None = None,
        intensity: torch.Tensor | None = None,
    ) -> UNetOutput:
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
            if context_feats is None:
                raise ValueError(f"fusion={cfg.fusion!r} needs context_feats, got None")
            _check_5d("context_feats", context_feats)
            if context_feats.shape[1] != cfg.context_channels:
                raise ValueError(
                    f"context_feats has {context_feats.shape[1]} channels, config expects {cfg.context_channels}"
                )
            if context_feats.shape[0] != raw_feats.shape[0] or context_feats.shape[2:] != raw_feats.shape[2:]:
                raise ValueError(
                    "context_feats must share batch size and patch grid with raw_feats, got "
                    f"{tuple(context_feats.shape)} vs {tuple(raw_feats.shape)}"
                )

        x = self.project_and_upsample(raw_feats, self.raw_proj, out_shape)
        if self.intensity_stem is not None:
            if intensity is None:
                raise ValueError("config.intensity_stem is enabled but no intensity was given")
            _check_5d("intensity", intensity)
            expected = (raw_feats.shape[0], 1, *out_shape)
            if tuple(intensity.shape) != expected:
                raise ValueError(f"intensity must have shape {expected}, got {tuple(intensity.shape)}")
            # Full-resolution detail: patch features alone give 16-voxel blocky boundaries.
            x = x + self.intensity_stem(intensity.to(x.dtype))

        ctx = self.project_and_upsample(context_feats, self.context_proj, out_shape) if use_context else None
        if cfg.fusion == "concat":
            x = torch.cat([x, ctx], dim=1)

        # Pad at the end of each axis so all four poolings divide evenly; replicate (not
        # zeros) so the padding does not look like a dark boundary to the convs.
        pads = [(-s) % _SIZE_MULTIPLE for s in out_shape]
        if any(pads):
            spec = (0, pads[2], 0, pads[1], 0, pads[0])
            x = F.pad(x, spec, mode="replicate")
            if ctx is not None:
                ctx = F.pad(ctx, spec, mode="replicate")

        skips = []
        attention = []
        for k, encoder in enumerate(self.encoders):
            if k > 0:
                x = self.pool(x)
            x = encoder(x)
            skip = x
            if cfg.fusion == "attention":
                ctx_k = F.avg_pool3d(ctx, 2**k) if k > 0 else ctx
                skip, att = self.fusions[k](skip, self.context_pyramid[k](ctx_k))
                attention.append(self._crop(att, out_shape, k))
            skips.append(skip)

        x = self.bottleneck(self.pool(x))
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        logits = self._crop(self.head(x), out_shape, 0)
        return UNetOutput(logits=logits, attention=tuple(attention))

    @staticmethod
    def _crop(t: torch.Tensor, out_shape: Sequence[int], level: int) -> torch.Tensor:
        f = 2**level
        z, y, x = (-(-s // f) for s in out_shape)  # ceil division
        return t[:, :, :z, :y, :x]
