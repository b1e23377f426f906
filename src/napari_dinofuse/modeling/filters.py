"""A fixed bank of classic image filters, the input of the intensity stems.

What an ilastik-style random forest sees (smoothed intensity, Laplacian of Gaussian, gradient magnitude at a
few scales), computed in torch on the tile's device. A stem learning its first filters from a few painted
strokes starts far behind a forest that is handed these; given them, it starts level and can go further.
Nothing here is learned. Each response is standardised with its mean and spread over the volume, measured
once when a model is created (:meth:`FilterBank.calibrate`) and saved with it: without that, a response's
variation is a few percent of the grey level it rides on, and the per-voxel normalisation that follows the stem
keeps the grey level and loses the rest. The statistics are fixed, never per tile or per batch, so predictions do
not depend on the tiling and training computes what inference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FilterBank", "channel_statistics", "scale_sigmas"]

SIGMAS = (1.0, 2.0, 4.0)  # in the finest axis' voxels


def scale_sigmas(voxel_size, sigmas=SIGMAS) -> tuple[tuple[float, float, float], ...]:
    """Per sigma, the per-axis sigmas (z, y, x) in voxels for the same physical scale on every axis."""
    finest = min(float(v) for v in voxel_size)
    return tuple(tuple(round(s * finest / float(v), 4) for v in voxel_size) for s in sigmas)


def _gaussian(sigma: float) -> torch.Tensor:
    if sigma < 0.3:  # narrower than a voxel: no smoothing along this axis
        return torch.ones(1)
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def channel_statistics(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and spread of ``values`` (C, ...); channels that hardly vary get spread 1e-3, so
    standardising does not blow up their noise."""
    flat = values.float().flatten(1)
    return flat.mean(1), flat.std(1).clamp_min(1e-3)


class FilterBank(nn.Module):
    """(B, 1, Z, Y, X) intensities -> (B, 1 + 3 * len(sigmas), Z', Y', X') filter responses.

    Channels: the intensity, then per sigma the Gaussian-smoothed intensity, its Laplacian and its gradient
    magnitude (central differences), each standardised with the volume's statistics (:meth:`calibrate`). The
    input must carry ``halo`` extra voxels on each side of each axis (real neighbouring data, so a tile's
    responses do not depend on where the tile ends); the output is the inner part.

    A dozen kernels compute it all (one conv per axis smooths at every scale, one fixed 3x3x3 stencil takes the
    derivatives of every scale): a GPU training step is bound by launching kernels, and the filters done one
    scale and one axis at a time took ~110 per bank (and 2-13x longer on a CPU). Always in float32, under bf16
    autocast too: a Laplacian is a small difference of nearly equal smoothed values, which bf16's 8-bit
    mantissa loses (in bf16 the sigma-4 Laplacian was off by up to 11 of its standard deviations).
    """

    def __init__(self, sigmas: Sequence[Sequence[float]]) -> None:
        super().__init__()
        self.sigmas = tuple(tuple(float(s) for s in axes) for axes in sigmas)
        kernels = [[_gaussian(s) for s in axes] for axes in self.sigmas]
        scales = len(self.sigmas)
        radius = [max(len(axes[a]) // 2 for axes in kernels) for a in range(3)]
        # The smoothing reads the widest kernel's radius, the central differences one voxel further: the
        # smoothed image is valid (no padding) exactly where the derivatives read it.
        self.halo = tuple(r + 1 for r in radius)
        self.channels = 1 + 3 * scales
        # Per axis, every scale's kernel centred in one of the widest kernel's length (zeros around a narrower
        # one): one conv per axis smooths at all scales, the first from the one intensity channel to a channel per
        # scale, the others per channel. An axis no scale smooths along has no conv.
        self.axes = tuple(a for a in range(3) if radius[a])
        for a in self.axes:
            weight = torch.zeros(scales, 1, 2 * radius[a] + 1)
            for i, axes in enumerate(kernels):
                k = axes[a]
                weight[i, 0, radius[a] - len(k) // 2:radius[a] + len(k) // 2 + 1] = k
            shape = [scales, 1, 1, 1, 1]
            shape[2 + a] = -1
            self.register_buffer(f"smooth_{a}", weight.view(shape), persistent=False)
        # The Laplacian (sum of second differences) and the three central differences, one 3x3x3 stencil run on
        # each scale's smoothed image; then, per scale, the smoothed image, the Laplacian and the gradient
        # magnitude are multiplied by 1, sigma^2 and sigma (derivatives of a smoothed image shrink with its scale:
        # keep them comparable).
        stencil = torch.zeros(4, 1, 3, 3, 3)
        stencil[0, 0, 1, 1, 1] = -6.0
        for a in range(3):
            for offset, sign in ((0, -1.0), (2, 1.0)):
                at = [1, 1, 1]
                at[a] = offset
                stencil[0, 0][tuple(at)] = 1.0
                stencil[1 + a, 0][tuple(at)] = 0.5 * sign
        self.register_buffer("stencil", stencil, persistent=False)
        factors = torch.tensor([[1.0, max(axes) ** 2, max(axes)] for axes in self.sigmas])
        self.register_buffer("factors", factors.view(1, scales, 3, 1, 1, 1), persistent=False)
        # Per-channel statistics of the responses over the volume (identity until calibrated).
        self.register_buffer("mean", torch.zeros(self.channels))
        self.register_buffer("std", torch.ones(self.channels))

    @torch.no_grad()
    def calibrate(self, images) -> None:
        """Measure the responses' mean and spread over ``images``: (1, 1, Z, Y, X) tensors with the halo, e.g.
        blocks spread over the volume. Responses that hardly vary (noise-free blocks) are not blown up."""
        mean, std = channel_statistics(torch.cat([self._responses(image).flatten(2)[0] for image in images],
                                                 dim=1))
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        with torch.autocast(image.device.type, enabled=False):
            out = (self._responses(image) - self.mean.view(shape)) / self.std.view(shape)
        return out.to(image.dtype)

    def _responses(self, image: torch.Tensor) -> torch.Tensor:
        """The unstandardised responses, in float32 (float64 for float64 input)."""
        image = image if image.dtype == torch.float64 else image.float()
        scales = len(self.sigmas)
        g = image
        for a in self.axes:
            g = F.conv3d(g, getattr(self, f"smooth_{a}").to(image.dtype), groups=1 if g.shape[1] == 1 else scales)
        if g.shape[1] == 1:
            g = g.expand(-1, scales, -1, -1, -1)
        # The scales as a batch of one-channel images (a grouped conv is several times slower on a CPU).
        d = F.conv3d(g.reshape(-1, 1, *g.shape[2:]), self.stencil.to(image.dtype))
        d = d.view(g.shape[0], scales, 4, *d.shape[2:])
        # Not linalg.vector_norm: over a middle axis it is ~100x slower on a CPU.
        magnitude = d[:, :, 1:].square().sum(2).sqrt()
        responses = torch.stack([g[:, :, 1:-1, 1:-1, 1:-1], d[:, :, 0], magnitude], dim=2)
        responses = responses * self.factors.to(image.dtype)
        inner = tuple(slice(h, s - h) for h, s in zip(self.halo, image.shape[2:]))
        return torch.cat([image[(slice(None), slice(None), *inner)], responses.flatten(1, 2)], dim=1)
