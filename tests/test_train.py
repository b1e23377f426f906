"""Fine-tuning on sparse painted labels."""

import numpy as np
import pytest
import torch

from napari_dinofuse.cache import FeatureCache
from napari_dinofuse.errors import InputError
from napari_dinofuse.features import FeatureSource, compute_features
from napari_dinofuse.progress import run_to_end
from napari_dinofuse.train import (
    TrainConfig,
    Trainer,
    adapt_classes,
    class_weights,
    find_painted,
    masked_loss,
    new_model,
)


@pytest.fixture(scope="module")
def sample():
    from napari_dinofuse.sample_data import make_sample

    return make_sample(seed=0, raw_shape=(16, 128, 128))


@pytest.fixture(scope="module")
def source(sample, tiny_backbone, tmp_path_factory):
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    return FeatureSource(sample.raw, compute_features(sample.raw, tiny_backbone, cache),
                         sample.context, compute_features(sample.context, tiny_backbone, cache))


def test_unpainted_voxels_never_enter_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 8, 8, requires_grad=True)
    labels = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    labels[0, 1, 2:5, 3] = 1
    labels[0, 2, 6, 1:7] = 3
    weights = torch.tensor([1.0, 2.0, 0.5])
    for dice in (0.0, 0.5):
        loss = masked_loss(logits, labels, weights, dice)
        (grad,) = torch.autograd.grad(loss, logits)
        # Whatever the network says on unpainted voxels, the loss and its gradient are unchanged.
        changed = logits.detach().clone()
        changed[:, :, labels[0] == 0] = torch.randn_like(changed[:, :, labels[0] == 0]) * 10
        changed.requires_grad_(True)
        loss2 = masked_loss(changed, labels, weights, dice)
        (grad2,) = torch.autograd.grad(loss2, changed)
        assert torch.allclose(loss, loss2)
        assert torch.allclose(grad, grad2)
        assert grad[:, :, labels[0] == 0].abs().max() == 0


def test_rarely_painted_classes_weigh_more(sample):
    painted = find_painted(sample.scribbles(seed=1), sample.raw.shape)
    weights = class_weights(painted)
    counts = painted.counts
    rare, common = min(counts, key=counts.get), max(counts, key=counts.get)
    assert weights[rare - 1] > weights[common - 1]


@pytest.mark.parametrize("make, message", [
    (lambda s: np.zeros(s, np.uint8), "no painted voxels"),
    (lambda s: _painted(s, {2: 10}), "only class 2 is painted"),
    (lambda s: np.zeros((s[0], s[1], s[2] + 1), np.uint8), "shape"),
    (lambda s: _painted(s, {1: 5, 2: 5}).astype(np.float32), "integers"),
    (lambda s: _painted(s, {1: 5, 2: 5}).astype(np.int16) - 2, "negative"),
])
def test_unusable_labels_are_refused_clearly(make, message):
    with pytest.raises(InputError, match=message):
        find_painted(make((4, 16, 16)), (4, 16, 16))


def _painted(shape, strokes):
    labels = np.zeros(shape, np.uint8)
    for k, n in strokes.items():
        labels[k % shape[0], k, :n] = k
    return labels


def test_small_model_fits_the_painted_voxels(sample, source):
    labels = sample.scribbles(seed=0)
    model = new_model(source, num_classes=4, base_channels=8, fusion="attention", intensity_stem=True)
    trainer = Trainer(model, source, labels, TrainConfig(iterations=120, tile_shape=(16, 64, 64),
                                                         learning_rate=3e-3, patience=1000))
    run_to_end(trainer.run())
    assert trainer.log[-1]["smoothed"] < trainer.log[0]["smoothed"] / 3
    region = (slice(0, 16), slice(0, 128), slice(0, 128))
    raw, ctx, image = source.tile(region, intensity=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(raw)[None], torch.from_numpy(ctx)[None], (16, 128, 128),
                       torch.from_numpy(image)[None]).logits
    prediction = logits.argmax(1)[0].numpy() + 1
    painted = labels > 0
    accuracy = (prediction[painted] == labels[painted]).mean()
    assert accuracy > 0.95, accuracy


def test_training_is_reproducible_and_cancel_keeps_the_best_weights(sample, source):
    labels = sample.scribbles(seed=0)
    config = TrainConfig(iterations=12, tile_shape=(16, 48, 48), seed=3)
    logs = []
    for _ in range(2):
        trainer = Trainer(new_model(source, 4, base_channels=4), source, labels, config)
        run_to_end(trainer.run())
        logs.append([entry["loss"] for entry in trainer.log])
    assert logs[0] == logs[1]

    model = new_model(source, 4, base_channels=4)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, source, labels, TrainConfig(iterations=50, tile_shape=(16, 48, 48)))
    run = trainer.run()
    for progress in run:
        if progress.done == 6:
            break
    run.close()  # Cancel
    assert len(trainer.log) == 6
    assert not model.training  # ready for inference
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_flat_loss_stops_early(sample, source):
    labels = sample.scribbles(seed=0)
    trainer = Trainer(new_model(source, 4, base_channels=4), source, labels,
                      TrainConfig(iterations=500, tile_shape=(16, 48, 48), learning_rate=0.0, patience=10,
                                  min_iterations=10))
    run_to_end(trainer.run())
    assert trainer.stopped_early and len(trainer.log) < 60


def test_new_classes_replace_only_the_head(source):
    model = new_model(source, 3, base_channels=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapt_classes(model, 5)
    assert model.config.num_classes == 5 and model.head.out_channels == 5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))


def test_fusion_needs_a_context(sample, tiny_backbone, tmp_path):
    raw_only = FeatureSource(sample.raw, compute_features(sample.raw, tiny_backbone, FeatureCache(tmp_path)))
    with pytest.raises(InputError, match="needs a context"):
        new_model(raw_only, 4, fusion="attention")
    assert new_model(raw_only, 4, fusion="none").config.fusion == "none"
