"""The ``dinofuse`` command: a thin driver over the engine.

Heavy modules (torch, transformers) are imported inside the subcommands, so ``dinofuse --help`` is instant.
Expected failures (bad input, unavailable weights) print one line and exit with status 1; mistakes in the
command line itself one line and status 2. Values are checked by the engine's settings objects (TrainConfig,
NewModel, ExtractionSettings, PredictionSettings), built before any slow work; argparse only parses.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from . import __version__, defaults
from .errors import DinofuseError, InputError
from .progress import drive


def _check_backbone(args) -> int:
    import torch

    from .features.backbone import load_backbone

    size = args.size
    if not 1 <= size <= 8192:  # only this command has the option: no engine setting checks it
        raise InputError(f"--size {size}: expected a slice side from 1 to 8192 pixels (e.g. 512)")
    backbone = load_backbone(args.backbone, device=args.device, compile=args.compile)
    print(backbone.describe())
    start = time.perf_counter()
    features = backbone.patch_features(torch.rand(1, size, size))
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"one {size}x{size} slice -> features {tuple(features.shape[1:])} in {elapsed:.2f} s")
    return 0


def _triple(text: str) -> tuple[float, float, float]:
    """'Z,Y,X' (or one number for isotropic) in nm."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X in nm (e.g. 8,4,4), got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 values Z,Y,X in nm, got {text!r}")
    return tuple(values)


