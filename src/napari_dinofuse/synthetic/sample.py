"""A procedural volume-EM sample: one analytic world (nm) rendered as a 4 nm raw field and a 64 nm context.

Why it exists: dinofuse fuses a high-resolution raw crop with a 16x wider, coarser context. To show (and
test) that the context matters, some classes must be impossible to tell apart from the raw alone. Here dark
granules inside the nucleus and mitochondria in the cytoplasm come from the *same* generator (size,
darkness, cristae-like stripes), and nucleoplasm and cytoplasm share grey level, texture, clutter (ER-like
sheets and tubules, vesicles) and noise. Far from the nuclear envelope a raw crop therefore cannot say which of the two
it shows; the context, which shows the whole nucleus outline, can. The raw field always straddles the
envelope, so both classes are in it.

Both images are drawn from one geometry. Every primitive (membrane sheet, filled ellipsoid, stripe train,
texture wave) is pre-filtered analytically with the sampling box of the grid it is drawn on (a Gaussian of
the box's variance h^2/12, integral kept), so a sample is the mean of the world over its voxel rather than a
point sample. The context is drawn that way on a 2x finer grid and block-averaged: a thin membrane fades to
its true mean darkness at 64 nm instead of aliasing away, and block-averaging the raw reproduces the context.

Pure numpy/scipy (no torch, no Qt): cheap to import from napari's sample-data menu.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
from scipy import ndimage, special
from scipy.spatial import cKDTree

from ..errors import GeometryError
from ..geometry import Grid, Volume

__all__ = ["CLASS_NAMES", "CONTEXT_DEPENDENT_CLASSES", "SyntheticSample", "make_sample"]

# Index = label value. 0 is "not painted" in scribbles; the ground truth never uses it.
CLASS_NAMES = ("unlabelled", "background", "membrane", "mitochondrion", "nuclear granule")
BACKGROUND, MEMBRANE, MITOCHONDRION, NUCLEAR_GRANULE = 1, 2, 3, 4
# Locally identical, told apart only by where they are (cytoplasm vs nucleus).
CONTEXT_DEPENDENT_CLASSES = (MITOCHONDRION, NUCLEAR_GRANULE)

# ---- appearance (grey levels of the noise-free image; "darkness" is subtracted from the base) ----
_BASE = 172.0  # cytoplasm == nucleoplasm: only position tells them apart
_MEMBRANE_SIGMA = 2.5  # nm; a unit membrane ~6 nm thick
_MEMBRANE_DARK = 150.0
_PM_HALF_GAP = 9.0  # two plasma membranes face each other across a ~18 nm cleft
_NE_HALF_GAP = 12.0  # nuclear envelope: outer and inner membrane ~24 nm apart
_HETEROCHROMATIN = 30.0, (60.0, 110.0), 12.0  # darkness, width range (nm), edge softness: lines the envelope
_EDGE_SIGMA = 1.0  # nm; intrinsic sharpness of filled objects
_TEXTURE_STD = 6.0  # cytoplasmic grain, same field in nucleus and cytoplasm
_RAW_GAIN, _RAW_BLUR = 3.0, 0.7  # Poisson gain (grey per count), in-plane blur (px): ~10 grey noise after blur
_CONTEXT_GAIN = 0.1  # a 64 nm pixel collects many more electrons: ~4 grey noise
_CONTEXT_SUPERSAMPLE = 2  # context drawn on a 2x finer grid (plus the analytic pre-filter), then averaged

# ---- sizes (nm) and densities (per um^3); smaller and denser than real cells so 1 um shows a lot ----
_BLOB_LONG, _BLOB_SHORT = (100.0, 200.0), (55.0, 85.0)  # mitochondria and granules alike
_CRISTA_PERIOD = (26.0, 38.0)
_ER_LONG, _ER_RADIUS = (80.0, 220.0), (10.0, 16.0)  # tubules
_SHEET_SIZE, _SHEET_HALF_THICKNESS = ((120.0, 300.0), (70.0, 150.0)), (9.0, 14.0)  # ER cisternae
_VESICLE_RADIUS = (15.0, 32.0)
_DENSITY = {"blob": 14.0, "sheet": 55.0, "tubule": 25.0, "vesicle": 220.0}
_MAX_SEMI = {"blob": _BLOB_LONG[1], "sheet": _SHEET_SIZE[0][1], "tubule": _ER_LONG[1], "vesicle": _VESICLE_RADIUS[1]}
_MIN_RAW_WIDTH = 512.0  # nm in y and x: room for an organelle on each side of the envelope (+ heterochromatin)
_GAP = 20.0  # min clearance between objects and from membranes they must not cross
_CELL_SPACING = 5500.0  # min distance between cell centres (neighbour cells, seen in the context)


@dataclass(frozen=True)
class SyntheticSample:
    """Raw field, its 16x wider context and the raw field's ground truth, all from one world."""

    raw: Volume
    context: Volume
    ground_truth: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES

    def scribbles(self, fraction: float = 0.002, seed: int = 0) -> np.ndarray:
        """Sparse labels as a user paints them: short brush strokes in a few xy planes, inside each class.

        Returns uint8 on the raw grid (0 = unpainted, k = class k). Every class present in the ground truth
        gets strokes totalling about ``fraction`` of all voxels split between classes (at least 300 voxels
        each where the class is that large); a stroke never leaves its class, so no voxel is mislabelled.
        """
        rng = np.random.default_rng(seed)
        gt = self.ground_truth
        out = np.zeros(gt.shape, np.uint8)
        classes = [k for k in range(1, len(self.class_names)) if np.any(gt == k)]
        if not classes:
            return out
        budget = max(round(fraction * gt.size / len(classes)), 300)
        for k in classes:
            mask = gt == k
            area = mask.reshape(mask.shape[0], -1).sum(1)
            planes = np.flatnonzero(area > 0)
            # A user paints a handful of sections, preferring ones where the class is large.
            n_planes = min(3, planes.size)
            planes = rng.choice(planes, n_planes, replace=False, p=area[planes] / area[planes].sum())
            painted, eroded_cache = 0, {}
            for attempt in range(12 * n_planes):
                if painted >= budget:
                    break
                z = int(planes[attempt % n_planes])
                for radius in (2, 1):  # thinner brush where the class is thin (membranes)
                    key = (z, radius)
                    if key not in eroded_cache:
                        eroded_cache[key] = ndimage.binary_erosion(mask[z], _disk(radius))
                    if eroded_cache[key].any():
                        break
                else:
                    continue
                eroded = eroded_cache[key]
                width = 2 * radius + 1
                length = int(min(rng.integers(25, 70), (budget - painted) / width + 8))
                path = _brush_path(eroded, length, rng)
                stroke = ndimage.binary_dilation(path, _disk(radius)) & mask[z] & (out[z] == 0)
                out[z][stroke] = k
                painted += int(stroke.sum())
        return out

    def corrections(self, prediction: np.ndarray, fraction: float = 0.002, seed: int = 0) -> np.ndarray:
        """Strokes a user paints to correct ``prediction`` (labels on the raw grid): :meth:`scribbles` painted
        only where it is wrong, each in the true class there (a class the prediction gets right gets none)."""
        wrong = np.where(prediction != self.ground_truth, self.ground_truth, 0).astype(self.ground_truth.dtype)
        return replace(self, ground_truth=wrong).scribbles(fraction, seed)


