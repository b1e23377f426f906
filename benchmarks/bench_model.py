"""Model benchmarks (fine-tuning, inference). Run on demand:

    python benchmarks/bench_model.py [projection|finetune|inference|all] [--backbone random:vits16]

- projection: 1x1x1 projection before vs after upsampling on the same tile: time, peak memory, equal outputs;
- finetune: iterations/s, and seconds from "start" to an updated prediction of a 128^3 region (features cached;
  training in float32, with --precision bf16 under bf16 autocast);
  a warm step's time next to the time its tiles take on the tile thread, host waits per step, a warm continuing
  step's time (the keep term runs the start model too); with --profile,
  host and device time per step, kernel launches and the top ops by host time; with --ops, the ops per step that
  launch a kernel (forward by the model's parts, backward, optimizer): what binds a GPU step, counted anywhere;
- inference: voxels/s of the UNet alone and end to end from the cache (their ratio, and the most the tiles'
  overlap allows), seconds to read the blocks' features; seconds until the region in view is shown when it is
  predicted first (as the dock does), and until all is done; peak RSS per tile size;
- labels: what a Fine-tune does with the labels, which grows with the volume, not the strokes (a volume of
  --volume, default 256x1024x1024 bytes, with a few thousand painted voxels): taking their snapshot, the autosave,
  the label tiles of 100 training steps; the same from the dense array (the dock copied the layer before) beside it;
- first_step: seconds from the session's Fine-tune to its first training step on that volume (random intensities,
  its features and a context's cached as stand-ins, no ViT), a new model and a continued one;
- reads: a training tile's inputs and a prediction block's features from the cache, stand-in features of
  --volume (default 32x2048x2048: slices wider than the sample's, as real ones are) for --backbone;
- preview: the dock's Fine-tune of the 32x256x256 sample with and without previews of the slice in view, in one
  run: seconds to the finished prediction, seconds in previews, the same weights?, and how far each preview is from
  the finished prediction of that slice and from the truth (and the finished model at equal class shares beside);
(Segmentation quality, fusion modes against a random forest: bench_quality.py.)
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace

import numpy as np
import torch
from bench_features import stand_in_features

from napari_dinofuse.defaults import PREDICT_BLOCK, TRAIN_PRECISIONS, predict_tile

warnings.simplefilter("ignore")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def projection(args):
    """Runs each variant in a fresh process so peak memory is its own."""
    out = {}
    for variant in ("before", "after"):
        res = _run_child([sys.executable, __file__, "_projection_child", variant, "--channels", str(args.channels)])
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    b, a = out["before"], out["after"]
    print(f"projection ({args.channels} -> 16 channels, tile 32x256x256): before upsampling {b['seconds']:.3f} s, "
          f"+{b['rss_delta_mib']:.0f} MiB; after {a['seconds']:.3f} s, +{a['rss_delta_mib']:.0f} MiB -> "
          f"{a['seconds'] / b['seconds']:.0f}x faster, {a['rss_delta_mib'] / max(b['rss_delta_mib'], 1):.0f}x less "
          f"memory; max |difference| {abs(a['checksum'] - b['checksum']):.2e} (checksum)")


def _run_child(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a child benchmark process; on failure raise with its stderr (else a crash says nothing)."""
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed with exit code {res.returncode}:\n{res.stderr[-4000:]}")
    return res


def _projection_child(variant: str, channels: int):
    import torch.nn.functional as F

    torch.manual_seed(0)
    feats = torch.randn(1, channels, 32, 16, 16)
    proj = torch.nn.Conv3d(channels, 16, 1)
    size = (32, 256, 256)
    base = _rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        if variant == "before":
            y = F.interpolate(proj(feats), size=size, mode="trilinear", align_corners=False)
        else:
            y = proj(F.interpolate(feats, size=size, mode="trilinear", align_corners=False))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_delta_mib": _rss_mib() - base, "checksum": float(y.double().sum())}))