def _ints(text: str) -> int | tuple[int, ...]:
    """'Z,Y,X' whole numbers, or one for every axis; their values are the engine's to check."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers Z,Y,X (or one for all axes), got {text!r}") from None
    return values[0] if len(values) == 1 else values


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one line (status 2), like every other refusal, not the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_volume_args(parser: argparse.ArgumentParser, role: str, required: bool) -> None:
    parser.add_argument(f"--{role}", required=required, metavar="PATH",
                        help=f"{role} volume: .zarr (array or OME-Zarr image), .tif/.tiff, FILE.h5/DATASET or .npy")
    parser.add_argument(f"--{role}-voxel-size", type=_triple, metavar="Z,Y,X",
                        help=f"{role} voxel size in nm (default: from the file's metadata)")
    parser.add_argument(f"--{role}-offset", type=_triple, metavar="Z,Y,X",
                        help=f"{role} offset of the first voxel's centre in nm (default: metadata or 0)")
    parser.add_argument(f"--{role}-level", type=int, default=0, metavar="N",
                        help="OME-Zarr resolution level (default 0, the full resolution)")


def _open(args, role: str):
    from .io import open_volume

    path = getattr(args, role)
    return open_volume(path, voxel_size=getattr(args, f"{role}_voxel_size"), offset=getattr(args, f"{role}_offset"),
                       name=role, level=getattr(args, f"{role}_level"),
                       voxel_size_hint=f"--{role}-voxel-size Z,Y,X")


def _add_object_args(parser: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    parser.add_argument("--instances", required=required, metavar="CLASS[,CLASS]", help=what)
    parser.add_argument("--min-size", type=float, default=0.0, metavar="NM3",
                        help="drop objects smaller than this volume in nm³ (default 0: keep all)")
    parser.add_argument("--split", type=float, default=0.0, metavar="NM",
                        help="split touching objects where the neck is at least this much narrower (in radius, nm) "
                             "than the objects it joins (default 0: no splitting; e.g. 20)")
    parser.add_argument("--no-fill-holes", dest="fill_holes", action="store_false",
                        help="keep enclosed holes (default: filled)")
    parser.add_argument("--measurements", metavar="CSV", help="also write the measurements table here")


def _add_backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=None,
                        help="hub id, local folder, or random:<arch> (default: $DINOFUSE_BACKBONE or "
                             "facebook/dinov3-vitl16-pretrain-sat493m)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--compile", action="store_true", default=None,
                        help="run the ViT through torch.compile: faster on large volumes on a GPU, tens of seconds "
                             "to compile each new slice size (default: $DINOFUSE_COMPILE=1)")


def _add_feature_args(parser: argparse.ArgumentParser) -> None:
    _add_backbone_args(parser)
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="feature cache folder (default: $DINOFUSE_CACHE or the user cache directory)")
    parser.add_argument("--planes", default="xy", choices=["xy", "ortho"],
                        help="xy slices, or xy+xz+yz averaged for 3D consistency (3x the cost)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="slices per ViT forward pass (default 16 on CUDA, 4 otherwise)")


def _follow(generator, label: str):
    """Drive an engine generator with a one-line progress bar on stderr; returns its value.

    Not tqdm: in a log (CI, a cluster's batch job) this prints one readable line per tenth of each phase, with
    the step's message, where tqdm's carriage-return updates pile up into one unreadable line.
    """
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    last_shown = -1.0

    def show(step):
        nonlocal last_shown
        if step.message.startswith("warning:"):  # on a line of its own, not overwritten by the bar
            print(("\n" if tty else "") + step.message, file=sys.stderr, flush=True)
            return
        elapsed = time.perf_counter() - start
        fraction = step.fraction
        eta = f", {elapsed / fraction - elapsed:.0f} s left" if 0 < fraction < 1 and elapsed > 2 else ""
        text = f"{label}: [{'#' * int(30 * fraction):<30}] {step.done}/{step.total} {step.message}{eta}"
        if tty:
            print("\r" + text[:150].ljust(150), end="", file=sys.stderr, flush=True)
        elif fraction - last_shown >= 0.1 or fraction >= 1 or fraction < last_shown:  # (a new phase restarts)
            print(text, file=sys.stderr, flush=True)
            last_shown = fraction

    value = drive(generator, show)
    if tty:
        print(file=sys.stderr)
    return value


def _volumes(args):
    """Open raw (+ context) and check where they lie: lazy and cheap, so before any backbone or feature work."""
    raw = _open(args, "raw")
    context = _open(args, "context") if args.context else None
    if context is not None:
        context.require_covers(raw)
    return raw, context


def _extract(args) -> int:
    from .features.backbone import load_backbone
    from .features.cache import FeatureCache, format_bytes
    from .features.extract import ExtractionSettings, extract_features

    settings = ExtractionSettings(args.planes, args.tile_size, args.batch_size)
    volumes = [v for v in _volumes(args) if v is not None]
    backbone = load_backbone(args.backbone, device=args.device, compile=args.compile)
    print(backbone.describe())
    cache = FeatureCache(args.cache)
    for volume in volumes:
        start = time.perf_counter()
        entry = _follow(extract_features(volume, backbone, cache, planes=settings.planes,
                                         tile_size=settings.tile_size, batch_size=settings.batch_size,
                                         verify="all" if args.verify else "changed"), volume.name)
        print(f"{volume.name}: features {entry.shape} in {entry.path} ({format_bytes(entry.nbytes_on_disk())}, "
              f"{time.perf_counter() - start:.1f} s)")
    print(f"cache {cache.root}: {format_bytes(cache.size_bytes())} in all")
    return 0


def _sources(args, backbone, raw, context, settings):
    """Extract or reuse the features of raw (+ context), with a progress bar."""
    from .features.cache import FeatureCache
    from .features.extract import extract_sources

    return _follow(extract_sources(raw, context, backbone, FeatureCache(args.cache), planes=settings.planes,
                                   batch_size=settings.batch_size), "features")


def _train(args) -> int:
    from .annotations import find_painted
    from .features.backbone import load_backbone
    from .features.extract import ExtractionSettings
    from .geometry import Volume
    from .io import open_volume
    from .modeling.checkpoint import load_model, read_training_log, save_model
    from .training.finetune import NewModel, StartModel, fine_tune
    from .training.train import TrainConfig

    # Every refusal before any slow work (backbone, features): settings, volumes, labels.
    config = TrainConfig(iterations=args.iterations, learning_rate=args.learning_rate, seed=args.seed,
                         tiles_per_step=args.tiles_per_step, dice_weight=args.dice_weight, edge_weight=args.edge_weight,
                         keep_weight=args.keep_weight, validation_share=args.validation_share, device=args.device,
                         mixed_precision=defaults.TRAIN_PRECISIONS[args.train_precision])
    new = NewModel(fusion=args.fusion, base_channels=args.base_channels, intensity_stem=args.intensity_stem,
                   context_margin_nm=args.context_margin)
    extraction = ExtractionSettings(args.planes, batch_size=args.batch_size)
    start = StartModel(*load_model(args.init), read_training_log(args.init)) if args.init else None
    raw, context = _volumes(args)
    labels = open_volume(args.labels, voxel_size=raw.voxel_size, offset=raw.offset, name="labels")
    # Read once: the snapshot of the strokes is what training reads and what is saved with the model.
    painted = find_painted(labels.data, raw.shape, known_classes=start.model.config.num_classes if start else 0)
    backbone = load_backbone(args.backbone or (start.info.backbone if start else None), device=args.device,
                             compile=args.compile)
    print(backbone.describe())
    source = _sources(args, backbone, raw, context, extraction)
    result = _follow(fine_tune(source, painted, config, new, start, backbone=backbone), "train")
    annotations = Volume(painted, labels.voxel_size, labels.offset, "annotations")  # the strokes travel with it
    save_model(args.out, result.model, result.info, result.log, annotations=annotations)
    print(f"{result.summary()}; model saved to {args.out}")
    return 0


def _predict(args) -> int:
    from .features.backbone import load_backbone
    from .features.extract import ExtractionSettings
    from .inference.outputs import ZarrSink
    from .inference.plan import PredictionSettings, snap_roi
    from .inference.predict import predict
    from .modeling.checkpoint import check_backbone_compatible, load_model
    from .training.finetune import inference_settings

    model, info = load_model(args.model)
    inference = inference_settings(info, args.device)
    objects = _object_settings(args, info.class_names)
    if objects is not None:
        objects.check_classes(model.config.num_classes, info.class_names)
    # Every refusal before any slow work (backbone, features): settings, volumes, the ROI.
    settings = PredictionSettings(inference.tile_shape, inference.overlap, args.block_shape, args.workers)
    extraction = ExtractionSettings(args.planes or inference.planes, batch_size=args.batch_size)
    raw, context = _volumes(args)
    snap_roi(args.roi, raw.shape)
    backbone = load_backbone(args.backbone or info.backbone, device=args.device, compile=args.compile,
                             normalization=None if args.backbone else info.normalization)
    print(backbone.describe())
    warning = check_backbone_compatible(info, str(backbone.spec), backbone.embed_dim)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if settings.workers is not None or args.scheduler:
        _predict_on_cluster(args, backbone, (raw, context), settings, extraction, objects)
        return 0
    source = _sources(args, backbone, raw, context, extraction)
    _follow(predict(model, source, args.roi, tile_shape=settings.tile_shape, overlap=settings.overlap,
                    block_shape=settings.block_shape, attention=args.attention, device=args.device,
                    sink=ZarrSink(args.out), class_names=info.class_names), "predict")
    print(f"wrote {args.out}: labels, probabilities, uncertainty" + (
        ", attention/level1..4" if args.attention and model.config.fusion == "attention" else ""))
    if objects is not None:
        _write_objects(args.out, objects, args)
    return 0


def _object_settings(args, class_names=None):
    """The objects options as settings, or None when no classes were asked for."""
    from .inference.instances import ObjectSettings, parse_classes

    if args.instances is None:
        return None
    return ObjectSettings(parse_classes(args.instances, class_names), min_size_nm3=args.min_size,
                          fill_holes=args.fill_holes, split_depth_nm=args.split)


def _write_objects(folder, settings, args, client=None) -> None:
    """Objects of a prediction folder, their block passes on ``client``'s dask cluster if one is given."""
    from .inference.instances import objects_in_prediction

    map_blocks = map
    if client is not None:
        from .distributed import block_mapper

        map_blocks = block_mapper(client)
    table = _follow(objects_in_prediction(folder, settings, block_shape=args.block_shape, map_blocks=map_blocks),
                    "objects")
    print(f"wrote {folder}/instances (with measurements.csv): {table.summary()}")
    if args.measurements:
        table.save_csv(args.measurements)
        print(f"measurements: {args.measurements}")


def _instances(args) -> int:
    from .inference.instances import open_prediction

    names = dict(open_prediction(args.prediction).attrs["dinofuse"]).get("class_names")
    settings = _object_settings(args, names)
    if args.workers is None and not args.scheduler:
        _write_objects(args.prediction, settings, args)
        return 0
    from .distributed import connect, require_distributed

    require_distributed()
    client = connect(args.workers, args.scheduler)
    try:
        _write_objects(args.prediction, settings, args, client)
    finally:
        client.close()
    return 0


def _predict_on_cluster(args, backbone, volumes, settings, extraction, objects=None) -> None:
    from .distributed import VolumeRef, connect, prepare_job, require_distributed, run_blockwise
    from .features.cache import FeatureCache

    require_distributed()
    # Workers reopen the files with the voxel size and offset resolved here.
    refs = [VolumeRef(str(getattr(args, role)), volume.voxel_size, volume.offset, getattr(args, f"{role}_level"),
                      role) if volume is not None else None for role, volume in zip(("raw", "context"), volumes)]
    job, units = prepare_job(refs[0], refs[1], args.model, args.out, backbone, FeatureCache(args.cache),
                             planes=extraction.planes, roi=args.roi, tile_shape=settings.tile_shape,
                             overlap=settings.overlap, block_shape=settings.block_shape, attention=args.attention,
                             device=args.device, batch_size=extraction.batch_size or 4)
    client = connect(settings.workers, args.scheduler)
    print(f"dask dashboard: {client.dashboard_link}")
    try:
        stats = _follow(run_blockwise(client, job, units), "cluster")
        print(f"wrote {args.out}: {stats['computed']} blocks computed, {stats['skipped']} already done "
              f"(of {stats['blocks']})")
        if objects is not None:
            _write_objects(args.out, objects, args, client)
    finally:
        client.close()


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, backbone=args.backbone, device=args.device, seed=args.seed,
             **({"iterations": args.iterations} if args.iterations is not None else {}),
             cache=args.cache, raw_shape=args.raw_shape, follow=_follow)
    return 0


