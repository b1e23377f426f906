"""End-to-end GPU check: features extracted on CUDA (cached, fp16) match the CPU's, and a short fine-tune +
prediction runs on CUDA. Run on a GPU machine: python benchmarks/check_cuda_pipeline.py [--backbone random:vits16]"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="random:vits16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import compute_features, extract_sources
    from napari_dinofuse.inference.predict import predict_to_memory
    from napari_dinofuse.progress import drive
    from napari_dinofuse.synthetic.sample import make_sample
    from napari_dinofuse.training.train import TrainConfig, Trainer, new_model

    sample = make_sample(seed=0)
    feats = {}
    for device in ("cpu", args.device):
        backbone = load_backbone(args.backbone, device=device)
        entry = compute_features(sample.raw, backbone, FeatureCache(tempfile.mkdtemp()), batch_size=8)
        feats[device] = entry.read().astype(np.float32)
    a, b = feats["cpu"], feats[args.device]
    cos = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-12)
    print(f"pipeline features {args.device} vs cpu: shape {a.shape}, per-patch cosine min {cos.min():.5f} "
          f"mean {cos.mean():.5f} -> {'ok' if cos.min() > 0.99 else 'FAILED'}")

    backbone = load_backbone(args.backbone, device=args.device)
    source = drive(extract_sources(sample.raw, sample.context, backbone, FeatureCache(tempfile.mkdtemp())))
    labels = sample.scribbles(seed=0)
    model = new_model(source, int(labels.max()), base_channels=16, intensity_stem=True)
    start = time.perf_counter()
    trainer = Trainer(model, source, labels, TrainConfig(iterations=60, device=args.device, patience=1000))
    drive(trainer.run())
    sink = predict_to_memory(model, source, device=args.device)
    painted = labels > 0
    accuracy = (sink.arrays["labels"][painted] == labels[painted]).mean()
    print(f"fine-tune 60 it + whole-sample prediction on {args.device}: {time.perf_counter() - start:.1f} s, "
          f"painted-voxel accuracy {accuracy:.3f}, attention levels {sorted(k for k in sink.arrays if 'attention' in k)}")


if __name__ == "__main__":
    main()