def make_sample(seed: int = 0, raw_shape=(32, 256, 256), context_shape=None, raw_voxel_nm: float = 4.0,
                context_voxel_nm: float = 64.0) -> SyntheticSample:
    """Render the world of ``seed``: raw (``raw_voxel_nm``), context (``context_voxel_nm``) and ground truth.

    Both grids are centred on the same world point; the context is 16x wider than the raw in y and x by
    default and covers it in z with two context voxels to spare on each side. Offsets follow napari
    (voxel centres at offset + i * voxel size), so the two volumes overlay with their scale/translate.
    """
    raw_shape = (int(raw_shape),) * 3 if np.ndim(raw_shape) == 0 else tuple(int(n) for n in raw_shape)
    if len(raw_shape) != 3 or min(raw_shape) < 1:
        raise GeometryError(f"raw_shape needs 3 positive sizes (z, y, x), got {raw_shape}")
    rvs, cvs = float(raw_voxel_nm), float(context_voxel_nm)
    if not (rvs > 0 and cvs > 0):
        raise GeometryError(f"voxel sizes must be positive, got raw {rvs} nm and context {cvs} nm")
    raw_extent = np.array(raw_shape) * rvs
    if raw_extent[1:].min() < _MIN_RAW_WIDTH - 1e-6:
        raise GeometryError(f"the raw field is {raw_extent[1]:g} x {raw_extent[2]:g} nm in y, x: it must be at least "
                            f"{_MIN_RAW_WIDTH:g} nm wide (e.g. {int(np.ceil(_MIN_RAW_WIDTH / rvs))} px at {rvs:g} nm) "
                            "to straddle the nuclear envelope with an organelle on each side")
    if context_shape is None:
        context_shape = _default_context_shape(raw_extent, cvs)
    context_shape = tuple(int(n) for n in context_shape)
    ctx_grid = Grid(context_shape, cvs, (cvs / 2,) * 3)  # context's low corner at the world origin
    centre = np.array(context_shape) * cvs / 2
    raw_grid = Grid(raw_shape, rvs, tuple(centre - raw_extent / 2 + rvs / 2))
    if not ctx_grid.covers(raw_grid):
        raise GeometryError(f"context_shape {context_shape} at {cvs:g} nm does not cover the raw field "
                            f"({raw_grid.describe()}); leave context_shape=None for a 16x wider context")

    rng = np.random.default_rng(seed)
    world = _build_world(rng, raw_grid, ctx_grid)
    raw_clean, gt = _render(world, raw_grid, labels=True)
    ctx_clean = _render_context(world, ctx_grid)
    raw = _acquire(raw_clean, rng, _RAW_GAIN, _RAW_BLUR)
    ctx = _acquire(ctx_clean, rng, _CONTEXT_GAIN, 0.0)
    return SyntheticSample(
        raw=Volume(raw, raw_grid.voxel_size, raw_grid.offset, name="raw"),
        context=Volume(ctx, ctx_grid.voxel_size, ctx_grid.offset, name="context"),
        ground_truth=gt,
        class_names=CLASS_NAMES,
    )


def _default_context_shape(raw_extent: np.ndarray, cvs: float) -> tuple[int, int, int]:
    shape = []
    for axis, extent in enumerate(raw_extent):
        cover = extent / cvs if axis == 0 else 16 * extent / cvs
        n = int(np.ceil(cover - 1e-9)) + (4 if axis == 0 else 0)  # z: 2 spare context voxels each side
        # Same parity as the raw extent in context voxels: raw blocks then line up with context voxels.
        if abs(cover - round(cover)) < 1e-6 and (n - round(cover)) % 2:
            n += 1
        shape.append(max(n, 1))
    return tuple(shape)


# ============================================================ the world

