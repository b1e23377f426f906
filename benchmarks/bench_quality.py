"""Segmentation quality: the fused UNet (attention, concat, none) against a random forest on the same strokes.

    python benchmarks/bench_quality.py [--seeds 0 1] [--iterations N] [--backbone random:vits16] [--json out.json]
        [--replicate R] [--set weight_decay=0.01 ...] [--round2 100 50] [--rounds 3]

For each seed: the synthetic sample (4 nm raw field straddling a nuclear envelope, 64 nm context), its own
scribbles, DINOv3-shaped features (default ``random:vits16``: RANDOM weights, not DINOv3), then the UNet trained
with the one recipe (``TrainConfig()``: every stroke trains; held-out *painted* strokes only when a validation
share is set, never the scored voxels) in each fusion mode, and the ilastik-style forest on raw filters and on
raw + context filters. Prints per-class IoU on the unpainted voxels with training seconds, where the membrane's
IoU is lost (false membrane by distance to the true one, missed membrane), and the half-tile-shift label
agreement of the attention model. ``--replicate R`` trains with seed ``seed + 1000 R`` (same sample and strokes,
other initial weights and tiles): how much of a difference between settings is the recipe's own spread.
``--set`` changes a recipe field (``TrainConfig``) for an experiment. ``--round2 N ...`` goes on as a user does:
correction strokes where the attention model is wrong, then Fine-tune again, continuing it N iterations (each N)
and anew, scored against the forests on all strokes (:func:`second_round`); ``--rounds K`` goes on to round K,
each round correcting the last continued model's errors and continuing it (a second round judged alone understates
the loop: one that overshoots a class's edge is mended by the next). Needs scikit-learn
(``pip install -e .[benchmark]``). CPU, 1 thread: 2-6 min per UNet (100 steps at 1.1-3.6 s a step, by machine).
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
from scipy import ndimage

from napari_dinofuse.baseline import forest_rows
from napari_dinofuse.demo import iou_unpainted
from napari_dinofuse.features.backbone import load_backbone
from napari_dinofuse.features.cache import FeatureCache
from napari_dinofuse.features.extract import extract_sources
from napari_dinofuse.inference.predict import predict_to_memory
from napari_dinofuse.progress import drive
from napari_dinofuse.synthetic.sample import CLASS_NAMES, CONTEXT_DEPENDENT_CLASSES, MEMBRANE, make_sample
from napari_dinofuse.training.finetune import NewModel, StartModel, fine_tune
from napari_dinofuse.training.train import TrainConfig

CLASSES = range(1, len(CLASS_NAMES))


def shift_agreement(model, source, tile=(16, 64, 64)) -> float:
    """Share of labels unchanged when the tile grid moves by half a tile (and tiles change size)."""
    a = predict_to_memory(model, source, tile_shape=tile, overlap=(4, 16, 16)).arrays["labels"]
    half = tuple(t // 2 for t in tile)
    roi = tuple(slice(h, n) for h, n in zip(half, source.raw.shape))
    b = predict_to_memory(model, source, roi, tile_shape=(32, 96, 96), overlap=(8, 32, 32)).arrays["labels"]
    return float(np.mean(a[roi] == b))


def gate_spread(arrays) -> list[float]:
    """Per level, the 5th-95th percentile range of the attention map (channel mean): ~0 if the gates ignore
    the context, as the first models' gates did (stuck near 0.5)."""
    out = []
    for k in range(1, 5):
        values = arrays[f"attention/level{k}"].astype(np.float32)
        low, high = np.percentile(values, [5, 95])
        out.append(round(float(high - low), 3))
    return out


def confusion(labels, truth, painted) -> dict[str, dict[str, float]]:
    """Per true class, where its unpainted voxels went (shares of that class): which mistake costs the IoU."""
    keep = ~painted
    out = {}
    for k in CLASSES:
        got = labels[keep & (truth == k)]
        out[CLASS_NAMES[k]] = {CLASS_NAMES[j]: round(float(np.mean(got == j)), 3) for j in CLASSES} if got.size else {}
    return out


DISTANCE_BINS = (0, 1.5, 3.5, 12.5, np.inf)  # voxels from the true membrane: 1, 2-3, 4-12, beyond


