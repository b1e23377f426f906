"""Context-to-raw feature fusion by channel/voxel-wise attention gating."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ContextAttentionFusion", "norm"]


def norm(channels: int) -> nn.Module:
    """The one normalisation layer of every model here: BatchNorm with running statistics.

    At inference its statistics are fixed, so a voxel's prediction does not depend on which tile it falls in
    (GroupNorm/InstanceNorm normalise each tile by itself: a checkerboard of tiles in the prediction). A
    BatchNorm's training statistics pool over all voxels of a tile, so batches of 1-2 tiles are not a problem.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return nn.BatchNorm3d(channels)


class ContextAttentionFusion(nn.Module):
    """Gate raw features with an attention map computed from context features.

    ``fused = raw + raw * sigmoid(f(context))``: the residual form means context can only re-weight what the raw
    features already contain, never replace them, and an uninformative context degrades gracefully to (a
    scaled) identity. ``f`` is pointwise (1x1x1 convs), so :meth:`gate` can run wherever the context lives (at
    its own, coarser resolution) and its logits be interpolated onto the raw's grid before the sigmoid.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        self.channels = channels
        hidden = max(1, channels // reduction)
        # No bias before the norm: it subtracts the mean anyway.
        self.reduce = nn.Conv3d(channels, hidden, kernel_size=1, bias=False)
        self.norm = norm(hidden)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv3d(hidden, channels, kernel_size=1)

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """The attention logits (before the sigmoid) for ``context`` features of ``channels`` channels."""
        return self.expand(self.act(self.norm(self.reduce(context))))

    def fuse(self, raw: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused, attention) from raw features and gate logits of the same shape."""
        if raw.shape != logits.shape:
            raise ValueError(f"raw and gate must have the same shape, got {tuple(raw.shape)} and {tuple(logits.shape)}")
        attention = torch.sigmoid(logits)
        return raw + raw * attention, attention

    def forward(self, raw: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if raw.shape != context.shape:
            raise ValueError(
                f"raw and context must have the same shape, got {tuple(raw.shape)} and {tuple(context.shape)}"
            )
        return self.fuse(raw, self.gate(context))