def _build_world(rng: np.random.Generator, raw: Grid, ctx: Grid) -> SimpleNamespace:
    """Cells (Voronoi in xy), one nucleus per cell, and non-overlapping ellipsoidal objects."""
    raw_lo, raw_hi = raw.bounds
    ctx_lo, ctx_hi = ctx.bounds
    centre = (raw_lo + raw_hi) / 2
    half = (raw_hi - raw_lo)[1:].min() / 2  # raw half-width in the xy plane

    # Main nucleus: bigger than the raw field, its envelope passing near the raw centre so the raw
    # field is split between nucleus and cytoplasm (delta = how far the raw centre lies outside).
    r0 = max(rng.uniform(1900.0, 2500.0), 2.2 * half)
    harm = _harmonics(rng)
    phi = rng.uniform(0, 2 * np.pi)
    u = np.array([np.sin(phi), np.cos(phi)])  # (y, x) unit vector from nucleus centre to raw centre
    delta = rng.uniform(-0.2, 0.2) * half
    r_phi = r0 * (1 + np.real(np.sum(harm * np.exp(1j * np.arange(2, 2 + harm.size) * phi))))
    main_yx = centre[1:] - (r_phi + delta) * u
    r_main = r0 * (1 + np.abs(harm).sum())

    # Neighbour cells: far enough from the main nucleus that the raw field is all in the main cell.
    keep_out = 2 * (r_main + abs(delta) + half * np.sqrt(2) + 600.0)
    spacing = max(_CELL_SPACING, 2.2 * r0)
    lo, hi = ctx_lo[1:] - 5000.0, ctx_hi[1:] + 5000.0
    seeds = [main_yx]
    for cand in rng.uniform(lo, hi, size=(4000, 2)):
        dist = np.linalg.norm(np.asarray(seeds) - cand, axis=1)
        if dist[0] >= keep_out and dist[1:].min(initial=np.inf) >= spacing:
            seeds.append(cand)
    seeds = np.asarray(seeds)
    k = len(seeds)

    sep = np.linalg.norm(seeds[:, None] - seeds[None], axis=-1)
    np.fill_diagonal(sep, np.inf)
    nuc_r, nuc_h = np.empty(k), np.empty((k, harm.size), complex)
    nuc_r[0], nuc_h[0] = r0, harm
    for i in range(1, k):
        nuc_h[i] = _harmonics(rng)
        room = (sep[i].min() / 2 - 500.0) / (1 + np.abs(nuc_h[i]).sum())  # nucleus stays inside its cell
        nuc_r[i] = max(min(rng.uniform(1400.0, 2400.0), room), 400.0)
    nuc_z = centre[0] + rng.uniform(-300.0, 300.0, k)
    nuc_z[0] = centre[0] + rng.uniform(-60.0, 60.0)
    nuc_c = nuc_r * rng.uniform(0.7, 0.95, k)  # semi-axis along z (nuclei are flattened)
    het_w = rng.uniform(*_HETEROCHROMATIN[1], k)
    het_w[0] = min(het_w[0], 0.2 * half)  # leaves room for a granule in small raw fields

    world = SimpleNamespace(centre=centre, seeds=seeds, seed_tree=cKDTree(seeds), sep=sep, nuc_z=nuc_z,
                            nuc_r=nuc_r, nuc_c=nuc_c, nuc_h=nuc_h, het_w=het_w)
    world.waves = _texture_waves(rng)

    # Objects fill the context slab, plus a margin of their own size so nothing is cut at its faces.
    anchors = _anchor_blobs(rng, world, raw, u, delta, half)
    parts = [anchors]
    for kind, density in _DENSITY.items():
        margin = np.array([_MAX_SEMI[kind] + 10.0, 250.0, 250.0])
        dom_lo, dom_hi = ctx_lo - margin, ctx_hi + margin
        n = rng.poisson(density * np.prod(dom_hi - dom_lo) / 1e9 * 1.3)  # RSA rejects some: ask for more
        parts.append(_random_objects(rng, kind, rng.uniform(dom_lo, dom_hi, size=(n, 3))))
    objs = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    ok = _clear_of_membranes(world, objs)
    ok[: len(anchors["centre"])] = True  # already checked when placed
    blob = objs["kind"] == 0
    ok[blob] = _no_overlap({key: v[blob] for key, v in objs.items()}, priority_ok=ok[blob])
    # ER and vesicles (all background) may touch each other, but not a blob: its label must stay clean.
    kept_blobs = {key: v[blob & ok] for key, v in objs.items()}
    clutter = np.flatnonzero(~blob & ok)
    ok[clutter] = ~_touches(kept_blobs, {key: v[clutter] for key, v in objs.items()})
    objs = {key: v[ok] for key, v in objs.items()}
    # Same generator for both: the label only says where the blob is.
    inside = _nucleus_distance(world, objs["centre"]) < 0
    blob = objs["kind"] == 0
    objs["label"] = np.where(blob, np.where(inside, NUCLEAR_GRANULE, MITOCHONDRION), BACKGROUND).astype(np.uint8)
    world.objects = objs
    return world


def _harmonics(rng):
    """Low-order shape modes of a nucleus outline: eps_k * exp(-i phase_k) for k = 2, 3, 4."""
    eps = np.array([rng.uniform(0.04, 0.12), rng.uniform(0.0, 0.04), rng.uniform(0.0, 0.025)])
    return eps * np.exp(-1j * rng.uniform(0, 2 * np.pi, 3))


def _texture_waves(rng, n: int = 24):
    """Random plane waves (20-300 nm): a grain shared by nucleoplasm and cytoplasm."""
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = np.exp(rng.uniform(np.log(20.0), np.log(300.0), n))
    return SimpleNamespace(k=2 * np.pi * direction / wavelength[:, None], phase=rng.uniform(0, 2 * np.pi, n),
                           amp=np.full(n, _TEXTURE_STD * np.sqrt(2.0 / n)))