def _setup(args, raw_shape=(32, 256, 256), seed=0):
    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import extract_sources
    from napari_dinofuse.progress import drive
    from napari_dinofuse.synthetic.sample import make_sample

    sample = make_sample(seed=seed, raw_shape=raw_shape)
    backbone = load_backbone(args.backbone, device=args.device)
    source = drive(extract_sources(sample.raw, sample.context, backbone, FeatureCache(args.cache)))
    return sample, source


def finetune(args):
    from napari_dinofuse.features.backbone import resolve_device
    from napari_dinofuse.inference.predict import predict_to_memory
    from napari_dinofuse.progress import drive
    from napari_dinofuse.training.train import TrainConfig, Trainer, new_model

    sample, source = _setup(args, raw_shape=(128, 128, 128))
    model = new_model(source, 4, base_channels=args.base_channels)
    start = time.perf_counter()
    settings = {"device": args.device, "mixed_precision": TRAIN_PRECISIONS[args.precision]}
    trainer = Trainer(model, source, sample.scribbles(), TrainConfig(iterations=args.iterations, **settings))
    drive(trainer.run())
    trained = time.perf_counter() - start
    predict_to_memory(model, source, None, device=args.device)
    total = time.perf_counter() - start
    print(f"fine-tune (base {args.base_channels}, tile {trainer.tile_shape}, "
          f"precision {args.precision}): {len(trainer.log) / trained:.2f} it/s; "
          f"start -> updated prediction of 128^3 after {len(trainer.log)} iterations: {total:.1f} s "
          f"(training {trained:.1f} s, prediction {total - trained:.1f} s)")
    device = resolve_device(args.device)
    trainer = Trainer(model, source, sample.scribbles(), TrainConfig(iterations=1000, **settings))
    prepared = [0.0]
    make_tile = trainer._batch

    def timed_tile(*a):  # on the tile thread
        start = time.perf_counter()
        tile = make_tile(*a)
        prepared[0] += time.perf_counter() - start
        return tile

    trainer._batch = timed_tile
    steps = trainer.run()
    for _ in range(10):  # warm: the model moved, the tile thread started, kernels chosen for the shapes seen
        next(steps)
    _sync(device)
    prepared[0], start = 0.0, time.perf_counter()
    for _ in range(10):
        next(steps)
    _sync(device)
    print(f"  a warm training step: {100 * (time.perf_counter() - start):.0f} ms; making its tiles (on the tile "
          f"thread): {100 * prepared[0]:.0f} ms")
    waits = _host_waits(device, lambda: [next(steps) for _ in range(5)])
    if waits is not None:
        print(f"  host waits for the device per training step: {waits / 5:.1f} (1 expected: the loss shown)")
    if args.ops:
        _count_ops(model, steps)
    if args.profile:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                next(steps)
            _sync(device)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))
        device_time = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)  # kernels
        print(f"  per step: host {events.self_cpu_time_total / 5e3:.0f} ms, device {device_time / 5e3:.0f} ms, "
              f"{launches / 5:.0f} kernel launches")
        print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    steps.close()
    # Fine-tune again: continuing, a step also runs the start model (as it predicts) for the keep term.
    steps = Trainer(copy.deepcopy(model), source, sample.scribbles(), TrainConfig(iterations=1000, **settings),
                    continues=True).run()
    for _ in range(10):
        next(steps)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        next(steps)
    _sync(device)
    print(f"  a warm continuing step (the keep term's start model too): {100 * (time.perf_counter() - start):.0f} ms")
    steps.close()


# Ops that launch no kernel (views, allocations, reading a CPU scalar): left out of the counts.
_NO_KERNEL = {"slice", "view", "permute", "as_strided", "detach", "squeeze", "unsqueeze", "expand", "t", "transpose",
              "alias", "_unsafe_view", "select", "unbind", "split", "split_with_sizes", "_local_scalar_dense",
              "empty", "empty_strided", "new_empty_strided", "new_empty", "_reshape_alias", "reshape", "lift_fresh",
              "resize_"}