def membrane_errors(labels, truth, painted) -> dict[str, list[int] | int]:
    """Unpainted voxels wrongly called membrane, by their distance to the true membrane (1, 2-3, 4-12, > 12
    voxels: too thick, a blurred band, elsewhere), and true membrane voxels missed: where a membrane IoU is lost."""
    membrane = truth == MEMBRANE
    false = (labels == MEMBRANE) & ~membrane & ~painted
    distance = ndimage.distance_transform_edt(~membrane)[false]
    return {"false_by_distance": np.histogram(distance, DISTANCE_BINS)[0].tolist(),
            "missed": int(np.count_nonzero(membrane & (labels != MEMBRANE) & ~painted))}


def scores(labels, truth, painted) -> dict:
    """What every row reports about its labels: per-class IoU and where the membrane is lost, on the unpainted
    voxels."""
    return {"iou": iou_unpainted(labels, truth, painted, CLASSES),
            "membrane_errors": membrane_errors(labels, truth, painted)}


def run_seed(seed: int, backbone, cache, modes, iterations: int | None, device="cpu", say=print,
             replicate: int = 0, recipe: dict | None = None, round2: tuple[int, ...] = (), rounds: int = 2) -> dict:
    """Rows of one seed; each UNet's IoUs are also printed as soon as it is scored. ``round2``, ``rounds``: see
    :func:`second_round` (needs the attention mode)."""
    sample = make_sample(seed=seed)
    scribbles = sample.scribbles(seed=seed)
    painted = scribbles > 0
    source = drive(extract_sources(sample.raw, sample.context, backbone, cache))
    rows = {}
    for fusion in modes:
        settings = {"seed": seed + 1000 * replicate, "device": device, **(recipe or {})}
        config = TrainConfig(**settings, **({"iterations": iterations} if iterations else {}))
        result = drive(fine_tune(source, scribbles, config, NewModel(fusion)))
        model, seconds = result.model, result.seconds
        arrays = predict_to_memory(model, source, device=device).arrays
        labels = arrays["labels"]
        rows[f"fused UNet, {fusion}"] = {
            **scores(labels, sample.ground_truth, painted), "seconds": seconds,
            "iterations": result.iterations, "held_out_miou": result.validation,
            "confusion": confusion(labels, sample.ground_truth, painted),
            **({"shift_agreement": shift_agreement(model, source), "gate_spread": gate_spread(arrays)}
               if fusion == "attention" else {})}
        row = rows[f"fused UNet, {fusion}"]
        if fusion == "attention":
            first = result, labels
        say(f"  seed {seed} {fusion}: {result.summary()}; IoU {_ious(row)}"
            + (f"; gate 5-95 % range per level {row['gate_spread']}" if "gate_spread" in row else ""), flush=True)
    rows.update(scored_forests(sample, scribbles, seed))
    if round2:
        capped = {"iterations": iterations} if iterations else {}
        rows.update(second_round(sample, scribbles, source, *first, round2, {**settings, **capped}, say, rounds))
    return rows


def second_round(sample, scribbles, source, first, labels, iterations, settings, say=print, rounds: int = 2) -> dict:
    """The dock's loop, once more: correction strokes where the first attention model is wrong
    (``SyntheticSample.corrections``) added to the first strokes, then Fine-tune again on all of them,
    continuing that model (as the dock does) for each of ``iterations``, and a new model beside it; the forests
    on the same strokes. Scored on the voxels neither round painted. Up to round ``rounds`` the loop goes on:
    corrections of the last model continued ``iterations[0]`` steps, added to all strokes so far, continuing it."""
    rows, strokes, start = {}, scribbles, StartModel(first.model, first.info, first.log)
    for round_ in range(2, rounds + 1):
        fixes = sample.corrections(labels, seed=settings["seed"] + 100 * (round_ - 1))
        strokes = np.where(strokes > 0, strokes, fixes)
        painted = strokes > 0
        say(f"  round {round_}: {int((fixes > 0).sum())} voxels of correction strokes, by class "
            f"{[int((fixes == k).sum()) for k in CLASSES]}", flush=True)
        for n in (*iterations, None) if round_ == 2 else iterations[:1]:
            config = TrainConfig(**{**settings, **({"iterations": n} if n else {})})
            result = drive(fine_tune(source, strokes, config, NewModel("attention"), None if n is None else start))
            name = f"round {round_}, {'new model' if n is None else f'continued {n} it'}"
            arrays = predict_to_memory(result.model, source, device=settings["device"]).arrays
            rows[name] = {**scores(arrays["labels"], sample.ground_truth, painted), "seconds": result.seconds,
                          "iterations": result.iterations, "shares": [round(v, 4) for v in result.shares],
                          "correction_power": result.correction_power}
            say(f"  {name}: {result.seconds:.0f} s; IoU {_ious(rows[name])}; estimated shares "
                f"{rows[name]['shares']}, corrected for to the power {result.correction_power:g}", flush=True)
            if n == iterations[0]:
                next_start, next_labels = StartModel(result.model, result.info, result.log), arrays["labels"]
        start, labels = next_start, next_labels
        rows.update(scored_forests(sample, strokes, settings["seed"], prefix=f"round {round_}, "))
    return rows