def _random_rotations(rng, n: int, flat: float = 0.5) -> np.ndarray:
    """Rows = principal axes (long axis first). Long axes lean into the xy plane, as cut sections show."""
    a = rng.normal(size=(n, 3)) * np.array([flat, 1.0, 1.0])
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.cross(a, rng.normal(size=(n, 3)))
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return np.stack([a, b, np.cross(a, b)], axis=1)


def _random_objects(rng, kind: str, centre: np.ndarray) -> dict:
    n = len(centre)
    rot = _random_rotations(rng, n)
    z = np.zeros(n)
    if kind == "blob":  # mitochondrion or nuclear granule: dark matrix, outer membrane, crista stripes
        b = rng.uniform(*_BLOB_SHORT, n)
        semi = np.stack([rng.uniform(*_BLOB_LONG, n), b, b * rng.uniform(0.75, 1.0, n)], 1)
        semi[:, 0] = np.maximum(semi[:, 0], semi[:, 1])
        tilt = rng.normal(scale=0.15, size=(n, 2))  # cristae not quite perpendicular to the long axis
        normal = rot[:, 0] + tilt[:, :1] * rot[:, 1] + tilt[:, 1:] * rot[:, 2]
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        return {"kind": z.astype(np.int8), "centre": centre, "rot": rot, "semi": semi,
                "shell_amp": np.full(n, 85.0), "shell_sigma": np.full(n, 3.5), "shell_off": np.full(n, -5.0),
                "core_amp": np.full(n, 58.0), "stripe_amp": np.full(n, 70.0), "stripe_sigma": np.full(n, 3.0),
                "stripe_period": rng.uniform(*_CRISTA_PERIOD, n), "stripe_phase": rng.uniform(0, 40.0, n),
                "stripe_normal": normal}
    if kind == "sheet":  # ER cisterna standing across the section: a long double line in every slice
        normal = rng.normal(size=(n, 3)) * np.array([0.25, 1.0, 1.0])  # thin axis mostly in xy
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        a0 = np.cross(normal, [1.0, 0.0, 0.0])
        a0 /= np.linalg.norm(a0, axis=1, keepdims=True)
        a1 = np.cross(normal, a0)
        tilt = rng.normal(scale=0.3, size=(n, 1))
        a0, a1 = np.cos(tilt) * a0 + np.sin(tilt) * a1, np.cos(tilt) * a1 - np.sin(tilt) * a0
        rot = np.stack([a0, a1, normal], axis=1)
        semi = np.stack([rng.uniform(*_SHEET_SIZE[0], n), rng.uniform(*_SHEET_SIZE[1], n),
                         rng.uniform(*_SHEET_HALF_THICKNESS, n)], 1)
        semi[:, 0] = np.maximum(semi[:, 0], semi[:, 1])
        core, kind_id = rng.uniform(0.0, 20.0, n), 3
    elif kind == "tubule":  # ER tubule: two dark lines when cut lengthwise, a small ring across
        r = rng.uniform(*_ER_RADIUS, n)
        semi = np.stack([rng.uniform(*_ER_LONG, n), r, r], 1)
        core, kind_id = rng.uniform(0.0, 25.0, n), 1
    else:  # vesicles: small rings, some with a dense core
        r = rng.uniform(*_VESICLE_RADIUS, n)
        semi = np.stack([r, r, r], 1)
        core = np.where(rng.random(n) < 0.2, 55.0, rng.uniform(0.0, 15.0, n))
        kind_id = 2
    return {"kind": np.full(n, kind_id, np.int8), "centre": centre, "rot": rot, "semi": semi,
            "shell_amp": np.full(n, 130.0), "shell_sigma": np.full(n, _MEMBRANE_SIGMA), "shell_off": z.copy(),
            "core_amp": core, "stripe_amp": z.copy(), "stripe_sigma": np.full(n, 3.0),
            "stripe_period": np.full(n, 30.0), "stripe_phase": z.copy(), "stripe_normal": rot[:, 0].copy()}