def _count_ops(model, steps, count: int = 3) -> None:
    """Kernel-launching aten ops per warm training step, forward by the model's top-level parts, then backward
    and the optimizer: a device-free stand-in for the kernel launches that bind a GPU step (the optimizer is a
    loop per parameter on a CPU but a few foreach kernels on CUDA, so it is shown apart)."""
    from collections import Counter

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.utils._python_dispatch import TorchDispatchMode

    where, counts = ["backward, loss"], Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in _NO_KERNEL:
                counts[where[-1]] += 1
            return func(*args, **(kwargs or {}))

    def enter(name):
        return lambda *_: where.append(name)

    def leave(*_):
        where.pop()

    hooks = [register_optimizer_step_pre_hook(enter("optimizer")), register_optimizer_step_post_hook(leave),
             model.register_forward_pre_hook(enter("forward: its own code")), model.register_forward_hook(leave)]
    for name, child in model.named_children():  # a ModuleList's members are what forward calls
        for part in (child if isinstance(child, torch.nn.ModuleList) else [child]):
            hooks += [part.register_forward_pre_hook(enter(f"forward: {name}")), part.register_forward_hook(leave)]
    with Counting():
        for _ in range(count):
            next(steps)
    for hook in hooks:
        hook.remove()
    model_ops = sum(n for k, n in counts.items() if k != "optimizer")
    print(f"  kernel-launching ops per step: {model_ops / count:.0f} forward + backward (the optimizer "
          f"{counts['optimizer'] / count:.0f} more); by part: " +
          ", ".join(f"{k} {n / count:.0f}" for k, n in counts.most_common() if k != "optimizer"))