def scored_forests(sample, strokes, seed: int, prefix: str = "") -> dict:
    """The forests trained on ``strokes``, scored on the voxels they leave unpainted."""
    return {prefix + name: {**scores(row["labels"], sample.ground_truth, strokes > 0), "seconds": row["seconds"]}
            for name, row in forest_rows(sample, strokes, seed=seed).items()}


def _ious(row) -> str:
    return " / ".join(f"{row['iou'][k]:.2f}" for k in CLASSES)


def table(results: dict) -> str:
    names = [CLASS_NAMES[k] + ("*" if k in CONTEXT_DEPENDENT_CLASSES else "") for k in CLASSES]
    lines = [f"| seed | model | {' | '.join(names)} | train s |", "|---" * (len(names) + 3) + "|"]
    for seed, rows in results.items():
        for name, row in rows.items():
            scores = " | ".join(f"{row['iou'][k]:.2f}" for k in CLASSES)
            lines.append(f"| {seed} | {name} | {scores} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["attention", "concat", "none"])
    parser.add_argument("--iterations", type=int, default=None, help="cap (default: the recipe's)")
    parser.add_argument("--backbone", default="random:vits16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=None, help="feature cache folder (default: the user cache)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--replicate", type=int, default=0, help="train with seed + 1000 R (same sample)")
    parser.add_argument("--round2", type=int, nargs="+", default=[], metavar="N",
                        help="then correction strokes where the attention model errs, and Fine-tune again, "
                             "continuing it N iterations (each N) and anew (see second_round)")
    parser.add_argument("--rounds", type=int, default=2, metavar="K",
                        help="with --round2: go on to round K, correcting the last model continued the first N "
                             "iterations and continuing it")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="change a recipe (TrainConfig) field, e.g. weight_decay=0.01")
    args = parser.parse_args()
    if args.round2 and "attention" not in args.modes:
        parser.error("--round2 continues the attention model: include it in --modes")
    if args.rounds < 2 or (args.rounds > 2 and not args.round2):
        parser.error("--rounds K: K >= 2, and more than 2 only with --round2 N")
    recipe = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in TrainConfig.__dataclass_fields__ or name in ("seed", "device", "iterations") or not value:
            parser.error(f"--set {item!r}: expected FIELD=VALUE with a TrainConfig field (seed, device and "
                         "iterations have options of their own)")
        try:
            recipe[name] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item!r}: the value must be JSON, e.g. 0.01, true or [16, 32, 32]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(args.backbone, device=args.device)
    print(backbone.describe())
    cache = FeatureCache(args.cache)
    results = {seed: run_seed(seed, backbone, cache, args.modes, args.iterations, args.device,
                              replicate=args.replicate, recipe=recipe, round2=tuple(args.round2),
                              rounds=args.rounds)
               for seed in args.seeds}
    print("\nIoU on unpainted voxels (* = context-dependent class); train s = training time (forest: filters + fit "
          "+ predict)\n")
    print(table(results))
    print("\nUnpainted voxels wrongly called membrane, by distance to the true membrane (1 / 2-3 / 4-12 / > 12 "
          "voxels), and membrane voxels missed\n")
    for seed, rows in results.items():
        for name, row in rows.items():
            errors = row["membrane_errors"]
            print(f"seed {seed} {name}: {' / '.join(map(str, errors['false_by_distance']))}; missed {errors['missed']}")
    for seed, rows in results.items():
        att = rows.get("fused UNet, attention")
        if att:
            print(f"seed {seed}: attention, half-tile shift + other tile size: {100 * att['shift_agreement']:.2f} % "
                  f"of labels unchanged; held-out-stroke mIoU {att['held_out_miou']}; gate 5-95 % range per "
                  f"level {att['gate_spread']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(s): {n: {**r, "iou": {CLASS_NAMES[k]: v for k, v in r["iou"].items()}}
                                for n, r in rows.items()} for s, rows in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