def _anchor_blobs(rng, world, raw: Grid, u, delta, half) -> dict:
    """One blob on each side of the envelope inside the raw field: both context classes always in the raw."""
    raw_lo, raw_hi = raw.bounds
    centre = world.centre
    v = np.array([u[1], -u[0]])
    edge_yx = centre[1:] - delta * u  # where the envelope crosses the line through the raw centre
    placed = []
    for side in (+1.0, -1.0):  # +1 cytoplasm (mitochondrion), -1 nucleus (granule)
        for attempt in range(200):
            obj = _random_objects(rng, "blob", np.zeros((1, 3)))
            scale = min(1.0, 0.4 * half / obj["semi"][0, 0]) * 0.97 ** (attempt // 10)  # fits tiny raw fields
            obj["semi"] = obj["semi"] * scale
            u3 = np.array([0.0, *u])
            extent = np.sqrt(np.sum((obj["semi"][0] * (obj["rot"][0] @ u3)) ** 2))  # half-extent along u
            clear = _GAP + 20.0 + (_het_reach(world, 0) if side < 0 else 0.0)
            yx = edge_yx + side * (extent + clear + rng.uniform(0, 0.1) * half) * u
            yx += rng.uniform(-0.3, 0.3) * half * v
            z = centre[0] + rng.uniform(-0.15, 0.15) * (raw_hi[0] - raw_lo[0])
            obj["centre"] = np.array([[z, *yx]])
            inside_raw = np.all(np.abs(yx - centre[1:]) < 0.85 * half)
            if inside_raw and _clear_of_membranes(world, obj, side=side)[0]:
                placed.append(obj)
                break
        else:  # pragma: no cover - geometry above always leaves room
            raise RuntimeError("could not place an organelle on both sides of the nuclear envelope")
    return {key: np.concatenate([p[key] for p in placed]) for key in placed[0]}


def _capsules(objs):
    """Each object's long axis as a segment (ends) and the radius (2nd semi-axis) enclosing its ellipsoid."""
    axis = objs["rot"][:, 0] * (objs["semi"][:, 0] - objs["semi"][:, 1])[:, None]
    return objs["centre"] - axis, objs["centre"] + axis, objs["semi"][:, 1]


def _probes(objs):
    """Balls (owner, centre, radius) whose union covers each object. Used to keep objects off membranes
    and clutter off blobs.

    Capsule-like objects: points spaced <= 2b along the axis segment, ends included (their balls cover the
    caps), radius sqrt(b^2 + (step/2)^2). Sheets: a grid of 70 nm cells on the mid-plane, kept where a cell
    meets the ellipse, each ball enclosing its cell's slab of the sheet.
    """
    a, b, c = objs["semi"].T
    sheet = objs["kind"] == 3
    # Capsule-like objects.
    idx = np.flatnonzero(~sheet)
    length = a[idx] - b[idx]
    n = np.maximum(np.ceil(length / b[idx]), 1).astype(np.int64)  # segments of 2*length/n <= 2b
    own_c = np.repeat(idx, n + 1)
    i = np.arange(own_c.size) - np.repeat(np.cumsum(n + 1) - (n + 1), n + 1)
    step = np.repeat(2 * length / n, n + 1)
    x_c = -np.repeat(length, n + 1) + i * step
    y_c = np.zeros_like(x_c)
    r_c = np.hypot(b[own_c], step / 2)
    # Sheets.
    idx = np.flatnonzero(sheet)
    n0 = np.ceil(2 * a[idx] / 70.0).astype(np.int64)
    n1 = np.ceil(2 * b[idx] / 70.0).astype(np.int64)
    own_s = np.repeat(idx, n0 * n1)
    k = np.arange(own_s.size) - np.repeat(np.cumsum(n0 * n1) - n0 * n1, n0 * n1)
    n1_rep = np.repeat(n1, n0 * n1)
    s0, s1 = np.repeat(2 * a[idx] / n0, n0 * n1), np.repeat(2 * b[idx] / n1, n0 * n1)
    x_s = -a[own_s] + (k // n1_rep + 0.5) * s0
    y_s = -b[own_s] + (k % n1_rep + 0.5) * s1
    r_s = np.sqrt(c[own_s] ** 2 + (s0**2 + s1**2) / 4)
    gx = np.clip(np.abs(x_s) - s0 / 2, 0, None) / a[own_s]
    gy = np.clip(np.abs(y_s) - s1 / 2, 0, None) / b[own_s]
    meets = gx**2 + gy**2 <= 1
    owner = np.concatenate([own_c, own_s[meets]])
    x, y = np.concatenate([x_c, x_s[meets]]), np.concatenate([y_c, y_s[meets]])
    radius = np.concatenate([r_c, r_s[meets]])
    centre = objs["centre"][owner] + x[:, None] * objs["rot"][owner, 0] + y[:, None] * objs["rot"][owner, 1]
    return owner, centre, radius


def _clear_of_membranes(world, objs, side=None) -> np.ndarray:
    """True where an object stays on one side of every envelope and inside its cell, with a gap."""
    # Most objects are far from any membrane: decide those from their centre, check the rest probe by probe.
    reach = objs["semi"][:, 0] + _GAP + 10.0
    d_nuc = _nucleus_distance(world, objs["centre"])
    _, d_pm = _cells(world, objs["centre"][:, 1], objs["centre"][:, 2])
    far = (np.abs(d_nuc) > 1.2 * reach + 50.0 + _het_reach(world, None).max()) & (d_pm > 1.2 * reach + 50.0)
    ok = far.copy()
    if side is not None:
        ok &= side * d_nuc > 0
    near = np.flatnonzero(~far)
    if near.size == 0:
        return ok
    owner, pts, radius = _probes({key: v[near] for key, v in objs.items()})
    need = radius + _GAP + 10.0  # + sagitta of a 400 nm chord on a ~2 um envelope
    d = _nucleus_distance(world, pts)
    cell, dm = _cells(world, pts[:, 1], pts[:, 2])
    inside, outside = d < -(need + _het_reach(world, cell)), d > need  # inside: clear of heterochromatin
    good = (inside | outside) & (dm > need)
    if side is not None:
        good &= outside if side > 0 else inside
    m = near.size
    # One side of the envelope and one cell for the whole object, not just for each probe.
    bad = np.bincount(owner, ~good, minlength=m) > 0
    bad |= np.bincount(owner, inside, minlength=m) * np.bincount(owner, outside, minlength=m) > 0
    first_cell = np.zeros(m, np.int64)
    first_cell[owner] = cell
    bad |= np.bincount(owner, cell != first_cell[owner], minlength=m) > 0
    ok[near] = ~bad
    return ok


def _no_overlap(objs, priority_ok: np.ndarray) -> np.ndarray:
    """Random sequential adsorption in list order: keep an object unless it touches one already kept."""
    p0, p1, radius = _capsules(objs)
    n = len(radius)
    if n == 0:
        return np.zeros(0, bool)
    bound = objs["semi"][:, 0]
    pairs = cKDTree(objs["centre"]).query_pairs(2 * bound.max() + _GAP, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    hit = _segment_distance(p0[i], p1[i], p0[j], p1[j]) < radius[i] + radius[j] + _GAP
    first, second = np.minimum(i[hit], j[hit]), np.maximum(i[hit], j[hit])  # earlier objects have priority
    # Sequential greedy (keep unless an earlier neighbour is kept), decided in parallel rounds: an object
    # is settled once an earlier neighbour is kept, or once all its earlier neighbours are rejected.
    state = np.where(priority_ok, 0, -1)  # 0 undecided, 1 kept, -1 rejected
    while np.any(state == 0):
        kept_before = np.bincount(second, state[first] == 1, minlength=n) > 0
        open_before = np.bincount(second, state[first] == 0, minlength=n) > 0
        undecided = state == 0
        state[undecided & kept_before] = -1
        state[undecided & ~kept_before & ~open_before] = 1
    return state == 1


def _touches(blobs, others) -> np.ndarray:
    """Per object of ``others``: does any of its probe balls come within the gap of a blob's capsule?"""
    n = len(others["centre"])
    if n == 0 or len(blobs["centre"]) == 0:
        return np.zeros(n, bool)
    owner, pts, radius = _probes(others)
    p0, p1, r_blob = _capsules(blobs)
    reach = blobs["semi"][:, 0].max() + radius.max() + _GAP
    sm = cKDTree(pts).sparse_distance_matrix(cKDTree(blobs["centre"]), reach, output_type="ndarray")
    i, j = sm["i"], sm["j"]
    hit = _segment_distance(pts[i], pts[i], p0[j], p1[j]) < radius[i] + r_blob[j] + _GAP
    return np.bincount(owner[i[hit]], minlength=n) > 0


def _segment_distance(p0, p1, q0, q1) -> np.ndarray:
    """Closest distance between segments p0-p1 and q0-q1 (rows; Ericson's clamped solution)."""
    d1, d2, r = p1 - p0, q1 - q0, p0 - q0
    a, e = np.einsum("ij,ij->i", d1, d1), np.einsum("ij,ij->i", d2, d2)
    b, c, f = np.einsum("ij,ij->i", d1, d2), np.einsum("ij,ij->i", d1, r), np.einsum("ij,ij->i", d2, r)
    a_, e_ = np.maximum(a, 1e-12), np.maximum(e, 1e-12)
    denom = a * e - b * b
    s = np.where(denom > 1e-9, np.clip((b * f - c * e) / np.maximum(denom, 1e-12), 0, 1), 0.0)
    t = (b * s + f) / e_
    s = np.where(t < 0, np.clip(-c / a_, 0, 1), np.where(t > 1, np.clip((b - c) / a_, 0, 1), s))
    t = np.clip(t, 0, 1)
    point_q = e <= 1e-12  # q is a point: the closest p is the projection of q
    s = np.where(point_q, np.clip(-c / a_, 0, 1), s)
    t = np.where(point_q, 0.0, t)
    s = np.where(a > 1e-12, s, 0.0)
    return np.linalg.norm(r + d1 * s[:, None] - d2 * t[:, None], axis=1)


# ============================================================ fields of the world

def _cells(world, py, px):
    """Owning cell (nearest seed) and distance to the cell boundary (Voronoi bisectors), per point.

    Only the 8 nearest seeds are tried: a boundary closer than the seed spacing always belongs to one.
    """
    py, px = np.ravel(py), np.ravel(px)
    k = min(8, len(world.seeds))
    dist, idx = world.seed_tree.query(np.stack([py, px], -1), k=k)
    dist, idx = dist.reshape(len(py), k), idx.reshape(len(py), k)
    owner = idx[:, 0]
    if k == 1:
        return owner, np.full(len(py), np.inf)
    d2 = dist * dist
    # Distance to the bisector with seed j: (|p-sj|^2 - |p-s_own|^2) / (2 |sj - s_own|).
    bis = (d2[:, 1:] - d2[:, :1]) / (2 * world.sep[owner[:, None], idx[:, 1:]])
    return owner, bis.min(1)


def _nucleus_polar(world, owner, dy, dx):
    """Radius rho, outline radius R(theta) and the slope factor turning rho - R into a distance."""
    rho = np.hypot(dy, dx)
    e = (dx + 1j * dy) / np.maximum(rho, 1e-6)  # exp(i theta)
    h = world.nuc_h[owner]
    ek = e * e
    acc = np.zeros_like(e)
    dacc = np.zeros_like(e)
    for j in range(h.shape[-1]):
        acc += h[..., j] * ek
        dacc += 1j * (j + 2) * h[..., j] * ek
        ek = ek * e
    r0 = world.nuc_r[owner]
    outline = r0 * (1 + acc.real)
    slope = np.sqrt(1 + (r0 * dacc.real / outline) ** 2)
    return rho, outline, slope


def _nucleus_distance(world, pts):
    """Signed distance (nm, < 0 inside) to the envelope of the nucleus of each point's cell."""
    owner, _ = _cells(world, pts[:, 1], pts[:, 2])
    rho, outline, slope = _nucleus_polar(world, owner, pts[:, 1] - world.seeds[owner, 0],
                                         pts[:, 2] - world.seeds[owner, 1])
    return (rho - outline * _z_factor(world, owner, pts[:, 0])) / slope


def _het_reach(world, owner):
    """Depth below the envelope's midline that the heterochromatin band reaches (nm)."""
    w = world.het_w if owner is None else world.het_w[owner]
    return _NE_HALF_GAP + _MEMBRANE_SIGMA * 2 + w + 2 * _HETEROCHROMATIN[2]


def _z_factor(world, owner, z):
    """The outline shrinks away from the nucleus' equator (an ellipsoid along z)."""
    t = (z - world.nuc_z[owner]) / world.nuc_c[owner]
    return np.sqrt(np.clip(1 - t * t, 0.05, 1))


def _thin_layer(d, amp, sigma, var):
    """A thin dark sheet at d = 0, widened by the sampling box (variance var), its integral kept."""
    s2 = sigma * sigma + var
    return amp * sigma / np.sqrt(s2) * np.exp(-d * d / (2 * s2))


# ============================================================ rendering

def _render(world, grid: Grid, labels: bool = False, plane=None):
    """Noise-free image (float32) of the world on ``grid``, each sample pre-filtered by its voxel box.

    With ``labels`` also the ground truth at voxel centres.
    """
    zs, ys, xs = (grid.axis_centres(a) for a in range(3))
    h = grid.voxel_size[1]
    var = h * h / 12  # variance of a uniform box of width h
    if plane is None:
        plane = _plane_fields(world, ys, xs)
    owner, d_pm, rho, outline, slope = plane
    pm_dark = (_thin_layer(d_pm - _PM_HALF_GAP, _MEMBRANE_DARK, _MEMBRANE_SIGMA, var)
               + _thin_layer(d_pm + _PM_HALF_GAP, _MEMBRANE_DARK, _MEMBRANE_SIGMA, var)).astype(np.float32)
    img = np.empty(grid.shape, np.float32)
    gt = np.empty(grid.shape, np.uint8) if labels else None
    pm_band = d_pm <= _PM_HALF_GAP + 1.5 * _MEMBRANE_SIGMA
    het_dark, het_w, het_sigma = _HETEROCHROMATIN[0], world.het_w[owner], np.sqrt(_HETEROCHROMATIN[2] ** 2 + var)
    het_top = _NE_HALF_GAP + 2 * _MEMBRANE_SIGMA  # just under the inner membrane
    for iz, z in enumerate(zs):
        d = (rho - outline * _z_factor(world, owner, np.full(owner.shape, z))) / slope
        ne_dark = (_thin_layer(d - _NE_HALF_GAP, _MEMBRANE_DARK, _MEMBRANE_SIGMA, var)
                   + _thin_layer(d + _NE_HALF_GAP, _MEMBRANE_DARK, _MEMBRANE_SIGMA, var))
        depth = -d - het_top
        het = het_dark * (special.ndtr(depth / het_sigma) - special.ndtr((depth - het_w) / het_sigma))
        img[iz] = _BASE - pm_dark - ne_dark - het
        if labels:
            band = pm_band | (np.abs(d) <= _NE_HALF_GAP + 1.5 * _MEMBRANE_SIGMA)
            gt[iz] = np.where(band, MEMBRANE, BACKGROUND)
    _add_texture(img, world.waves, zs, ys, xs, var)
    _draw_objects(img, gt, world.objects, (zs, ys, xs), h, var)
    return (img, gt) if labels else img


def _plane_fields(world, ys, xs):
    py, px = np.meshgrid(ys, xs, indexing="ij")
    owner, d_pm = _cells(world, py.ravel(), px.ravel())
    rho, outline, slope = _nucleus_polar(world, owner, py.ravel() - world.seeds[owner, 0],
                                         px.ravel() - world.seeds[owner, 1])
    shape = py.shape
    return tuple(a.reshape(shape) for a in (owner, d_pm, rho, outline, slope))


def _render_context(world, ctx: Grid, max_samples: int = 1 << 23):
    """Context voxels = mean of the world over each voxel: finer pre-filtered samples, block-averaged.

    Done in slabs of context sections so memory stays bounded for any context size.
    """
    k = _CONTEXT_SUPERSAMPLE
    vs = np.asarray(ctx.voxel_size)
    fine_vs = vs / k
    fine_off = np.asarray(ctx.offset) - vs / 2 + fine_vs / 2
    nz, ny, nx = ctx.shape
    fine_y = fine_off[1] + np.arange(ny * k) * fine_vs[1]
    fine_x = fine_off[2] + np.arange(nx * k) * fine_vs[2]
    plane = _plane_fields(world, fine_y, fine_x)
    slab = max(1, max_samples // (k**3 * ny * nx))
    out = np.empty(ctx.shape, np.float32)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        fine = Grid(((z1 - z0) * k, ny * k, nx * k), tuple(fine_vs),
                    (fine_off[0] + z0 * k * fine_vs[0], fine_off[1], fine_off[2]))
        img = _render(world, fine, plane=plane)
        out[z0:z1] = img.reshape(z1 - z0, k, ny, k, nx, k).mean(axis=(1, 3, 5))
    return out


def _add_texture(img, waves, zs, ys, xs, var):
    """Sum of plane waves, each damped as a box of variance var damps it; separable in z."""
    damp = waves.amp * np.exp(-0.5 * var * np.sum(waves.k**2, 1))
    for kv, ph, a in zip(waves.k, waves.phase, damp):
        if a < 1e-3:
            continue
        b = ys[:, None] * kv[1] + xs[None, :] * kv[2]
        cb, sb = np.cos(b).astype(np.float32), np.sin(b).astype(np.float32)
        az = zs * kv[0] + ph
        img += (a * np.cos(az)).astype(np.float32)[:, None, None] * cb
        img -= (a * np.sin(az)).astype(np.float32)[:, None, None] * sb


def _draw_objects(img, gt, objs, axes, h, var, batch: int = 1 << 20):
    """Subtract every object's pre-filtered darkness (ellipsoid shell, filled core, stripes).

    All objects are evaluated together, voxel/object pair by pair over each object's bounding box, so the
    cost is in numpy, not in a Python loop over thousands of organelles.
    """
    shape = np.array(img.shape)
    origin = np.array([ax[0] for ax in axes])
    pad = 3 * np.sqrt(np.maximum(objs["shell_sigma"], objs["stripe_sigma"]) ** 2 + var) + np.abs(objs["shell_off"])
    extent = np.sqrt(((objs["rot"] * objs["semi"][:, :, None]) ** 2).sum(1)) + pad[:, None]
    lo = np.clip(np.ceil((objs["centre"] - extent - origin) / h), 0, shape).astype(np.int64)
    hi = np.clip(np.floor((objs["centre"] + extent - origin) / h) + 1, 0, shape).astype(np.int64)
    size = np.maximum(hi - lo, 0)
    count = size.prod(1)
    ids = np.flatnonzero(count > 0)
    if ids.size == 0:
        return
    flat_img = img.reshape(-1)
    flat_gt = gt.reshape(-1) if gt is not None else None
    ends = np.cumsum(count[ids])
    start = 0
    while start < ids.size:  # batches of about ``batch`` pairs bound the memory
        before = ends[start] - count[ids[start]]
        stop = max(int(np.searchsorted(ends, before + batch, side="right")), start + 1)
        sel = ids[start:stop]
        _draw_batch(flat_img, flat_gt, objs, sel, lo[sel], size[sel], axes, shape, pad, var)
        start = stop


def _draw_batch(flat_img, flat_gt, objs, sel, lo, size, axes, shape, pad, var):
    n = size.prod(1)
    obj = np.repeat(sel, n)
    local = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    syx = np.repeat(size[:, 1] * size[:, 2], n)
    sx = np.repeat(size[:, 2], n)
    iz = local // syx
    rem = local - iz * syx
    iy = rem // sx
    ix = rem - iy * sx
    iz += np.repeat(lo[:, 0], n)
    iy += np.repeat(lo[:, 1], n)
    ix += np.repeat(lo[:, 2], n)
    c = objs["centre"][obj]
    p = np.stack([axes[0][iz] - c[:, 0], axes[1][iy] - c[:, 1], axes[2][ix] - c[:, 2]], 1).astype(np.float32)
    rot = objs["rot"][obj].astype(np.float32)
    loc = np.einsum("nij,nj->ni", rot, p)
    semi = objs["semi"][obj].astype(np.float32)
    # Approximate signed distance to an ellipsoid (exact on the surface's normal direction to first order).
    k0 = np.linalg.norm(loc / semi, axis=1)
    k1 = np.maximum(np.linalg.norm(loc / (semi * semi), axis=1), 1e-9)
    d = k0 * (k0 - 1) / k1
    near = d < pad[obj]
    obj, d, p = obj[near], d[near], p[near]
    flat = (iz[near] * shape[1] + iy[near]) * shape[2] + ix[near]

    edge = np.sqrt(_EDGE_SIGMA**2 + var)
    dark = _thin_layer(d - objs["shell_off"][obj], objs["shell_amp"][obj], objs["shell_sigma"][obj], var)
    dark += objs["core_amp"][obj] * special.ndtr(-d / edge)
    striped = objs["stripe_amp"][obj] > 0
    if striped.any():
        o, ds, ps = obj[striped], d[striped], p[striped]
        # A Gaussian train (period P, width s) as a Fourier series, each harmonic damped by the box.
        period, sigma = objs["stripe_period"][o], objs["stripe_sigma"][o]
        theta = 2 * np.pi * (np.einsum("ij,ij->i", ps, objs["stripe_normal"][o]) - objs["stripe_phase"][o]) / period
        s2 = (sigma * sigma + var) * (2 * np.pi / period) ** 2
        c1 = np.cos(theta)
        c_prev, c_cur = np.ones_like(c1), c1
        series = np.ones_like(c1)
        for harmonic in range(1, 6):
            series += 2 * np.exp(-0.5 * s2 * harmonic**2) * c_cur
            c_prev, c_cur = c_cur, 2 * c1 * c_cur - c_prev
        train = sigma * np.sqrt(2 * np.pi) / period * series
        inner = special.ndtr(-(ds + 14.0) / edge)  # cristae start inside the inner membrane
        dark[striped] += objs["stripe_amp"][o] * train * inner
    flat_img -= np.bincount(flat, weights=dark, minlength=flat_img.size).astype(np.float32)
    if flat_gt is not None:
        inside = (d <= 0) & (objs["label"][obj] > BACKGROUND)
        flat_gt[flat[inside]] = objs["label"][obj[inside]]


def _acquire(clean, rng, gain, blur):
    """Shot noise (Poisson, ``gain`` grey levels per electron), optional in-plane blur, uint8."""
    counts = rng.poisson(np.clip(clean, 0, None) / gain).astype(np.float32) * gain
    if blur > 0:
        counts = ndimage.gaussian_filter(counts, (0, blur, blur))
    return np.clip(np.rint(counts), 0, 255).astype(np.uint8)


# ============================================================ scribble helpers

def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy * yy + xx * xx <= radius * radius + radius


def _brush_path(allowed: np.ndarray, length: int, rng) -> np.ndarray:
    """A wandering stroke centre line that stays inside ``allowed`` (a 2D mask)."""
    path = np.zeros_like(allowed)
    start = rng.choice(np.flatnonzero(allowed))
    pos = np.array(np.unravel_index(start, allowed.shape), float)
    heading = rng.uniform(0, 2 * np.pi)
    path[tuple(pos.astype(int))] = True
    turns = np.array([0.0, 0.4, -0.4, 0.8, -0.8, 1.2, -1.2, 1.6, -1.6])
    for _ in range(length):
        heading += rng.normal(scale=0.2)
        for turn in turns:
            nxt = pos + np.array([np.sin(heading + turn), np.cos(heading + turn)])
            idx = tuple(np.rint(nxt).astype(int))
            if 0 <= idx[0] < allowed.shape[0] and 0 <= idx[1] < allowed.shape[1] and allowed[idx]:
                pos, heading = nxt, heading + turn
                path[idx] = True
                break
        else:
            break
    return path
