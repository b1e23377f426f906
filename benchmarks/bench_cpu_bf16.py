"""bf16 against fp32 on this CPU, in one run (run on demand):

    python benchmarks/bench_cpu_bf16.py [--threads 2] [--rounds 2]

Inference computes in bf16 on a CPU with bf16 instructions (napari_dinofuse.precision); this prints, for each
precision and round, through the engine's own paths: the ViT-S/16's slices/s on 512^2 slices (random weights)
and its features' cosine to fp32's; a prediction of the 32x256x256 sample (base 16, a model trained for 20 steps)
and how many labels it shares with fp32's; warm training steps on the sample, in fp32 and with
TrainConfig.mixed_precision (bf16: off by default, docs/benchmarks.md 2026-12-07 late morning says why); warm
steps continuing that model, whose start model (the calls the keep term holds) runs at the predictions' precision
(the default). Ratios fp32 time / bf16 time last.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from dataclasses import replace

import numpy as np
import torch

warnings.simplefilter("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from napari_dinofuse.defaults import CPU_BF16_ENV
    from napari_dinofuse.features.backbone import load_backbone
    from napari_dinofuse.features.cache import FeatureCache
    from napari_dinofuse.features.extract import extract_sources
    from napari_dinofuse.inference.predict import predict_to_memory
    from napari_dinofuse.precision import cpu_computes_bf16
    from napari_dinofuse.progress import drive
    from napari_dinofuse.synthetic.sample import make_sample
    from napari_dinofuse.training.train import TrainConfig, Trainer, new_model

    print(f"torch {torch.__version__}, {args.threads} threads; this CPU has bf16 instructions: {cpu_computes_bf16()}")
    sample = make_sample(seed=0)
    slices = torch.rand(4, 512, 512)
    times: dict[tuple[str, str], list[float]] = {}

    def warm_step(trainer) -> float:
        """Seconds per training step, steps 3-12."""
        steps = trainer.run()
        next(steps), next(steps)
        start = time.perf_counter()
        for _ in range(10):
            next(steps)
        seconds = (time.perf_counter() - start) / 10
        steps.close()
        return seconds

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[CPU_BF16_ENV] = "0"
        source = drive(extract_sources(sample.raw, sample.context, load_backbone("random:vits16", device="cpu"),
                                       FeatureCache(tmp)))
        torch.manual_seed(0)
        model = new_model(source, 4)
        drive(Trainer(model, source, sample.scribbles(), TrainConfig(iterations=20, device="cpu")).run())
        reference = {}
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                os.environ[CPU_BF16_ENV] = "1" if precision == "bf16" else "0"
                backbone = load_backbone("random:vits16", device="cpu")
                backbone.patch_features(slices[:1])
                start = time.perf_counter()
                features = backbone.patch_features(slices)
                vit = time.perf_counter() - start
                start = time.perf_counter()
                labels = np.asarray(predict_to_memory(model, source, device="cpu").arrays["labels"])
                predict = time.perf_counter() - start
                config = TrainConfig(iterations=12, validation_share=0, device="cpu")
                step = warm_step(Trainer(copy.deepcopy(model), source, sample.scribbles(),
                                         replace(config, mixed_precision=precision == "bf16")))
                continuing = warm_step(Trainer(copy.deepcopy(model), source, sample.scribbles(), config,
                                               continues=True))
                reference.setdefault("features", features)
                reference.setdefault("labels", labels)
                cosine = torch.nn.functional.cosine_similarity(features, reference["features"], dim=1).min()
                agree = (labels == reference["labels"]).mean()
                print(f"{precision}: ViT-S/16 {len(slices) / vit:.2f} slices/s (cosine to fp32 >= {cosine:.5f}); "
                      f"prediction of {sample.raw.shape} {predict:.1f} s ({100 * agree:.2f} % of labels as fp32's); "
                      f"a warm training step {1000 * step:.0f} ms, continuing {1000 * continuing:.0f} ms", flush=True)
                for name, value in (("vit", vit), ("predict", predict), ("step", step), ("continuing", continuing)):
                    times.setdefault((name, precision), []).append(value)
    ratio = {name: np.median(times[(name, "fp32")]) / np.median(times[(name, "bf16")])
             for name in ("vit", "predict", "step", "continuing")}
    print(f"bf16 speed-up (median fp32 time / bf16 time): ViT {ratio['vit']:.2f}x, prediction {ratio['predict']:.2f}x, "
          f"training step (mixed precision, not the default) {ratio['step']:.2f}x, continuing step (the start model "
          f"at the predictions' precision, the default) {ratio['continuing']:.2f}x")


if __name__ == "__main__":
    main()
