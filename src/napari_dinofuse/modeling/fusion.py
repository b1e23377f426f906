"""Context-to-raw feature fusion by channel/voxel-wise attention gating."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ContextAttentionFusion", "group_count"]


def group_count(channels: int) -> int:
    """Number of GroupNorm groups for ``channels``.

    GroupNorm rather than BatchNorm because training runs at batch 1-2, where batch
    statistics are noise; gcd keeps the count a divisor of ``channels`` for any width.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return math.gcd(channels, 8)


class ContextAttentionFusion(nn.Module):
    """Gate raw features with an attention map computed from context features.

    ``fused = raw + raw * sigmoid(f(context))``: the residual form means context can
    only re-weight what the raw features already contain, never replace them, and an
    uninformative context degrades gracefully to (a scaled) identity.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        self.channels = channels
        hidden = max(1, channels // reduction)
        # No bias before the norm: GroupNorm subtracts the mean anyway.
        self.reduce = nn.Conv3d(channels, hidden, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(group_count(hidden), hidden)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv3d(hidden, channels, kernel_size=1)

    def forward(self, raw: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if raw.shape != context.shape:
            raise ValueError(
                f"raw and context must have the same shape, got {tuple(raw.shape)} and {tuple(context.shape)}"
            )
        attention = torch.sigmoid(self.expand(self.act(self.norm(self.reduce(context)))))
        return raw + raw * attention, attention
