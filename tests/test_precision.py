"""Where models compute in bf16: inference on CUDA and on CPUs with bf16 instructions (or as $DINOFUSE_CPU_BF16
says); training in fp32 unless TrainConfig.mixed_precision asks for bf16 (continuing a model, the start model whose
calls it keeps runs as it predicts).

The rest of the suite runs in fp32 (conftest.py pins it, so results do not depend on the test machine's CPU);
these tests switch bf16 on."""

import copy
import warnings

import numpy as np
import pytest
import torch

from napari_dinofuse.defaults import CPU_BF16_ENV
from napari_dinofuse.features.backbone import RandomBackboneWarning, load_backbone
from napari_dinofuse.features.cache import FeatureCache
from napari_dinofuse.features.extract import FeatureSource, compute_features
from napari_dinofuse.inference.predict import predict_to_memory
from napari_dinofuse.precision import autocast, bf16_on, cpu_computes_bf16, training_autocast
from napari_dinofuse.progress import drive
from napari_dinofuse.training.train import TrainConfig, Trainer, new_model


def test_bf16_follows_the_device_the_cpu_and_the_setting(monkeypatch):
    assert bf16_on("cuda") and not bf16_on("mps")
    monkeypatch.delenv(CPU_BF16_ENV)
    assert bf16_on("cpu") == cpu_computes_bf16()  # detected: no setting
    for setting, on in (("1", True), ("0", False), (" 1 ", True)):
        monkeypatch.setenv(CPU_BF16_ENV, setting)
        assert bf16_on("cpu") is on
        with autocast("cpu"):
            assert torch.is_autocast_enabled("cpu") is on
        with training_autocast("cpu"):  # training: float32 unless mixed precision is asked for
            assert not torch.is_autocast_enabled("cpu")
        with training_autocast("cpu", mixed=True):
            assert torch.is_autocast_enabled("cpu") is on
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomBackboneWarning)
            backbone = load_backbone("random:tiny", device="cpu")  # precision "auto"
        assert backbone.precision == ("bf16" if on else "fp32")
        assert next(backbone.model.parameters()).dtype == (torch.bfloat16 if on else torch.float32)


@pytest.fixture(scope="module")
def sample_source(tiny_backbone, tmp_path_factory):
    from napari_dinofuse.synthetic.sample import make_sample

    sample = make_sample(seed=0, raw_shape=(16, 128, 128))
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    source = FeatureSource(sample.raw, compute_features(sample.raw, tiny_backbone, cache),
                           sample.context, compute_features(sample.context, tiny_backbone, cache))
    return sample, source


def test_on_a_bf16_cpu_training_stays_fp32_unless_asked_and_predictions_call_what_fp32_calls(sample_source,
                                                                                              monkeypatch):
    """bf16 on a CPU is for speed only: training (which bf16 would change) runs in fp32 unless mixed precision is
    asked for; the start model whose calls continued training keeps, the class shares' estimate and the held-out
    strokes' scoring run as the model predicts; and the trained model's prediction in bf16 gives the labels fp32
    gives (checked on the first convolution: what really ran)."""
    sample, source = sample_source
    labels = sample.scribbles(seed=0)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    torch.manual_seed(0)
    model = new_model(source, num_classes=4, base_channels=8, fusion="attention")
    seen = []  # (dtype, whether it computed gradients) of each forward pass
    hook = model.encoders[0][0].register_forward_hook(lambda m, i, out: seen.append((out.dtype, out.requires_grad)))

    def dtypes():
        return {dtype for dtype, _ in seen}

    trainer = Trainer(model, source, labels, TrainConfig(iterations=60, learning_rate=3e-3, validation_share=0,
                                                         augment=False, device="cpu"))
    run = trainer.run()
    steps = next(list(seen) for progress in run if "estimating" in progress.message)
    drive(run)
    assert set(steps) == {(torch.float32, True)}, steps
    # the class shares are estimated from the posteriors they will correct: as predicted (bf16)
    assert set(seen[len(steps):]) == {(torch.bfloat16, False)}, seen[len(steps):]
    assert trainer.log[-1]["smoothed"] < trainer.log[0]["smoothed"] / 2, trainer.log[-1]
    seen.clear()  # held-out strokes are scored as the model will predict, too
    held_out = Trainer(model, source, labels, TrainConfig(validation_share=0.3, device="cpu"))
    assert held_out.validation_tiles and held_out.validate() is not None
    assert dtypes() == {torch.bfloat16}, seen
    seen.clear()  # asked for, mixed precision trains in bf16 (a few steps of the trained model)
    drive(Trainer(copy.deepcopy(model), source, labels,  # the copy keeps the hook
                  TrainConfig(iterations=3, validation_share=0, device="cpu", mixed_precision=True)).run())
    assert dtypes() == {torch.bfloat16}, seen
    for mixed, trains_in in ((False, torch.float32), (True, torch.bfloat16)):
        seen.clear()  # continuing: the model trains in fp32 unless asked, the start model's calls it keeps come as
        continued = Trainer(copy.deepcopy(model), source, labels,  # predicted (bf16)
                            TrainConfig(iterations=3, validation_share=0, device="cpu", mixed_precision=mixed),
                            continues=True).run()
        steps = next(list(seen) for progress in continued if "estimating" in progress.message)
        assert set(steps) == {(trains_in, True), (torch.bfloat16, False)}, (mixed, steps)
        continued.close()

    seen.clear()
    fast = predict_to_memory(model, source, device="cpu").arrays
    assert dtypes() == {torch.bfloat16}
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    seen.clear()
    exact = predict_to_memory(model, source, device="cpu").arrays
    assert dtypes() == {torch.float32}
    hook.remove()

    painted = labels > 0
    assert (np.asarray(fast["labels"])[painted] == labels[painted]).mean() > 0.9
    agree = (np.asarray(fast["labels"]) == np.asarray(exact["labels"])).mean()
    diff = np.abs(np.asarray(fast["probabilities"], np.float32) - np.asarray(exact["probabilities"], np.float32))
    assert agree > 0.99 and diff.mean() < 0.01, (agree, diff.mean())
