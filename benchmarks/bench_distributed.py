"""Cluster benchmark (issue: dask.distributed). Run on demand:

    python benchmarks/bench_distributed.py [--backbone random:vits16] [--block 32,128,128] [--shape 64,256,256]

Predicts the same volume with the same model on a LocalCluster of 1 and of 2 worker processes (features
already in the shared cache, so this measures the prediction phase), and reports throughput, the speed-up,
and the scheduling overhead per block: wall time x workers minus the time tasks spent computing, per block.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.simplefilter("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="random:vits16")
    parser.add_argument("--shape", default="64,256,256")
    parser.add_argument("--block", default="32,128,128")
    parser.add_argument("--base-channels", type=int, default=8)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))

    from napari_dinofuse.distributed import VolumeRef, connect, prepare_job, run_blockwise
    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import extract_sources
    from napari_dinofuse.modeling.checkpoint import save_model
    from napari_dinofuse.progress import drive
    from napari_dinofuse.synthetic.sample import make_sample
    from napari_dinofuse.training.train import model_info, new_model

    work = Path(tempfile.mkdtemp())
    sample = make_sample(seed=0, raw_shape=shape)
    np.save(work / "raw.npy", np.asarray(sample.raw.data))
    np.save(work / "context.npy", np.asarray(sample.context.data))
    raw = VolumeRef(str(work / "raw.npy"), sample.raw.voxel_size, sample.raw.offset, name="raw")
    context = VolumeRef(str(work / "context.npy"), sample.context.voxel_size, sample.context.offset, name="context")
    backbone = load_backbone(args.backbone, device="cpu")
    cache = FeatureCache(work / "cache")
    source = drive(extract_sources(raw.open(), context.open(), backbone, cache))
    model = new_model(source, 4, base_channels=args.base_channels)
    save_model(work / "model", model, model_info(model, source))
    voxels = int(np.prod(shape))
    print(f"{args.backbone} features cached; volume {shape}, blocks {block}, UNet base {args.base_channels}")
    results = {}
    for workers in (1, 2):
        client = connect(workers=workers)
        job, extraction = prepare_job(raw, context, work / "model", work / f"out-{workers}.zarr", backbone, cache,
                                      tile_shape=(16, 64, 64), overlap=(8, 16, 16), block_shape=block, device="cpu")
        drive(run_blockwise(client, job, extraction))  # warm-up: workers import torch, load the model
        job, extraction = prepare_job(raw, context, work / "model", work / f"timed-{workers}.zarr", backbone, cache,
                                      tile_shape=(16, 64, 64), overlap=(8, 16, 16), block_shape=block, device="cpu")
        start = time.perf_counter()
        stats = drive(run_blockwise(client, job, extraction))
        wall = time.perf_counter() - start
        client.close()
        client.cluster.close()
        overhead = (wall * workers - stats["task_seconds"]) / stats["blocks"]
        results[workers] = wall
        print(f"{workers} worker(s): {stats['blocks']} blocks in {wall:.1f} s -> {voxels / wall / 1e6:.2f} Mvoxel/s; "
              f"in the model {stats['task_seconds'] / stats['blocks']:.2f} s/block, scheduling and I/O overhead "
              f"{overhead:.2f} s/block")
    print(f"speed-up 2 vs 1 worker: {results[1] / results[2]:.2f}x")


if __name__ == "__main__":
    main()
