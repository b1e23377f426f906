"""The offline end-to-end demo: synthetic sample -> features -> fine-tune on scribbles -> predict.

Trains the same small UNet twice, with context fusion (``attention``) and without (``none``), and reports
per-class IoU on the voxels nobody painted. Writes the prediction (OME-Zarr), the model folder and a PNG
figure. A driver: everything it does goes through the engine's public functions.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from . import defaults
from .atomic import atomic_write_bytes, atomic_write_text
from .errors import BackboneError
from .features.backbone import default_backbone_spec, load_backbone
from .features.cache import FeatureCache
from .features.extract import extract_sources
from .inference.outputs import ZarrSink
from .inference.predict import predict
from .modeling.checkpoint import save_model
from .progress import drive
from .synthetic.sample import CLASS_NAMES, CONTEXT_DEPENDENT_CLASSES, make_sample
from .training.finetune import NewModel, fine_tune
from .training.train import TrainConfig

FALLBACK_BACKBONE = "random:vits16"
DEMO_ITERATIONS = defaults.ITERATIONS  # two models and a forest in a few minutes on a 2-core CPU
# Colours per label value (0 unused): background grey, membrane yellow, mitochondrion cyan, granule magenta.
PALETTE = np.array([[0, 0, 0], [60, 60, 60], [255, 220, 0], [0, 200, 255], [255, 60, 180]], np.uint8)


def demo_backbone(spec: str | None, device: str, say: Callable[[str], None]):
    """The requested backbone; without one, DINOv3 from the local download cache, else a random stand-in."""
    if spec:
        return load_backbone(spec, device=device)
    try:
        return load_backbone(default_backbone_spec(), device=device, offline=True)
    except BackboneError:
        say(f"warning: DINOv3 weights ({default_backbone_spec()}) are not available offline; using "
            f"{FALLBACK_BACKBONE}: RANDOM features, NOT DINOv3 - the numbers below only show the pipeline works")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_backbone(FALLBACK_BACKBONE, device=device)


def iou_unpainted(prediction: np.ndarray, truth: np.ndarray, painted: np.ndarray, classes) -> dict[int, float]:
    """Per-class intersection over union, counted only where nobody painted."""
    keep = ~painted
    scores = {}
    for k in classes:
        p, t = (prediction == k) & keep, (truth == k) & keep
        union = np.count_nonzero(p | t)
        scores[k] = np.count_nonzero(p & t) / union if union else float("nan")
    return scores


def run_demo(out, backbone: str | None = None, device: str = "auto", iterations: int = DEMO_ITERATIONS,
             seed: int = 0, base_channels: int = defaults.BASE_CHANNELS, cache=None, raw_shape=(32, 256, 256), say: Callable[[str], None] = print,
             follow: Callable = lambda generator, label: drive(generator)) -> dict:
    config = TrainConfig(iterations=iterations, seed=seed, device=device)  # the one recipe; refuses bad values
    sample = make_sample(seed=seed, raw_shape=raw_shape)  # (refuses bad shapes) before the backbone loads
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bb = demo_backbone(backbone, device, say)
    say(bb.describe())
    say(f"sample: raw {sample.raw.shape} at {sample.raw.voxel_size[0]:g} nm, context {sample.context.shape} at "
        f"{sample.context.voxel_size[0]:g} nm ({len(CLASS_NAMES) - 1} classes)")
    source = follow(extract_sources(sample.raw, sample.context, bb, FeatureCache(cache)), "features")
    scribbles = sample.scribbles(seed=seed)
    painted = scribbles > 0
    say(f"scribbles: {np.count_nonzero(painted)} painted voxels ({100 * painted.mean():.2f}% of the raw)")
    classes = range(1, len(CLASS_NAMES))
    results = {}
    for fusion in ("attention", "none"):
        result = follow(fine_tune(source, scribbles, config, NewModel(fusion, base_channels,
                                                                        class_names=CLASS_NAMES[1:])),
                        f"train ({fusion})")
        say(f"{fusion}: {result.summary()}")
        model = result.model
        save_model(out / f"model-{fusion}", model, result.info, result.log)
        sink = follow(predict(model, source, device=device, sink=ZarrSink(out / f"prediction-{fusion}.zarr"),
                              class_names=result.info.class_names), f"predict ({fusion})")
        labels = _read(sink.path, "labels")
        results[fusion] = {"iou": iou_unpainted(labels, sample.ground_truth, painted, classes),
                           "labels": labels, "sink": sink}
    columns = {"attention": results["attention"]["iou"], "none": results["none"]["iou"]}
    try:
        from .baseline import forest_rows

        forests = forest_rows(sample, scribbles, seed=seed)
        columns["forest raw"] = iou_unpainted(forests["random forest, raw filters"]["labels"],
                                              sample.ground_truth, painted, classes)
        columns["forest raw+ctx"] = iou_unpainted(forests["random forest, raw + context filters"]["labels"],
                                                  sample.ground_truth, painted, classes)
    except ImportError:
        say("(pip install scikit-learn to compare with an ilastik-style random forest trained on the same strokes)")

    say("\nIoU on unpainted voxels   " + "".join(f"{name:>16}" for name in columns))
    for k in classes:
        mark = "  <- context-dependent" if k in CONTEXT_DEPENDENT_CLASSES else ""
        say(f"  {CLASS_NAMES[k]:<24}" + "".join(f"{c[k]:16.3f}" for c in columns.values()) + mark)
    figure = out / "demo.png"
    png = io.BytesIO()
    Image.fromarray(_figure(sample, results)).save(png, format="PNG")
    atomic_write_bytes(figure, [png.getbuffer()])
    say(f"\nwrote {out}/prediction-attention.zarr, prediction-none.zarr, model-attention/, model-none/ and "
        f"{figure.name} (top: raw, ground truth, prediction with context, without; bottom: attention levels 1-4)")
    summary = {name: {CLASS_NAMES[k]: v for k, v in c.items()} for name, c in columns.items()}
    atomic_write_text(out / "iou.json", json.dumps({"backbone": str(bb.spec), "iou_unpainted": summary}, indent=1))
    return summary


def _figure(sample, results) -> np.ndarray:
    z = sample.raw.shape[0] // 2
    raw = np.asarray(sample.raw.data[z])
    panels = [np.repeat(raw[..., None], 3, -1), PALETTE[sample.ground_truth[z]],
              PALETTE[results["attention"]["labels"][z]], PALETTE[results["none"]["labels"][z]]]
    path = results["attention"]["sink"].path
    for level in range(1, defaults.NUM_LEVELS + 1):
        att = _read(path, defaults.attention_array(level)).astype(np.float32)
        f = 2 ** (level - 1)
        plane = att[min(z // f, att.shape[0] - 1)].repeat(f, 0).repeat(f, 1)[: raw.shape[0], : raw.shape[1]]
        lo, hi = float(plane.min()), float(plane.max())
        panels.append(_heat((plane - lo) / (hi - lo + 1e-6)))
    gap = np.full((raw.shape[0], 4, 3), 255, np.uint8)
    rows = [np.concatenate(sum(([p, gap] for p in panels[i:i + 4]), [])[:-1], axis=1) for i in (0, 4)]
    return np.concatenate([rows[0], np.full((4, rows[0].shape[1], 3), 255, np.uint8), rows[1]], axis=0)


def _read(path: Path, name: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(Path(path) / name / "0"), mode="r")[:])


def _heat(x: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white ramp for attention maps."""
    x = np.clip(x, 0, 1)[..., None]
    return (255 * np.clip(np.concatenate([3 * x, 3 * x - 1, 3 * x - 2], -1), 0, 1)).astype(np.uint8)
