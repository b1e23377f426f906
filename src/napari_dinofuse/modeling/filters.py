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

__all__ = ["FilterBank", "channel_statistics", "scale_sigmas", "symmetric_eigenvalues"]

SIGMAS = (1.0, 2.0, 4.0)  # in the finest axis' voxels
_PAIRS = ((0, 1), (0, 2), (1, 2))  # the mixed derivatives: zy, zx, yx


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
    """(B, 1, Z, Y, X) intensities -> (B, :attr:`channels`, Z', Y', X') filter responses.

    Channels: the intensity, then per sigma the Gaussian-smoothed intensity, its Laplacian and its gradient
    magnitude (central differences), then (``hessian``) per sigma the three eigenvalues of the Hessian, largest
    first; each standardised with the volume's statistics (:meth:`calibrate`). The eigenvalues are what tells a
    thin sheet (a membrane: one large eigenvalue) from a blob or an edge in any orientation: a forest given them
    scored the sample's membrane 0.09-0.13 IoU higher than without (docs/benchmarks.md), and a few strokes do
    not teach a stem the same rotation-invariant test. The
    input must carry ``halo`` extra voxels on each side of each axis (real neighbouring data, so a tile's
    responses do not depend on where the tile ends); the output is the inner part.

    A dozen kernels compute it all (one conv per axis smooths at every scale, one fixed 3x3x3 stencil takes the
    derivatives of every scale): a GPU training step is bound by launching kernels, and the filters done one
    scale and one axis at a time took ~110 per bank (and 2-13x longer on a CPU); the eigenvalues add one more
    stencil and ~30 elementwise kernels for all scales together. Always in float32, under bf16
    autocast too: a Laplacian is a small difference of nearly equal smoothed values, which bf16's 8-bit
    mantissa loses (in bf16 the sigma-4 Laplacian was off by up to 11 of its standard deviations).
    """

    def __init__(self, sigmas: Sequence[Sequence[float]], hessian: bool = False) -> None:
        super().__init__()
        self.sigmas = tuple(tuple(float(s) for s in axes) for axes in sigmas)
        self.hessian = bool(hessian)
        kernels = [[_gaussian(s) for s in axes] for axes in self.sigmas]
        scales = len(self.sigmas)
        radius = [max(len(axes[a]) // 2 for axes in kernels) for a in range(3)]
        # The smoothing reads the widest kernel's radius, the central differences one voxel further: the
        # smoothed image is valid (no padding) exactly where the derivatives read it.
        self.halo = tuple(r + 1 for r in radius)
        self.channels = 1 + (6 if self.hessian else 3) * scales
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
        # The Hessian: the second differences along z, y, x, then the mixed ones zy, zx, yx.
        second = torch.zeros(6, 1, 3, 3, 3)
        for a in range(3):
            for offset, weight in ((0, 1.0), (1, -2.0), (2, 1.0)):
                at = [1, 1, 1]
                at[a] = offset
                second[a, 0][tuple(at)] = weight
        for i, (a, b) in enumerate(_PAIRS):
            for oa, ob in ((0, 0), (0, 2), (2, 0), (2, 2)):
                at = [1, 1, 1]
                at[a], at[b] = oa, ob
                second[3 + i, 0][tuple(at)] = 0.25 * (oa - 1) * (ob - 1)
        self.register_buffer("second", second, persistent=False)
        # Per scale, what turns each component into physical units (the finest axis' voxels) times sigma^2: an
        # axis's voxels are max(sigmas) / sigma as long as the finest (the sigmas are one physical scale).
        # Without it the eigenvalues of anisotropic data would depend on the orientation of the structure.
        hessian_factors = []
        for axes in self.sigmas:
            scale = max(axes)
            step = [scale / s if s > 0 else 1.0 for s in axes]
            hessian_factors.append([scale**2 / (step[a] * step[b]) for a, b in (*zip(range(3), range(3)), *_PAIRS)])
        self.register_buffer("hessian_factors", torch.tensor(hessian_factors).view(1, scales, 6, 1, 1, 1),
                             persistent=False)
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
        out = [image[(slice(None), slice(None), *inner)], responses.flatten(1, 2)]
        if self.hessian:
            h = F.conv3d(g.reshape(-1, 1, *g.shape[2:]), self.second.to(image.dtype))
            h = h.view(g.shape[0], scales, 6, *h.shape[2:]) * self.hessian_factors.to(image.dtype)
            out.append(torch.stack(symmetric_eigenvalues(*h.unbind(2)), dim=2).flatten(1, 2))
        return torch.cat(out, dim=1)


def symmetric_eigenvalues(zz, yy, xx, zy, zx, yx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eigenvalues (largest, middle, smallest) of symmetric 3x3 matrices given elementwise by their entries.

    Closed form (the trigonometric solution of the characteristic cubic): a few dozen elementwise kernels, where
    ``torch.linalg.eigvalsh`` on millions of 3x3 matrices is an iterative solver per matrix. Where two eigenvalues
    (nearly) meet, the arccos keeps about half the digits: ~3e-4 of the matrix's scale in float32, far below what
    tells a membrane from its surroundings (in float64 the bank took ~4x as long on a CPU).
    """
    q = (zz + yy + xx) / 3
    a, b, c = zz - q, yy - q, xx - q
    off = zy.square() + zx.square() + yx.square()
    p = ((a.square() + b.square() + c.square() + 2 * off) / 6).sqrt()
    det = a * (b * c - yx.square()) - zy * (zy * c - yx * zx) + zx * (zy * yx - b * zx)
    # |det| <= 2 p^3; where p is ~0 (all eigenvalues ~equal) the clamp makes r ~0 and every eigenvalue ~q.
    r = (det / (2 * p.clamp_min(1e-10) ** 3)).clamp(-1.0, 1.0)
    phi = torch.acos(r) / 3
    largest = q + 2 * p * torch.cos(phi)
    smallest = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    return largest, 3 * q - largest - smallest, smallest
