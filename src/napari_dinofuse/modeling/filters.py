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
    magnitude (central differences), each standardised with the volume's statistics (:meth:`calibrate`). The input must carry ``halo``
    extra voxels on each side of each axis (real neighbouring data, so a tile's responses do not depend on
    where the tile ends); the output is cropped to the inner part.
    """

    def __init__(self, sigmas: Sequence[Sequence[float]]) -> None:
        super().__init__()
        self.sigmas = tuple(tuple(float(s) for s in axes) for axes in sigmas)
        kernels = [[_gaussian(s) for s in axes] for axes in self.sigmas]
        for i, axes in enumerate(kernels):
            for a, k in enumerate(axes):
                self.register_buffer(f"g{i}_{a}", k, persistent=False)
        # +1: the central differences read one voxel further.
        self.halo = tuple(max(len(axes[a]) // 2 for axes in kernels) + 1 for a in range(3))
        self.channels = 1 + 3 * len(self.sigmas)
        # Per-channel statistics of the responses over the volume (identity until calibrated).
        self.register_buffer("mean", torch.zeros(self.channels))
        self.register_buffer("std", torch.ones(self.channels))

    @torch.no_grad()
    def calibrate(self, images) -> None:
        """Measure the responses' mean and spread over ``images``: (1, 1, Z, Y, X) tensors with the halo, e.g.
        blocks spread over the volume. Responses that hardly vary (noise-free blocks) are not blown up."""
        mean, std = channel_statistics(torch.cat([self._responses(image.float()).flatten(2)[0] for image in images],
                                                 dim=1))
        self.mean.copy_(mean)
        self.std.copy_(std)

    def _smooth(self, x: torch.Tensor, i: int) -> torch.Tensor:
        for a in range(3):
            k = getattr(self, f"g{i}_{a}")
            if len(k) == 1:
                continue
            shape = [1, 1, 1, 1, 1]
            shape[2 + a] = len(k)
            pad = [0] * 6
            pad[2 * (2 - a)] = pad[2 * (2 - a) + 1] = len(k) // 2
            x = F.conv3d(F.pad(x, pad, mode="replicate"), k.to(x.dtype).view(shape))
        return x

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (self._responses(image) - self.mean.view(shape).to(image.dtype)) / self.std.view(shape).to(image.dtype)

    def _responses(self, image: torch.Tensor) -> torch.Tensor:
        h = self.halo
        inner = (slice(None), slice(None), *(slice(n, s - n) for n, s in zip(h, image.shape[2:])))
        out = [image[inner]]
        for i, axes in enumerate(self.sigmas):
            g = self._smooth(image, i)
            laplace = torch.zeros_like(g[inner])
            grad2 = torch.zeros_like(g[inner])
            for a in range(3):
                dim = 2 + a
                n = g.shape[dim]
                before, centre, after = (g.narrow(dim, o, n - 2) for o in (0, 1, 2))
                crop = list(inner)
                crop[dim] = slice(h[a] - 1, n - h[a] - 1)
                laplace = laplace + (before - 2 * centre + after)[tuple(crop)]
                grad2 = grad2 + (0.5 * (after - before))[tuple(crop)] ** 2
            scale = max(axes)  # derivatives of a smoothed image shrink with its scale: keep them comparable
            out += [g[inner], laplace * scale**2, grad2.sqrt() * scale]
        return torch.cat(out, dim=1)
