"""Feature extraction benchmarks (issue: chunked extraction + cache). Run on demand:

    python benchmarks/bench_features.py [--backbone random:vits16] [--device auto] [--slices 24] [--size 512]
                                        [--precision auto|fp32|bf16|autocast] [--no-rss] [--compile] [--hits-only]

Prints ratios measured side by side in one run:
- pipeline throughput / bare backbone forward (slices already on the device, features left there) on the same
  slices and batch size (goal >= 0.95);
- first extraction time / second extraction (cache hit: the input known by its files' sizes and times and a few
  chunks, changed feature chunks re-checksummed) (goal >= 200x), and a third that reads the whole input and
  re-checksums every unit (verify="all"), for reference;
- peak RSS for a volume 8x larger / the smaller one, each in a fresh process (goal <= 1.3x; --no-rss skips it);
- bytes on disk per voxel vs full-resolution fp32 features.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _zarr_volume(path: Path, slices: int, size: int):
    import zarr

    array = zarr.create_array(str(path), shape=(slices, size, size), chunks=(1, size, size), dtype="uint8")
    rng = np.random.default_rng(0)
    for z in range(slices):  # EM-like: smooth blobs plus noise, written slice by slice
        base = rng.normal(128, 30, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
        array[z] = np.clip(base + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
    # Dated like any dataset on disk: files written within the last 2 s are not trusted to identify the input.
    for file in path.rglob("*"):
        os.utime(file, (time.time() - 60, time.time() - 60))
    return array


def _peak_rss_child(args) -> None:
    """Run one extraction and print the peak resident memory (MiB) of this process."""
    import resource

    import zarr

    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import compute_features
    from napari_dinofuse.geometry import Volume

    warnings.simplefilter("ignore")
    backbone = load_backbone(args.backbone, device=args.device, precision=args.precision)
    volume = Volume(zarr.open_array(args.child, mode="r"), voxel_size=(8.0, 4.0, 4.0))
    compute_features(volume, backbone, FeatureCache(tempfile.mkdtemp()), batch_size=args.batch_size)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def stand_in_features(volumes, backbone, cache) -> None:
    """Cache entries for ``volumes`` filled with random features: the files and markers an extraction leaves,
    without running the ViT (also used by bench_model.py)."""
    from napari_dinofuse.features.extract import open_entry

    rng = np.random.default_rng(0)
    for volume in volumes:
        entry = open_entry(volume, backbone, cache)
        unit = rng.normal(size=entry.shape[:1] + entry.shape[2:]).astype(np.float16)
        for z in range(volume.shape[0]):
            entry.write_units("xy", [z], [unit])
        entry.verify("xy")  # folds the markers, as the end of an extraction does
    time.sleep(2.5)  # files younger than 2 s are not trusted: let them age as any cache does


def _hits_only(args, rounds: int = 5) -> None:
    """The host cost of a cache hit alone: an entry for a zarr volume of ``--slices`` slices, its units filled with
    stand-in features (the files and markers an extraction leaves, without running the ViT), then found again."""
    import zarr

    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import extract_features
    from napari_dinofuse.geometry import Volume
    from napari_dinofuse.progress import drive

    warnings.simplefilter("ignore")
    backbone = load_backbone(args.backbone, device=args.device)
    work = Path(tempfile.mkdtemp())
    _zarr_volume(work / "raw.zarr", args.slices, args.size)
    volume = Volume(zarr.open_array(str(work / "raw.zarr"), mode="r"), voxel_size=(8.0, 4.0, 4.0), name="bench")
    cache = FeatureCache(work / "cache")
    stand_in_features([volume], backbone, cache)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        drive(extract_features(volume, backbone, cache))
        seconds.append(time.perf_counter() - start)
    print(f"cache hit of {args.slices} slices of {args.size}^2 ({backbone.spec}): "
          + ", ".join(f"{1000 * s:.1f}" for s in seconds) + " ms (the first one in a fresh process)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="random:vits16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--memory-slices", type=int, default=8, help="small volume of the RSS test (x8 for large)")
    parser.add_argument("--precision", default="auto", help="backbone precision: auto, fp32, bf16, autocast")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS test (two more processes)")
    parser.add_argument("--compile", action="store_true", help="run the backbone through torch.compile")
    parser.add_argument("--hits-only", action="store_true",
                        help="only time cache hits, of an entry filled with stand-in features (no ViT: seconds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _peak_rss_child(args)
    if args.hits_only:
        return _hits_only(args)

    import torch

    from napari_dinofuse.features.backbone import load_backbone, to_unit_range
    from napari_dinofuse.features.cache import FeatureCache, format_bytes
    from napari_dinofuse.features.extract import extract_features, writer_threads
    from napari_dinofuse.geometry import Volume
    from napari_dinofuse.progress import drive

    warnings.simplefilter("ignore")
    start = time.perf_counter()
    backbone = load_backbone(args.backbone, device=args.device, precision=args.precision, compile=args.compile)
    loading = time.perf_counter() - start
    args.batch_size = args.batch_size or (16 if backbone.device.type == "cuda" else 4)
    print(f"{backbone.describe()}; {args.slices} slices of {args.size}^2, batch {args.batch_size}", flush=True)
    work = Path(tempfile.mkdtemp())
    data = _zarr_volume(work / "raw.zarr", args.slices, args.size)
    volume = Volume(data, voxel_size=(8.0, 4.0, 4.0), name="bench")

    def sync():
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()

    # Bare forward: slices already normalised on the device, features left there: what the device alone can do.
    slices = to_unit_range(np.asarray(data[:]), 0, 255).to(backbone.device)
    backbone.patch_features(slices[: args.batch_size])  # warm-up (and compiling, for --compile)
    sync()
    start = time.perf_counter()
    for b in range(0, args.slices - args.batch_size + 1, args.batch_size):  # whole batches only
        backbone.patch_features(slices[b:b + args.batch_size])
    sync()
    bare = time.perf_counter() - start
    bare_slices = args.slices // args.batch_size * args.batch_size
    del slices

    # Time the writer thread's share (data + markers), to tell a disk-bound pipeline from a device-bound one.
    from napari_dinofuse.features.cache import FeatureEntry

    writing = [0.0]
    write_units = FeatureEntry.write_units

    def timed_write_units(self, *a, **kw):
        t = time.perf_counter()
        write_units(self, *a, **kw)
        writing[0] += time.perf_counter() - t

    FeatureEntry.write_units = timed_write_units
    cache = FeatureCache(work / "cache")
    start = time.perf_counter()
    entry = drive(extract_features(volume, backbone, cache, batch_size=args.batch_size))
    sync()
    first = time.perf_counter() - start
    FeatureEntry.write_units = write_units
    start = time.perf_counter()
    drive(extract_features(volume, backbone, cache, batch_size=args.batch_size))
    second = time.perf_counter() - start
    start = time.perf_counter()
    drive(extract_features(volume, backbone, cache, batch_size=args.batch_size, verify="all"))
    third = time.perf_counter() - start

    voxels = int(np.prod(volume.shape))
    disk = entry.nbytes_on_disk()
    full_fp32 = voxels * backbone.embed_dim * 4

    rss = {}
    for label, n in () if args.no_rss else (("small", args.memory_slices), ("large", 8 * args.memory_slices)):
        path = work / f"mem-{label}.zarr"
        _zarr_volume(path, n, args.size)
        out = subprocess.run([sys.executable, __file__, "--child", str(path), "--backbone", args.backbone,
                              "--device", args.device, "--size", str(args.size), "--precision", args.precision,
                              "--batch-size", str(args.batch_size)],
                             check=False, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"RSS child ({label}) failed with exit code {out.returncode}:\n{out.stderr[-4000:]}")
        rss[label] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    print(f"backbone load {loading:.2f} s (the weights' hash included), once per loaded backbone (not in the "
          "pipeline time)")
    print(f"bare backbone      : {bare_slices / bare:8.2f} slices/s (on-device slices in, features left there)")
    ratio = args.slices / first * bare / bare_slices
    print(f"extraction pipeline: {args.slices / first:8.2f} slices/s  -> ratio {ratio:.2f} "
          f"of bare (goal >= 0.95); {writer_threads()} writer threads busy {writing[0]:.2f} s in all "
          f"({1000 * writing[0] / args.slices:.1f} ms/slice)")
    print(f"cache hit          : {second:8.3f} s vs {first:.2f} s -> {first / second:.0f}x faster (goal >= 200x)")
    print(f"cache hit, verify=all: {third:6.3f} s (the input and every unit re-read) -> {first / third:.0f}x")
    if rss:
        print(f"peak RSS           : {rss['small']:.0f} MiB ({args.memory_slices} slices) vs {rss['large']:.0f} MiB "
              f"({8 * args.memory_slices} slices) -> {rss['large'] / rss['small']:.2f}x (goal <= 1.3x)")
    print(f"disk               : {disk / voxels:.3f} B/voxel ({format_bytes(disk)}) vs full-resolution fp32 "
          f"{backbone.embed_dim * 4} B/voxel ({format_bytes(full_fp32)}) -> {full_fp32 / disk:.0f}x smaller")


if __name__ == "__main__":
    main()
