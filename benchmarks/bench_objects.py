"""Objects and measurements: throughput and memory, blockwise vs the whole volume in memory. Run on demand:

    python benchmarks/bench_objects.py [--scales 1,8] [--block 64,256,256] [--split 20]

Builds prediction folders from the synthetic sample's ground truth, mirrored into 1x and 8x the base volume
(32 x 512 x 512 voxels, 4 classes, with probabilities and uncertainty, as `dinofuse predict` writes them), then
runs, each in a fresh process so peak memory is its own:
* ``blockwise``: `objects_in_prediction` (what `dinofuse instances` runs), reading one block at a time;
* ``in memory``: the naive baseline: read the whole class map, `scipy.ndimage.label` each class, count voxels
  and mean probability with `ndimage` on the whole arrays (no holes filled, no split, no surfaces).
Prints Mvoxel/s and peak RSS side by side; the blockwise peak should stay flat from 1x to 8x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASE = (32, 512, 512)
CLASSES = (2, 3, 4)


def _write_prediction(path: Path, scale: int) -> tuple[int, ...]:
    from napari_dinofuse.geometry import Grid
    from napari_dinofuse.inference.outputs import ZarrSink
    from napari_dinofuse.synthetic.sample import make_sample

    sample = make_sample(seed=0)
    truth = sample.ground_truth
    factors = {1: (1, 1, 1), 8: (2, 2, 2), 27: (3, 3, 3), 64: (4, 4, 4)}[scale]
    shape = tuple(b * f for b, f in zip(BASE, factors))
    sink = ZarrSink(path, chunks=(32, 256, 256))
    grid = Grid(shape, sample.raw.voxel_size, sample.raw.offset)
    sink.create("labels", shape, np.uint8, grid)
    sink.create("probabilities", (4, *shape), np.float16, grid)
    sink.create("uncertainty", shape, np.float16, grid)
    tile = truth.shape
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], tile[0]):  # mirrored tiles: objects continue across tile borders
        for y in range(0, shape[1], tile[1]):
            for x in range(0, shape[2], tile[2]):
                part = truth[:: (-1) ** (z // tile[0]), :: (-1) ** (y // tile[1]), :: (-1) ** (x // tile[2])]
                region = (slice(z, z + tile[0]), slice(y, y + tile[1]), slice(x, x + tile[2]))
                sink.write("labels", region, part)
                probs = np.eye(4, dtype=np.float16)[part - 1].transpose(3, 0, 1, 2) * 0.7 + 0.075
                sink.write("probabilities", region, probs.astype(np.float16))
                sink.write("uncertainty", region, rng.random(part.shape, np.float32).astype(np.float16))
    sink.set_info(class_names=list(sample.class_names))
    sink.finish()
    return shape


def _run_blockwise(path: str, block: tuple[int, ...], split: float) -> dict:
    from napari_dinofuse.inference.instances import ObjectSettings, objects_in_prediction
    from napari_dinofuse.progress import drive

    start = time.perf_counter()
    table = drive(objects_in_prediction(path, ObjectSettings(CLASSES, split_depth_nm=split), block_shape=block))
    return {"seconds": time.perf_counter() - start, "objects": len(table)}


def _run_in_memory(path: str) -> dict:
    import zarr
    from scipy import ndimage

    start = time.perf_counter()
    root = zarr.open_group(path, mode="r")
    labels = root["labels/0"][:]
    probabilities = root["probabilities/0"]
    count = 0
    for cls in CLASSES:
        objects, n = ndimage.label(labels == cls)
        index = np.arange(1, n + 1)
        ndimage.sum_labels(np.ones_like(labels, np.uint8), objects, index)
        ndimage.mean(probabilities[cls - 1].astype(np.float32), objects, index)
        count += n
    return {"seconds": time.perf_counter() - start, "objects": count}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args) -> None:
    if args.child == "blockwise":
        result = _run_blockwise(args.path, tuple(args.block), args.split)
    else:
        result = _run_in_memory(args.path)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="1,8", help="volume multiples of 32x512x512 (1, 8, 27 or 64)")
    parser.add_argument("--block", default="64,256,256")
    parser.add_argument("--split", type=float, default=0.0, help="split depth in nm (0: no splitting)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.block = [int(v) for v in args.block.split(",")]
    if args.child:
        return _child(args)

    print(f"objects of classes {CLASSES}, block {args.block}, split {args.split} nm; fill holes on (blockwise)")
    print(f"{'volume':>16} {'method':>10} {'seconds':>8} {'Mvoxel/s':>9} {'peak RSS MB':>12} {'objects':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (int(s) for s in args.scales.split(",")):
            path = Path(tmp) / f"pred{scale}.zarr"
            shape = _write_prediction(path, scale)
            voxels = int(np.prod(shape))
            for method in ("blockwise", "in-memory"):
                command = [sys.executable, __file__, "--child", method, "--path", str(path),
                           "--block", ",".join(map(str, args.block)), "--split", str(args.split)]
                result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True)
                                    .stdout.strip().splitlines()[-1])
                print(f"{'x'.join(map(str, shape)):>16} {method:>10} {result['seconds']:8.1f} "
                      f"{voxels / result['seconds'] / 1e6:9.2f} {result['peak_rss_mb']:12.0f} "
                      f"{result['objects']:8d}", flush=True)


if __name__ == "__main__":
    main()