def _host_waits(device: torch.device, run) -> int | None:
    """How often ``run()`` made the host wait for the device (CUDA's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def inference(args):
    from napari_dinofuse.features.backbone import resolve_device
    from napari_dinofuse.inference.plan import plan_prediction
    from napari_dinofuse.inference.predict import predict_to_memory, read_block
    from napari_dinofuse.precision import autocast
    from napari_dinofuse.training.train import new_model

    sample, source = _setup(args, raw_shape=args.volume or (64, 256, 256))
    dev = resolve_device(args.device)
    model = new_model(source, 4, base_channels=args.base_channels).eval().to(dev)
    # The UNet alone runs one whole tile of the volume: at most the volume.
    tile = tuple(min(t, n) for t, n in zip(args.tile or predict_tile(dev.type), sample.raw.shape))
    overlap = (8, 32, 32)
    inputs = source.tile(tuple(slice(0, n) for n in tile), intensity=True, device=dev,
                         halo=model.intensity_halo)
    # Same precision as predict(): bf16 on CUDA and on CPUs with bf16 instructions (napari_dinofuse.precision).
    with torch.inference_mode(), autocast(dev):
        model(inputs.raw, inputs.context, tile, inputs.intensity)
        _sync(dev)
        start = time.perf_counter()
        for _ in range(3):
            model(inputs.raw, inputs.context, tile, inputs.intensity)
        _sync(dev)
        unet = 3 * np.prod(tile) / (time.perf_counter() - start)
        waits = _host_waits(dev, lambda: model(inputs.raw, inputs.context, tile, inputs.intensity))
    settings = {"tile_shape": tile, "overlap": overlap, "block_shape": args.block}
    plan = plan_prediction(model, source, None, **settings)
    # Overlapping tiles compute some voxels several times: were the UNet all, end to end would be 1 / redundancy of it.
    voxels = np.prod(sample.raw.shape)
    redundancy = sum(np.prod([s.stop - s.start for s in t]) for _, _, ts in plan.blocks for t in ts) / voxels

    def read_all(direct: bool) -> float:  # the host part that predict() overlaps with the device
        entries = [e for e in (source.raw_features, source.context_features) if e is not None]
        kept = [e._direct for e in entries]
        for entry in entries:  # the chunk files themselves (the default), or through zarr as before
            entry._direct = {plane: direct and d for plane, d in entry._direct.items()}
        start = time.perf_counter()
        for index in range(len(plan.blocks)):
            read_block(model, source, plan, index, dev)
        _sync(dev)
        for entry, direct_before in zip(entries, kept):
            entry._direct = direct_before
        return time.perf_counter() - start

    read_all(True)  # warm: the files in the page cache, the kernels chosen
    reads_zarr, reads = min(read_all(False), read_all(False)), min(read_all(True), read_all(True))
    start = time.perf_counter()
    predict_to_memory(model, source, None, device=args.device, **settings)
    _sync(dev)
    seconds = time.perf_counter() - start
    end_to_end = voxels / seconds
    print(f"inference (base {args.base_channels}, volume {sample.raw.shape}, tile {tile}, overlap {overlap}, "
          f"{len(plan.blocks)} block(s) of {plan.block_shape}): UNet alone {unet / 1e6:.3g} Mvoxel/s; end to end "
          f"from the cache {end_to_end / 1e6:.3g} Mvoxel/s ({seconds:.1f} s) = {end_to_end / unet:.2f} of the UNet "
          f"alone ({1 / redundancy:.2f} if only the UNet took time: the tiles cover the volume {redundancy:.2f} "
          f"times); reading the blocks' features alone {reads:.2f} s (through zarr: {reads_zarr:.2f} s)" +
          ("" if waits is None else f"; host waits for the device per UNet forward: {waits}"))
    # What the dock does: the region in view first (here the middle slice's +- VIEW_HALF_DEPTH, all of y/x).
    from napari_dinofuse.display import VIEW_HALF_DEPTH
    from napari_dinofuse.inference.outputs import MemorySink
    from napari_dinofuse.inference.predict import predict

    middle = sample.raw.shape[0] // 2
    view = (slice(max(0, middle - VIEW_HALF_DEPTH), min(sample.raw.shape[0], middle + VIEW_HALF_DEPTH + 1)),
            slice(None), slice(None))
    start, shown = time.perf_counter(), None
    for step in predict(model, source, None, device=args.device, sink=MemorySink(), first=view, **settings):
        if step.partial is not None:
            _sync(dev)
            shown = time.perf_counter() - start
    _sync(dev)
    total = time.perf_counter() - start
    print("  region in view first: " + ("not split (it is most of the volume)" if shown is None else
          f"shown after {shown:.1f} s, all done after {total:.1f} s (one pass without it: {seconds:.1f} s)"))
    if not args.rss:
        return
    for t in ((16, 64, 64), (32, 128, 128), (48, 192, 192), (32, 256, 256)):
        res = _run_child([sys.executable, __file__, "_inference_child", ",".join(map(str, t)),
                          "--backbone", args.backbone, "--device", args.device, "--cache", args.cache,
                          "--base-channels", str(args.base_channels)])
        print(f"  peak RSS with tile {t}: {json.loads(res.stdout.strip().splitlines()[-1])['rss_mib']:.0f} MiB")


def labels(args):
    import shutil

    from napari_dinofuse.annotations import find_painted, save_annotations
    from napari_dinofuse.defaults import TILES_PER_STEP, TRAIN_TILE
    from napari_dinofuse.geometry import Grid

    shape = args.volume or (256, 1024, 1024)
    dense = _painted(shape)
    grid = Grid(shape, (8.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    work = tempfile.mkdtemp()

    def timed(fn, rounds=3):
        best = np.inf
        for _ in range(rounds):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    def tiles(array):  # the label tiles of 100 training steps, around painted voxels
        points = np.concatenate(list(painted.coords.values()))[::7][:100 * TILES_PER_STEP]
        for p in points:
            region = tuple(slice(max(0, int(v) - t // 2), max(0, int(v) - t // 2) + t) for v, t in zip(p, TRAIN_TILE))
            np.asarray(array[region])

    snapshot_s, painted = timed(lambda: find_painted(dense, shape))
    copy_s, kept = timed(dense.copy, rounds=1)  # into new memory: the session kept the last copy, as its strokes
    save_s, _ = timed(lambda: save_annotations(f"{work}/sparse.zarr", painted, grid))
    save_dense_s, _ = timed(lambda: save_annotations(f"{work}/dense.zarr", dense, grid))
    read_s, _ = timed(lambda: tiles(painted))
    read_dense_s, _ = timed(lambda: tiles(dense))
    shutil.rmtree(work, ignore_errors=True)
    print(f"labels of {'x'.join(map(str, shape))} ({dense.nbytes / 2**20:.0f} MiB), {sum(painted.counts.values())} "
          f"painted voxels: snapshot {snapshot_s:.3f} s (the dense layer's copy {copy_s:.3f} s); autosave of the "
          f"snapshot {save_s:.3f} s (of the dense layer {save_dense_s:.3f} s); label tiles of 100 steps from the "
          f"snapshot {read_s:.3f} s (from the dense layer {read_dense_s:.3f} s)")


def _painted(shape, seed=0) -> np.ndarray:
    """Labels of ``shape`` with 20 brush strokes a class (3 classes), 3 voxels wide and ~100 long."""
    rng = np.random.default_rng(seed)
    dense = np.zeros(shape, np.uint8)
    for k in (1, 2, 3):
        for _ in range(20):
            z, y, x = (int(rng.integers(0, max(1, n - 100))) for n in shape)
            dense[z, y:y + 3, x:x + 100] = k
    return dense


def _stand_in_volumes(shape):
    """A raw of ``shape`` (8 x 4 x 4 nm, random intensities) and a 64 nm context around it."""
    from napari_dinofuse.geometry import Volume

    rng = np.random.default_rng(0)
    raw = Volume(rng.integers(0, 255, shape, dtype=np.uint8), (8.0, 4.0, 4.0), name="raw")
    extent = np.array(shape) * raw.voxel_size
    context = Volume(rng.integers(0, 255, tuple(int(n) for n in extent // 64 + 16), dtype=np.uint8),
                     (64.0, 64.0, 64.0), (-512.0, -512.0, -512.0), name="context")
    return raw, context


def reads(args):
    from napari_dinofuse.defaults import TRAIN_TILE
    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import extract_sources
    from napari_dinofuse.progress import drive

    shape = args.volume or (32, 2048, 2048)
    volumes = _stand_in_volumes(shape)
    backbone = load_backbone(args.backbone, device=args.device)
    cache = FeatureCache(args.cache)
    stand_in_features(volumes, backbone, cache)
    source = drive(extract_sources(*volumes, backbone, cache))
    rng = np.random.default_rng(0)
    tiles = [tuple(slice(int(rng.integers(0, max(1, n - t + 1))) // a * a, None) for n, t, a in
                   zip(shape, TRAIN_TILE, (1, 16, 16))) for _ in range(21)]
    tiles = [tuple(slice(s.start, s.start + t) for s, t in zip(r, TRAIN_TILE)) for r in tiles]

    def tile(region):
        return source.tile(region, context=True, intensity=True, margin_nm=1024.0, device=args.device,
                           full_yx=tuple(r.stop - r.start for r in region[1:]), halo=(13, 13, 13))

    tile(tiles[0])
    start = time.perf_counter()
    for region in tiles[1:]:
        tile(region)
    per_tile = (time.perf_counter() - start) / (len(tiles) - 1)
    block = [min(n, b) // 16 for n, b in zip(shape[1:], (512, 512))]  # a prediction block's patches in y, x
    corners = [(y, x) for y in range(0, shape[1] // 16 - block[0] + 1, block[0])
               for x in range(0, shape[2] // 16 - block[1] + 1, block[1])][:5]
    seconds = []
    for y, x in corners:
        start = time.perf_counter()
        source.raw_features.read((slice(None), slice(y, y + block[0]), slice(x, x + block[1])))
        seconds.append(time.perf_counter() - start)
    print(f"feature reads, {backbone.spec} stand-ins of {'x'.join(map(str, shape))}: a training tile's inputs "
          f"{1000 * per_tile:.1f} ms ({TRAIN_TILE}, context and intensities included); the features of a block "
          f"of {shape[0]}x{16 * block[0]}x{16 * block[1]}: " + ", ".join(f"{s:.3f}" for s in seconds) + " s")


def first_step(args):
    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.progress import drive
    from napari_dinofuse.session import Session, SessionSettings

    shape = args.volume or (256, 1024, 1024)
    raw, context = _stand_in_volumes(shape)
    labels = _painted(shape)
    backbone = load_backbone(args.backbone, device=args.device)
    stand_in_features((raw, context), backbone, FeatureCache(args.cache))
    settings = SessionSettings(backbone=args.backbone, device=args.device, cache=args.cache,
                               base_channels=args.base_channels, iterations=2)
    session = Session()
    drive(session.fine_tune(raw, context, labels, settings, roi=tuple(slice(0, min(32, n)) for n in shape)))

    def until_first_step(start_model):
        session.model = start_model
        start = time.perf_counter()
        run = session.fine_tune(raw, context, labels, settings)
        for p in run:
            if "loss" in p.metrics:
                break
        seconds = time.perf_counter() - start
        run.close()
        return seconds

    trained = session.model
    new = [until_first_step(None) for _ in range(3)]
    continued = [until_first_step(trained) for _ in range(3)]
    print(f"Fine-tune -> first training step, {'x'.join(map(str, shape))} (features cached, base "
          f"{args.base_channels}, {args.device}): a new model " + ", ".join(f"{s:.2f}" for s in new)
          + " s; continuing one " + ", ".join(f"{s:.2f}" for s in continued) + " s")


def _inference_child(tile: str, args):
    from napari_dinofuse.inference.predict import predict_to_memory
    from napari_dinofuse.training.train import new_model

    _, source = _setup(args, raw_shape=(64, 256, 256))
    model = new_model(source, 4, base_channels=args.base_channels).eval()
    t = tuple(int(v) for v in tile.split(","))
    predict_to_memory(model, source, None, tile_shape=t, overlap=(8, 32, 32), block_shape=t, device=args.device)
    print(json.dumps({"rss_mib": _rss_mib()}))


def preview(args):
    from napari_dinofuse.features.backbone import resolve_device
    from napari_dinofuse.inference.predict import predict_to_memory
    from napari_dinofuse.progress import Preview, drive
    from napari_dinofuse.session import Session, SessionSettings
    from napari_dinofuse.synthetic.sample import make_sample

    sample = make_sample(seed=0)
    settings = SessionSettings(args.backbone, device=args.device, cache=args.cache, base_channels=args.base_channels,
                               iterations=args.iterations)
    shown = (slice(16, 17), slice(0, 256), slice(0, 256))  # the middle slice, all of it in view
    drive(Session().extract(sample.raw, sample.context, settings))  # features cached before either run
    # A short untimed Fine-tune first: the first run in a process pays for warming up (kernels, threads).
    drive(Session().fine_tune(sample.raw, sample.context, sample.scribbles(), replace(settings, iterations=4),
                              preview=shown))
    runs = {}
    for previewed in (False, True):
        session, steps, last = Session(), [], [time.perf_counter()]

        def timed(p):
            now = time.perf_counter()
            steps.append((p, now - last[0]))
            last[0] = now

        start = time.perf_counter()
        drive(session.fine_tune(sample.raw, sample.context, sample.scribbles(), settings,
                                preview=shown if previewed else None), timed)
        seconds = time.perf_counter() - start
        weights = b"".join(v.detach().cpu().numpy().tobytes() for v in session.model.state_dict().values())
        runs[previewed] = (session, steps, seconds, weights)
    session, steps, seconds, weights = runs[True]
    in_previews = sum(dt for p, dt in steps if "preview" in p.message)

    def step_ms(steps, after_preview=False):  # training steps' durations (those right after a preview, or all)
        return [1000 * dt for (p, dt), (before, _) in zip(steps[1:], steps) if "loss" in p.metrics
                and (not after_preview or isinstance(before.partial, Preview))]

    shown_previews = [p.partial for p, _ in steps if isinstance(p.partial, Preview)]
    region = shown_previews[0].sink.grids["labels"].shape if shown_previews else None
    print(f"Fine-tune -> prediction of the sample ({args.iterations} iterations, base {args.base_channels}, "
          f"{resolve_device(args.device)}): {runs[False][2]:.1f} s without previews, {seconds:.1f} s with "
          f"{len(shown_previews)} previews of {region} voxels ({in_previews:.1f} s in them, "
          f"{in_previews / len(shown_previews):.2f} s each; {seconds / runs[False][2]:.3f}x); weights "
          f"{'identical' if weights == runs[False][3] else 'DIFFERENT'}")
    print(f"  a training step: median {np.median(step_ms(runs[False][1])):.0f} ms without previews, "
          f"{np.median(step_ms(steps)):.0f} ms with; right after each preview "
          f"{', '.join(f'{ms:.0f}' for ms in step_ms(steps, after_preview=True))} ms")
    model, truth = session.model, sample.ground_truth[shown]
    final = predict_to_memory(model, session.source, shown, attention=False, device=args.device).arrays["labels"]
    model.class_prior.fill_(1 / model.config.num_classes)
    equal = predict_to_memory(model, session.source, shown, attention=False, device=args.device).arrays["labels"]

    def ious(labels):
        return "/".join(f"{((labels == k) & (truth == k)).sum() / max(1, ((labels == k) | (truth == k)).sum()):.3f}"
                        for k in range(1, model.config.num_classes + 1))

    for p in shown_previews:
        labels = p.sink.arrays["labels"]
        print(f"  after {p.iteration}/{p.iterations}: the preview's labels are the finished prediction's on "
              f"{100 * (labels == final).mean():.1f} % of the slice; IoU per class against the truth {ious(labels)}")
    print(f"  the finished prediction: IoU {ious(final)}; the finished model at equal class shares: IoU {ious(equal)}, "
          f"its labels on {100 * (equal == final).mean():.1f} % of the slice")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="all")
    parser.add_argument("extra", nargs="?")
    parser.add_argument("--backbone", default="random:vits16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", default=tempfile.mkdtemp())
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--volume", type=_ints, default=None,
                        help="inference, labels, first_step, reads: the volume's z,y,x shape (default 64,256,256; "
                             "labels and first_step 256,1024,1024; reads 32,2048,2048)")
    parser.add_argument("--block", type=_ints, default=PREDICT_BLOCK, help="inference: prediction block z,y,x")
    parser.add_argument("--tile", type=_ints, default=None,
                        help="inference: prediction tile z,y,x (default: the product's for the device)")
    parser.add_argument("--no-rss", dest="rss", action="store_false", help="inference: skip the peak RSS per tile")
    parser.add_argument("--profile", action="store_true", help="finetune: torch profiler over five warm steps")
    parser.add_argument("--ops", action="store_true", help="finetune: kernel-launching ops per step (any device)")
    parser.add_argument("--precision", choices=list(TRAIN_PRECISIONS), default="float32",
                        help="finetune: train in float32 (the default) or under bf16 autocast "
                             "(TrainConfig.mixed_precision)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the UNet channels-last on CUDA too (the CPU always does; to measure it there)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.channels_last:
        from napari_dinofuse.modeling import unet

        unet.CHANNELS_LAST_DEVICES.add("cuda")
    if args.what == "_projection_child":
        return _projection_child(args.extra, args.channels)
    if args.what == "_inference_child":
        return _inference_child(args.extra, args)
    for name, fn in (("projection", projection), ("finetune", finetune), ("inference", inference), ("labels", labels),
                     ("first_step", first_step), ("reads", reads), ("preview", preview)):
        if args.what in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