def _cache(args) -> int:
    from .features.cache import FeatureCache, format_bytes

    cache = FeatureCache(args.cache)
    entries = cache.entries()
    if args.action == "list":
        for e in entries:
            print(f"{e.key}  {format_bytes(e.nbytes):>9}  {100 * e.fraction_done:5.1f}%  {e.planes:<5} "
                  f"{e.backbone}  {e.source}  {tuple(e.shape)}")
        print(f"{len(entries)} entries, {format_bytes(cache.size_bytes())} in {cache.root}")
    else:
        freed = cache.clear(args.keys or None)
        print(f"freed {format_bytes(freed)} in {cache.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dinofuse",
        description="Volume-EM segmentation with DINOv3 features and a context-fused 3D UNet (headless).",
    )
    parser.add_argument("--version", action="version", version=f"napari-dinofuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser("check-backbone", help="load a backbone and run it on one slice (checks weights access)",
                           description="Load a DINOv3 backbone and time one forward pass.")
    _add_backbone_args(check)
    check.add_argument("--size", type=int, default=512, help="side of the test slice in pixels")
    check.set_defaults(func=_check_backbone)

    extract = sub.add_parser("extract", help="extract DINOv3 features of a raw (and context) volume into the cache",
                             description="Extract patch-resolution DINOv3 features into the on-disk cache "
                                         "(resumes an interrupted run; reuses finished work).")
    _add_volume_args(extract, "raw", required=True)
    _add_volume_args(extract, "context", required=False)
    _add_feature_args(extract)
    extract.add_argument("--tile-size", type=int, default=1024, metavar="PX",
                         help="slices wider than this are tiled with overlap (default 1024)")
    extract.add_argument("--verify", action="store_true",
                         help="re-read and re-checksum every finished unit first (default: only those whose "
                              "files changed since they were written)")
    extract.set_defaults(func=_extract)

    train = sub.add_parser("train", help="fine-tune the context-fused 3D UNet on sparse painted labels",
                           description=f"Fine-tune on sparse labels ({defaults.LABEL_CONVENTION}) and save a model "
                                       "folder (config.json + model.safetensors).")
    _add_volume_args(train, "raw", required=True)
    _add_volume_args(train, "context", required=False)
    train.add_argument("--labels", required=True, metavar="PATH", help="painted labels on the raw grid")
    train.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write (atomically)")
    train.add_argument("--init", metavar="MODEL_DIR", help="fine-tune this model instead of starting from scratch (at "
                       f"{defaults.CONTINUE_LR_SCALE:.2g}x the peak learning rate: it refines)")
    train.add_argument("--iterations", type=int, default=defaults.ITERATIONS,
                       help=f"at most (default {defaults.ITERATIONS}); training stops early when the held-out "
                            "strokes stop improving")
    train.add_argument("--learning-rate", type=float, default=defaults.LEARNING_RATE,
                       help=f"peak, for a new model (default {defaults.LEARNING_RATE:g}); with --init "
                            f"{defaults.CONTINUE_LR_SCALE:.2g}x of it")
    train.add_argument("--tiles-per-step", type=int, default=defaults.TILES_PER_STEP,
                       help=f"training tiles per step (default {defaults.TILES_PER_STEP}; 4 trains about twice as fast "
                            "on a CPU, with a weaker first-round membrane: docs/benchmarks.md)")
    train.add_argument("--fusion", default="attention", choices=["attention", "concat", "none"])
    train.add_argument("--base-channels", type=int, default=defaults.BASE_CHANNELS,
                       help=f"UNet width (default {defaults.BASE_CHANNELS}, laptop-friendly; 32-64 on a GPU)")
    train.add_argument("--no-intensity-stem", dest="intensity_stem", action="store_false",
                       help="do not feed raw intensities at full resolution (boundaries become 16-voxel blocky)")
    train.add_argument("--context-margin", type=float, default=defaults.CONTEXT_MARGIN_NM, metavar="NM",
                       help=f"how far beyond each tile the context branch reads (default {defaults.CONTEXT_MARGIN_NM:g} "
                            "nm; at least the context encoder's reach: ~21 context voxels, most of its weight "
                            "within ~16)")
    train.add_argument("--validation-share", type=float, default=defaults.VALIDATION_SHARE,
                       help="share of each class's strokes held out to score the model and stop early (default 0: every "
                            "stroke trains; e.g. 0.2 with many strokes per class)")
    train.add_argument("--dice-weight", type=float, default=0.0,
                       help="add soft Dice on painted voxels to the cross-entropy, with this weight (e.g. 0.5)")
    train.add_argument("--edge-weight", type=float, default=defaults.EDGE_WEIGHT,
                       help="weight of the term that pulls the classes' edges onto the image's edges on unpainted "
                            f"voxels (default {defaults.EDGE_WEIGHT:g}; 0: off; docs/benchmarks.md)")
    train.add_argument("--keep-weight", type=float, default=defaults.KEEP_WEIGHT,
                       help="with --init: weight of the term that keeps the start model's sure calls on unpainted "
                            "voxels away from the strokes it got wrong, so corrections of one class do not move "
                            f"the others (default {defaults.KEEP_WEIGHT:g}; 0: off; docs/benchmarks.md)")
    train.add_argument("--train-precision", default="float32", choices=list(defaults.TRAIN_PRECISIONS),
                       help="bf16: train under bf16 autocast where the device computes it (CUDA, CPUs with bf16 "
                            "instructions): with --init level with float32 and ~1.15x faster on an idle CPU, slower "
                            "beside other busy processes; a new model's first round measurably worse "
                            "(docs/benchmarks.md; default float32)")
    train.add_argument("--seed", type=int, default=0)
    _add_feature_args(train)
    train.set_defaults(func=_train)

    pred = sub.add_parser("predict", help="segment a volume with a trained model (labels, probabilities, attention)",
                          description="Sliding-window prediction into an OME-Zarr group (labels, probabilities, "
                                      "uncertainty, attention/level1..4) that napari opens aligned with the raw.")
    _add_volume_args(pred, "raw", required=True)
    _add_volume_args(pred, "context", required=False)
    pred.add_argument("--model", required=True, metavar="MODEL_DIR")
    pred.add_argument("--out", required=True, metavar="OUT.zarr", help="written atomically; replaces an earlier result")
    pred.add_argument("--roi", default=None, metavar="z0:z1,y0:y1,x0:x1",
                      help="region of interest in raw voxels (default: the whole volume)")
    pred.add_argument("--attention", action="store_true", help="also write the 4 per-level attention maps")
    where = pred.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run blockwise on a local dask cluster of N worker processes")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run blockwise on an existing dask scheduler (e.g. tcp://host:8786; see docs/cluster.md)")
    pred.add_argument("--block-shape", type=_ints, default=defaults.PREDICT_BLOCK, metavar="Z,Y,X",
                      help="voxels per block: a cluster task, or in this process what is held in memory at once "
                           f"(default {','.join(map(str, defaults.PREDICT_BLOCK))})")
    _add_object_args(pred, "also find objects of these classes (label values or class names, e.g. 3,4 or "
                           "mitochondrion): an `instances` image beside the labels, with measurements")
    _add_feature_args(pred)
    pred.set_defaults(func=_predict, planes=None)

    objects = sub.add_parser("instances", help="objects and measurements from a finished prediction folder",
                             description="Objects (connected components, optionally split where touching) of chosen "
                                         "classes, written as OUT.zarr/instances with measurements.csv; per-class "
                                         "totals are printed.")
    objects.add_argument("prediction", metavar="OUT.zarr", help="a prediction folder written by `dinofuse predict`")
    _add_object_args(objects, "classes to find objects of: label values or class names (e.g. 3,4 or mitochondrion)",
                     required=True)
    objects.add_argument("--block-shape", type=_ints, default=defaults.PREDICT_BLOCK, metavar="Z,Y,X",
                         help="voxels per block: a cluster task, or in this process what is read at once (default "
                              + ",".join(map(str, defaults.PREDICT_BLOCK)) + ")")
    where = objects.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run the block passes on a local dask cluster of N worker processes")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the block passes on an existing dask scheduler (workers must reach the folder)")
    objects.set_defaults(func=_instances)

    demo = sub.add_parser("demo", help="offline end-to-end demo on the bundled synthetic EM sample",
                          description="Render the synthetic sample, extract features, fine-tune on scribbles with "
                                      "and without context fusion, predict, and report IoU on unpainted voxels.")
    demo.add_argument("--out", default="dinofuse-demo", metavar="DIR", help="output folder (default ./dinofuse-demo)")
    demo.add_argument("--backbone", default=None,
                      help="default: DINOv3 from the local download cache if present, else random:vits16")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    demo.add_argument("--iterations", type=int, default=None,
                      help=f"training iterations per model (default: the recipe's {defaults.ITERATIONS}, a few "
                           "minutes on a laptop CPU)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--raw-shape", type=_ints, default=(32, 256, 256), metavar="Z,Y,X",
                      help="size of the synthetic raw field in 4 nm voxels (y, x >= 128)")
    demo.add_argument("--cache", default=None, metavar="DIR", help="feature cache folder")
    demo.set_defaults(func=_demo)

    cache = sub.add_parser("cache", help="list or clear cached feature volumes")
    cache.add_argument("action", choices=["list", "clear"])
    cache.add_argument("keys", nargs="*", help="entries to clear (default: all)")
    cache.add_argument("--cache", default=None, metavar="DIR", help="feature cache folder")
    cache.set_defaults(func=_cache)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings (e.g. random backbones) as one plain line, not a source excerpt.
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        return args.func(args)
    except (DinofuseError, OSError) as exc:  # OSError: an unwritable --out, a full disk (as the widget shows them)
        print(f"dinofuse {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
