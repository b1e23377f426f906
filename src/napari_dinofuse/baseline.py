"""The anchor the fused UNet must beat: an ilastik-style random forest trained on the same strokes.

A classic filter bank (Gaussian, Laplacian of Gaussian, gradient magnitude, Hessian eigenvalues at 0.7-5
voxels) of the raw alone, or of raw + context (the context's filters resampled onto the raw grid in world
coordinates), and a 100-tree random forest fitted on the painted voxels. Used by the demo and
``benchmarks/bench_quality.py``; needs scikit-learn (the ``benchmark`` extra), not a dependency of the plugin.
Holds the whole filter bank in memory: for the synthetic sample, not for large volumes.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from .geometry import resample

SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0)  # ilastik's default scales, in voxels


def _axis_sigmas(sigma: float, shape) -> tuple[float, ...]:
    # A thin axis (the context has ~6 z slices) cannot hold a wide kernel: beyond about a third of its
    # length the reflected borders dominate and every slice gets the same blurred value. Capping the sigma
    # there keeps the filter meaningful along that axis; thick axes are left at the requested scale.
    return tuple(min(sigma, max((n - 1) / 3, 0.3)) for n in shape)


def filter_bank(image: np.ndarray, sigmas=SIGMAS) -> np.ndarray:
    """(F, Z, Y, X) float32 features of a 3D image: per sigma, Gaussian smoothing, Laplacian of Gaussian,
    Gaussian gradient magnitude and the three sorted eigenvalues of the Hessian of Gaussian."""
    image = np.asarray(image, np.float32)
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    features = []
    for sigma in sigmas:
        s = _axis_sigmas(sigma, image.shape)
        features.append(ndimage.gaussian_filter(image, s))
        features.append(ndimage.gaussian_laplace(image, s))
        features.append(ndimage.gaussian_gradient_magnitude(image, s))
        hessian = np.empty(image.shape + (3, 3), np.float32)
        for i in range(3):
            for j in range(i, 3):
                order = [0, 0, 0]
                order[i] += 1
                order[j] += 1
                hessian[..., i, j] = hessian[..., j, i] = ndimage.gaussian_filter(image, s, order=order)
        features.extend(np.moveaxis(np.linalg.eigvalsh(hessian), -1, 0))  # ascending
        del hessian
    return np.stack(features).astype(np.float32, copy=False)


def context_on_raw(sample) -> np.ndarray:
    """Filter bank of the context volume, linearly resampled onto the raw grid (world coordinates)."""
    features = filter_bank(sample.context.data)
    return np.asarray(resample(features, sample.context.grid, sample.raw.grid), np.float32)


def forest_predict(features: np.ndarray, scribbles: np.ndarray, seed: int = 0,
                   n_estimators: int = 100) -> tuple[np.ndarray, float]:
    """Fit on the scribbled voxels, predict every voxel: (uint8 labels shaped like scribbles, seconds)."""
    table = features.reshape(features.shape[0], -1).T  # (voxels, F), a view
    painted = scribbles.ravel() > 0
    from sklearn.ensemble import RandomForestClassifier

    start = time.perf_counter()
    forest = RandomForestClassifier(n_estimators=n_estimators, n_jobs=-1, random_state=seed)
    forest.fit(table[painted], scribbles.ravel()[painted])
    labels = forest.predict(table).astype(np.uint8).reshape(scribbles.shape)
    return labels, time.perf_counter() - start


def forest_rows(sample, scribbles: np.ndarray, seed: int = 0) -> dict[str, dict]:
    """Both baselines: {name: {"labels": uint8 array on the raw grid, "seconds": filters + fit + predict time}}."""
    start = time.perf_counter()
    raw = filter_bank(sample.raw.data)
    raw_seconds = time.perf_counter() - start
    labels, seconds = forest_predict(raw, scribbles, seed=seed)
    rows = {"random forest, raw filters": {"labels": labels, "seconds": raw_seconds + seconds}}
    start = time.perf_counter()
    both = np.concatenate([raw, context_on_raw(sample)])
    context_seconds = time.perf_counter() - start
    labels, seconds = forest_predict(both, scribbles, seed=seed)
    rows["random forest, raw + context filters"] = {"labels": labels,
                                                    "seconds": raw_seconds + context_seconds + seconds}
    return rows
