"""Fine-tuning on sparse painted labels."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from napari_dinofuse.errors import InputError
from napari_dinofuse.features.backbone import to_unit_range
from napari_dinofuse.features.cache import FeatureCache
from napari_dinofuse.features.extract import FeatureSource, compute_features
from napari_dinofuse.geometry import resample
from napari_dinofuse.inference.predict import predict_to_memory
from napari_dinofuse.progress import drive
from napari_dinofuse.training.finetune import NewModel, StartModel, fine_tune
from napari_dinofuse.training.train import (
    TrainConfig,
    Trainer,
    adapt_classes,
    augment,
    class_weights,
    correction_power,
    edge_smoothness,
    estimate_class_prior,
    find_painted,
    keep_loss,
    keep_mask,
    masked_loss,
    new_model,
    split_strokes,
    temper_class_prior,
)


@pytest.fixture(scope="module")
def sample():
    from napari_dinofuse.synthetic.sample import make_sample

    return make_sample(seed=0, raw_shape=(16, 128, 128))


@pytest.fixture(scope="module")
def source(sample, tiny_backbone, tmp_path_factory):
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    return FeatureSource(sample.raw, compute_features(sample.raw, tiny_backbone, cache),
                         sample.context, compute_features(sample.context, tiny_backbone, cache))


def test_unpainted_voxels_never_enter_the_strokes_loss():
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


def test_the_edge_term_is_least_where_the_classes_part_on_the_images_edge():
    """The strokes never say where a class ends; the edge term prefers the image's edge to a cut through an even
    region, whatever the image's contrast and brightness."""
    rng = np.random.default_rng(0)
    image = np.where(np.arange(16) < 8, 0.3, 0.7) + rng.normal(0, 0.03, (2, 1, 4, 16, 16))
    image = torch.from_numpy(image).float()

    def split_at(x):  # confident class 0 left of x, class 1 from x on
        logits = torch.zeros(2, 2, 4, 16, 16)
        logits[:, 0, ..., :x] = logits[:, 1, ..., x:] = 8.0
        return logits

    on_edge, off_edge = edge_smoothness(split_at(8), image), edge_smoothness(split_at(5), image)
    assert on_edge < 0.05 * off_edge, (on_edge, off_edge)
    assert torch.allclose(edge_smoothness(split_at(5), image * 3 + 1), off_edge)
    assert edge_smoothness(torch.zeros(2, 2, 4, 16, 16).index_fill_(1, torch.tensor([0]), 16.0), image) < 1e-5
    unsure = edge_smoothness(torch.zeros(2, 2, 4, 16, 16), image)  # 50:50 everywhere: as bad as a cut anywhere
    assert unsure > off_edge
    # A tile counts only while the model calls its strokes right: the term never argues with the strokes.
    strokes = torch.zeros(2, 4, 16, 16, dtype=torch.uint8)
    strokes[..., 0], strokes[..., 15] = 1, 2  # both called right by split_at(5)
    assert torch.allclose(edge_smoothness(split_at(5), image, strokes), off_edge)
    strokes[1, ..., 15] = 1  # tile 1: half its painted voxels called wrong
    logits = split_at(5).requires_grad_()
    gated = edge_smoothness(logits, image, strokes)
    assert torch.allclose(gated, edge_smoothness(split_at(5)[:1], image[:1]) / 2)
    gated.backward()  # the gate decides which tiles count; the counted ones still train
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0


def test_class_shares_are_estimated_from_the_posteriors_of_a_model_trained_on_equal_shares():
    """The prior correction's estimate: 1D Gaussian classes with shares 90 / 7 / 3 %, posteriors as a model
    trained on equal shares gives them. The estimate moves most of the way from equal shares to the truth."""
    rng = np.random.default_rng(0)
    shares, centres = np.array([0.9, 0.07, 0.03]), np.array([-2.0, 0.0, 2.0])
    x = rng.normal(centres[rng.choice(3, 200_000, p=shares)], 1.0)
    likelihood = np.exp(-0.5 * (x[None] - centres[:, None]) ** 2)
    estimate = estimate_class_prior(likelihood / likelihood.sum(0))
    assert estimate.sum() == pytest.approx(1) and np.all(np.argsort(estimate) == np.argsort(shares))
    assert np.abs(estimate - shares).max() < 0.35 * np.abs(1 / 3 - shares).max()
    only_first = estimate_class_prior(np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert only_first.min() > 5e-4  # a class the sample missed is not ruled out


def _called(posteriors, prior):
    return np.bincount(np.argmax(posteriors * prior[:, None], 0), minlength=len(prior)) / posteriors.shape[1]


def test_the_share_correction_is_kept_for_sure_posteriors_and_softened_where_it_would_erase_a_class():
    rng = np.random.default_rng(0)
    # Sure posteriors (the Gaussian classes above, and a third class nobody's voxels show): kept as estimated.
    shares, centres = np.array([0.9, 0.1, 0.0]), np.array([-2.0, 2.0, 30.0])
    x = rng.normal(centres[rng.choice(3, 100_000, p=shares)], 1.0)
    likelihood = np.exp(-0.5 * (x[None] - centres[:, None]) ** 2)
    posteriors = likelihood / likelihood.sum(0)
    estimate = estimate_class_prior(posteriors)
    assert correction_power(posteriors, estimate) == 1
    # A rare class the uncorrected model over-predicts (on 24 % of the voxels: 4 % sure, 20 % unsure): the full
    # correction cuts it to its sure 4 %, as it should, and is kept.
    kind = rng.choice(3, 100_000, p=[0.76, 0.2, 0.04])
    posteriors = np.array([[0.95, 0.45, 0.1], [0.05, 0.55, 0.9]])[:, kind]
    estimate = estimate_class_prior(posteriors)
    assert _called(posteriors, estimate)[1] == pytest.approx(0.04, abs=0.005)
    assert correction_power(posteriors, estimate) == 1

    # Unsure posteriors: 80 % background (0.8 / 0.2), 20 % membrane called so at 0.65 / 0.35. Corrected with
    # the estimated shares (71 / 29 %), no voxel is membrane any more; softened, the membrane voxels stay.
    membrane = rng.random(100_000) < 0.2
    posteriors = np.where(membrane, [[0.35], [0.65]], [[0.8], [0.2]]) + rng.normal(0, 0.01, (2, 100_000))
    estimate = estimate_class_prior(posteriors)
    assert _called(posteriors, estimate)[1] == 0  # what the plain correction does
    tempered = temper_class_prior(estimate, correction_power(posteriors, estimate))
    assert tempered.sum() == pytest.approx(1) and tempered[0] > tempered[1]  # still towards background
    assert _called(posteriors, tempered)[1] >= 0.5 * min(estimate[1], membrane.mean())


def test_the_share_correction_is_softened_where_it_would_overrule_the_strokes():
    """A thin class called right before the correction, half of it surely (0.97) and half less so (0.8, as models
    trained anew on correction strokes had it): the full correction keeps half of it (no erasure: the share rule
    alone keeps it), but calls half of its painted voxels background. The strokes soften it; strokes on the sure
    part, or too few to judge, leave it."""
    rng = np.random.default_rng(0)
    kind = rng.choice(3, 100_000, p=[0.95, 0.025, 0.025])  # background, sure membrane, unsure membrane
    posteriors = np.array([[0.97, 0.03, 0.2], [0.03, 0.97, 0.8]])[:, kind] + rng.normal(0, 0.005, (2, 100_000))
    estimate = estimate_class_prior(posteriors)
    assert 0.4 < _called(posteriors, estimate)[1] / 0.05 < 0.6  # half of the membrane kept
    assert correction_power(posteriors, estimate) == 1

    def strokes(kinds, n=200):
        voxels = np.flatnonzero(np.isin(kind, kinds))[:n]
        return posteriors[:, voxels], np.where(kind[voxels] == 0, 1, 2)

    def recall(prior, painted, classes):
        return np.mean(np.argmax(painted * prior[:, None], 0)[classes == 2] == 1)

    painted, classes = strokes([0, 1, 2], 4000)  # background and both kinds of membrane painted
    assert recall(estimate, painted, classes) < 0.6
    tempered = temper_class_prior(estimate, correction_power(posteriors, estimate, painted, classes))
    assert tempered[0] > tempered[1] > estimate[1]  # softened, still towards background
    assert recall(tempered, painted, classes) >= 0.9
    assert correction_power(posteriors, estimate, *strokes([0, 1], 4000)) == 1
    few = strokes([2], 10)
    assert correction_power(posteriors, estimate, *few, min_stroke_voxels=20) == 1
    assert correction_power(posteriors, estimate, *few, min_stroke_voxels=5) < 1


def test_the_shares_are_estimated_on_random_tiles_and_checked_on_the_strokes(sample, source, monkeypatch):
    """On a volume of many tiles: the shares come from PRIOR_TILES random tiles only (strokes are not a random
    sample of the volume), the check against the strokes also reads the STROKE_TILES tiles holding the most."""
    from napari_dinofuse.inference.tiling import iter_blocks
    from napari_dinofuse.training import train

    monkeypatch.setattr(train.defaults, "PRIOR_TILE", (8, 32, 32))  # 32 tiles of this volume
    monkeypatch.setattr(Trainer, "PRIOR_TILES", 2)
    monkeypatch.setattr(Trainer, "STROKE_TILES", 3)
    seen = {}

    def spy(posteriors, prior, stroke_posteriors, stroke_classes, **kwargs):
        seen.update(voxels=posteriors.shape[1], strokes=np.bincount(stroke_classes, minlength=5)[1:])
        return correction_power(posteriors, prior, stroke_posteriors, stroke_classes, **kwargs)

    monkeypatch.setattr(train, "correction_power", spy)
    labels = sample.scribbles(seed=0)
    trainer = Trainer(new_model(source, 4, base_channels=4), source, labels, TrainConfig(iterations=1, seed=5))
    shares = trainer.estimate_prior(torch.device("cpu"))
    assert torch.allclose(trainer.model.class_prior, torch.from_numpy(shares).float())
    np.testing.assert_allclose(shares, temper_class_prior(trainer.shares, trainer.correction_power))
    assert trainer.shares.sum() == pytest.approx(1)

    blocks = [b.core for b in iter_blocks(labels.shape, (8, 32, 32))]
    sampled = np.random.default_rng(5 + 2).choice(len(blocks), 2, replace=False)
    assert seen["voxels"] == sum(np.prod([s.stop - s.start for s in blocks[i]]) for i in sampled)
    painted = [np.bincount(labels[b].ravel(), minlength=5)[1:] for b in blocks]
    others = sorted((i for i in range(len(blocks)) if i not in sampled), key=lambda i: -painted[i].sum())[:3]
    expected = sum(painted[i] for i in [*sampled, *others])
    assert expected.sum() < (labels > 0).sum()  # some strokes lie elsewhere: the check is bounded
    np.testing.assert_array_equal(seen["strokes"], expected)


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
    model = new_model(source, num_classes=4, base_channels=8, fusion="attention")
    trainer = Trainer(model, source, labels, TrainConfig(iterations=120, learning_rate=3e-3, validation_share=0,
                                                         augment=False))
    drive(trainer.run())
    assert trainer.log[-1]["smoothed"] < trainer.log[0]["smoothed"] / 2  # measured 0.36
    region = (slice(0, 16), slice(0, 128), slice(0, 128))
    inputs = source.tile(region, intensity=True, halo=model.intensity_halo)
    shares = model.class_prior.clone()
    with torch.no_grad():
        logits = model(inputs.raw, inputs.context, (16, 128, 128), inputs.intensity).logits
        model.class_prior.fill_(0.25)  # as training saw the classes: equal shares
        balanced = model(inputs.raw, inputs.context, (16, 128, 128), inputs.intensity).logits
    painted = labels > 0
    prediction = balanced.argmax(1)[0].numpy() + 1
    accuracy = (prediction[painted] == labels[painted]).mean()
    assert accuracy > 0.95, accuracy

    # The estimated shares of the volume bring the predicted class fractions closer to the truth's (the strokes
    # are class-balanced; background fills most of the volume).
    truth = np.bincount(sample.ground_truth.ravel(), minlength=5)[1:] / sample.ground_truth.size
    assert abs(float(shares.sum()) - 1) < 1e-5 and int(shares.argmax()) == 0, shares
    def error(lg):
        return np.abs(np.bincount(lg.argmax(1).ravel().numpy(), minlength=4) / lg[:, 0].numel() - truth).sum()
    assert error(logits) < 0.7 * error(balanced), (error(logits), error(balanced))


def test_training_is_reproducible_and_cancel_keeps_the_best_weights(sample, source, monkeypatch):
    import threading

    from napari_dinofuse.training import train

    labels = sample.scribbles(seed=0)
    config = TrainConfig(iterations=12, tile_shape=(16, 48, 48), seed=3)
    logs = []
    for depth in (1, 3):  # tiles prepared 1 or 3 steps ahead on a thread: the same draws, the same training
        monkeypatch.setattr(train, "PREFETCH_STEPS", depth)
        trainer = Trainer(new_model(source, 4, base_channels=4), source, labels, config)
        drive(trainer.run())
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
    assert not any(t.name.startswith("dinofuse-train-tiles") for t in threading.enumerate())  # prefetch stopped
    assert not model.training  # ready for inference
    assert torch.equal(model.class_prior, torch.full((4,), 0.25))  # not estimated: equal shares, no correction
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_training_with_the_edge_term_parts_the_classes_where_the_image_does(sample, source):
    """Measured on the whole volume, far beyond the strokes the term trained on: the predicted classes part on the
    image's edges more than without it, and the strokes are still followed."""
    labels = sample.scribbles(seed=0)
    painted = labels > 0
    shape = (16, 128, 128)
    costs, accuracy = {}, {}
    for weight in (0.0, 0.5):
        model = new_model(source, 4, base_channels=8)
        config = TrainConfig(iterations=120, learning_rate=3e-3, edge_weight=weight)
        drive(Trainer(model, source, labels, config).run())
        inputs = source.tile(tuple(slice(0, n) for n in shape), intensity=True, halo=model.intensity_halo)
        model.class_prior.fill_(0.25)  # as training saw the classes: equal shares
        with torch.no_grad():
            logits = model(inputs.raw, inputs.context, shape, inputs.intensity).logits
        inside = (..., *(slice(h, h + n) for h, n in zip(model.intensity_halo, shape)))
        costs[weight] = float(edge_smoothness(logits, inputs.intensity[inside]))
        accuracy[weight] = ((logits.argmax(1)[0].numpy() + 1)[painted] == labels[painted]).mean()
    assert costs[0.5] < 0.7 * costs[0.0], costs  # measured 0.056 against 0.171, gated (stroke accuracy 0.997 both)
    assert accuracy[0.5] > accuracy[0.0] - 0.05, accuracy


def test_training_leaves_the_context_evidence_out_on_a_share_of_the_tiles(sample, source):
    """With context_dropout, some training tiles go without the context head's evidence (so the UNet learns to
    tell the classes apart itself); predictions after training always get it."""
    labels = sample.scribbles(seed=0)
    for share in (0.0, 0.5):
        model = new_model(source, 4, base_channels=4)
        masks, forward = [], model.forward

        def spy(*args, evidence_keep=None, **kwargs):
            masks.append(evidence_keep)
            return forward(*args, evidence_keep=evidence_keep, **kwargs)

        model.forward = spy
        config = TrainConfig(iterations=12, tile_shape=(16, 48, 48), context_dropout=share)
        drive(Trainer(model, source, labels, config).run())
        steps, after = masks[:12], masks[12:]  # then the class shares are estimated on prediction tiles
        assert after and all(m is None for m in after)
        if share == 0:
            assert all(m is None for m in steps)
        else:
            kept = torch.cat(steps)
            assert len(kept) == 12 * config.tiles_per_step and 0.2 < kept.float().mean() < 0.8


def test_a_training_step_runs_the_context_branch_once(sample, source):
    """Every tile of a step gets a context window of one shape (widened to it), so the context branch runs once a
    step on all of them, not once per window shape (a GPU step is bound by launching its kernels)."""
    model = new_model(source, 4, base_channels=4)
    batches, encode = [], model.context_encoder.forward

    def spy(window, need=None):
        batches.append(window.features.shape[0])
        return encode(window, need)

    model.context_encoder.forward = spy
    drive(Trainer(model, source, sample.scribbles(seed=0), TrainConfig(iterations=6)).run())
    assert batches[:6] == [TrainConfig().tiles_per_step] * 6  # then the class shares, tile by tile


@pytest.fixture(scope="module")
def many_strokes(sample):
    """Denser scribbles: 2-6 strokes per class, so whole strokes can be held out."""
    return sample.scribbles(fraction=0.02, seed=0)


def test_whole_strokes_are_held_out_and_every_class_keeps_some(many_strokes):
    painted = find_painted(many_strokes, many_strokes.shape)
    train, held = split_strokes(painted, 0.2, seed=0)
    assert set(held) == set(painted.coords)  # here every class has several strokes
    for k, points in painted.coords.items():
        kept, out = {tuple(p) for p in train.coords[k]}, {tuple(p) for p in held[k]}
        assert kept and not kept & out and kept | out == {tuple(p) for p in points}
        assert 0.1 <= len(out) / len(points) <= 0.4
        # Whole strokes: no held-out voxel touches a training voxel of its class.
        tree = cKDTree(train.coords[k])
        assert np.all(tree.query(held[k])[0] > 1.75)
    one_stroke = find_painted(_painted((4, 16, 16), {1: 5, 2: 5}), (4, 16, 16))
    train, held = split_strokes(one_stroke, 0.2)
    assert held == {} and train.counts == one_stroke.counts


def test_validation_on_held_out_strokes_is_reported_and_stops_training(sample, source, many_strokes):
    config = TrainConfig(iterations=400, learning_rate=1e-5, validate_every=5, patience=2, min_iterations=10,
                         tile_shape=(16, 48, 48), validation_share=0.2)
    trainer = Trainer(new_model(source, 4, base_channels=4), source, many_strokes, config)
    events = list(trainer.run())
    scores = [e["validation"] for e in trainer.log if "validation" in e]
    assert trainer.stopped_early and len(trainer.log) < 60
    assert len(scores) >= 3 and all(0 <= v <= 1 for v in scores)
    assert max(scores) - Trainer.MIN_IMPROVEMENT <= trainer.best_score <= max(scores)
    assert "held-out strokes mIoU" in events[-1].message
    # The held-out strokes never enter the loss: what the model trains on excludes them.
    for k, points in trainer.held_out.items():
        assert not {tuple(p) for p in points} & {tuple(p) for p in trainer.train_painted.coords[k]}


def test_augmentation_keeps_each_voxel_with_its_own_context(source):
    """Flipping/transposing a tile moves its context window with it, about the tile's centre in the world: the
    context the model samples at each augmented voxel is the context of the voxel it came from."""
    region = (slice(0, 16), slice(16, 80), slice(32, 96))
    inputs = source.tile(region, intensity=True)
    ctx = inputs.context
    # A context image that is a function of position, so any misplacement shows.
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in ctx.grid.shape), indexing="ij")
    inputs = inputs._replace(context=ctx._replace(image=torch.from_numpy(zz + 7 * yy + 53 * xx)[None, None]))
    labels = torch.arange(int(np.prod(inputs.intensity.shape[2:]))).reshape(1, *inputs.intensity.shape[2:])

    def sampled(window):  # standardised: intensity jitter is an affine change of the values
        values = resample(window.image[0, 0].numpy(), window.grid, window.target, check_coverage=False)
        return (values - values.mean()) / values.std()

    before = sampled(inputs.context)
    kinds = set()
    for seed in range(16):
        aug, aug_labels = augment(inputs, labels, np.random.default_rng(seed))
        came_from = np.unravel_index(aug_labels[0].numpy(), labels.shape[1:])  # labels are voxel ids
        np.testing.assert_allclose(sampled(aug.context), before[came_from], atol=1e-4)
        # The raw features moved with the voxels: patch (z, i, j) of the result is the patch its voxels came from.
        patch_of = lambda idx: (idx[0], idx[1] // 16, idx[2] // 16)  # noqa: E731
        zs, ys, xs = patch_of(came_from)
        np.testing.assert_array_equal(aug.raw[0, :, :, :, :].numpy(),
                                      inputs.raw[0][:, zs[:, ::16, ::16], ys[:, ::16, ::16], xs[:, ::16, ::16]].numpy())
        kinds.add(tuple(aug_labels[0, 0, 0, :2].tolist()))
    assert len(kinds) >= 4  # several of the 8 in-plane orientations were drawn


@pytest.mark.parametrize("settings, name", [
    ({"iterations": 0}, "iterations"), ({"iterations": -5}, "iterations"), ({"learning_rate": float("nan")},
     "learning_rate"), ({"learning_rate": 0}, "learning_rate"), ({"validation_share": 0.9}, "validation_share"),
    ({"tile_shape": (16, 0, 64)}, "tile_shape"), ({"tiles_per_step": True}, "tiles_per_step"),
    ({"context_dropout": 1.0}, "context_dropout"), ({"context_dropout": -0.1}, "context_dropout"),
    ({"edge_weight": -1}, "edge_weight"), ({"edge_weight": float("nan")}, "edge_weight"),
    ({"mixed_precision": "no"}, "mixed_precision"), ({"augment": 0}, "augment"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(settings, name):
    with pytest.raises(InputError, match=name) as info:
        TrainConfig(**settings)
    assert "\n" not in str(info.value)


def test_a_context_margin_below_one_context_voxel_is_refused(source):
    with pytest.raises(InputError, match="context margin"):
        new_model(source, 4, context_margin_nm=10.0)
    assert new_model(source, 4, base_channels=4, context_margin_nm=None).config.context_margin_nm is None


def test_a_trained_model_does_not_depend_on_the_tiling(sample, source):
    """Half a tile's shift of the tile grid and another tile size. The attention maps agree to 0.02 (per-voxel
    normalisation, one context window per block; measured: identical). The labels agree on 98 % of voxels here,
    short of the 99.5 % goal: what is left is the raw UNet's zero padding at tile faces, which its receptive
    field (all of a 16-slice tile in z) carries to every voxel of this 16-slice volume (see docs/benchmarks.md)."""
    model = new_model(source, 4, base_channels=4)
    drive(Trainer(model, source, sample.scribbles(seed=0), TrainConfig(iterations=40)).run())
    a = predict_to_memory(model, source, tile_shape=(16, 64, 64), overlap=(4, 16, 16), block_shape=(16, 64, 64))
    roi = (slice(8, 16), slice(32, 128), slice(32, 128))
    b = predict_to_memory(model, source, roi, tile_shape=(16, 96, 96), overlap=(4, 32, 32))
    for k in range(1, 5):
        f = 2 ** (k - 1)
        crop = tuple(slice(s.start // f, -(-s.stop // f)) for s in roi)
        diff = np.abs(a.arrays[f"attention/level{k}"][crop].astype(np.float32) - b.arrays[f"attention/level{k}"])
        assert diff.max() <= 0.02, (k, diff.max())
    assert (a.arrays["labels"][roi] == b.arrays["labels"]).mean() >= 0.97  # measured 0.981 (BatchNorm: 0.93)


def test_a_new_model_standardises_its_filter_responses_over_the_volume(sample, source):
    """Unstandardised, the responses' variation is a few % of the grey level, which the stem's per-voxel
    normalisation then keeps alone: the context map became one constant vector."""
    model = new_model(source, 4, base_channels=4)
    intensity = source.context_features.signature["intensity"]
    for bank, volume, (low, high) in [(model.intensity_stem[0], sample.raw, (source.low, source.high)),
                                      (model.context_encoder.stem[0], sample.context,
                                       (intensity["low"], intensity["high"]))]:
        padded = np.pad(np.asarray(volume.data, np.float32), [(h, h) for h in bank.halo], mode="edge")
        with torch.no_grad():
            out = bank(to_unit_range(padded, low, high)[None, None])
        mean, std = out.mean((0, 2, 3, 4)), out.std((0, 2, 3, 4))
        assert mean.abs().max() < 0.35 and 0.6 < std.min() and std.max() < 1.5, (mean, std)
    features = torch.from_numpy(np.asarray(source.context_features.read(
        tuple(slice(0, n) for n in source.context_features.shape[1:])))).float().flatten(1)
    encoder = model.context_encoder
    standardised = (features - encoder.feature_mean[:, None]) / encoder.feature_std[:, None]
    assert standardised.mean(1).abs().max() < 0.35 and standardised.std(1).min() > 0.6


def test_new_classes_replace_only_the_head(source):
    model = new_model(source, 3, base_channels=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapt_classes(model, 5)
    heads = (model.head, model.local_head, model.region_head, model.context_head)
    assert model.config.num_classes == 5 and all(h.out_channels == 5 for h in heads)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before
               if not k.startswith(("head.", "local_head.", "region_head.", "context_head.", "class_prior")))
    assert torch.equal(model.class_prior, torch.full((5,), 0.2))  # shares of the new classes: not known yet


def test_fusion_needs_a_context(sample, tiny_backbone, tmp_path):
    raw_only = FeatureSource(sample.raw, compute_features(sample.raw, tiny_backbone, FeatureCache(tmp_path)))
    with pytest.raises(InputError, match="needs a context"):
        new_model(raw_only, 4, fusion="attention")
    assert new_model(raw_only, 4, fusion="none").config.fusion == "none"


# -- the one fine-tuning path (training/finetune.py) ---------------------------------------------------------

QUICK = TrainConfig(iterations=3, tile_shape=(8, 32, 32), tiles_per_step=2, validation_share=0)


def test_continuing_trains_a_copy_and_keeps_names_and_history(sample, source):
    labels = sample.scribbles(seed=0)
    three = np.where(labels > 3, 0, labels)
    first = drive(fine_tune(source, three, QUICK, NewModel(base_channels=4, class_names=("bg", "membrane"))))
    assert first.info.class_names == ["bg", "membrane", "class 3"] and first.iterations == 3
    # The summary gives the estimated shares, and says when predictions correct for them less than fully.
    summary = first.summary()
    assert f"estimated shares of the volume: bg {100 * first.shares[0]:.1f} %, membrane" in summary
    assert ("to the power" in summary) == (first.correction_power < 1)
    before = {k: v.clone() for k, v in first.model.state_dict().items()}

    messages = []
    second = drive(fine_tune(source, labels, QUICK, start=StartModel(first.model, first.info, first.log)),
                   lambda p: messages.append(p.message))
    # The start model is untouched (a cancelled or failed run cannot damage it); the new one has a 4th class.
    assert first.model.config.num_classes == 3
    assert all(torch.equal(before[k], v) for k, v in first.model.state_dict().items())
    assert second.model is not first.model and second.model.config.num_classes == 4
    assert second.info.class_names == ["bg", "membrane", "class 3", "class 4"]
    assert len(second.log) == 6 and second.log[:3] == first.log
    # Continuing refines: it trains at a share of a new model's peak rate (at the full rate, correction strokes
    # pushed a class's edges past the truth), and says so.
    assert 0 < QUICK.continue_lr_scale < 1  # the default: lower than a new model's
    peak = max(entry["learning_rate"] for entry in first.log)
    assert peak == pytest.approx(QUICK.learning_rate)
    assert max(entry["learning_rate"] for entry in second.log[3:]) == pytest.approx(peak * QUICK.continue_lr_scale)
    continued_peak = f"{peak * QUICK.continue_lr_scale:.2g}"
    assert any(f"continuing the model at a peak learning rate of {continued_peak}" in m for m in messages)
    with pytest.raises(InputError, match="continue_lr_scale"):
        TrainConfig(continue_lr_scale=0)


def test_previews_predict_with_the_weights_of_then_and_change_no_training(sample, source):
    """While a fine-tune trains, a preview after each share of PREVIEW_AT shows what the weights of that moment
    predict; the models come out exactly as without previews, the
    progress bar and loss plot count training steps only, a preview that fails is one warning and training goes on,
    and a cancel mid-preview leaves no thread running."""
    import threading

    from napari_dinofuse.defaults import PREVIEW_AT
    from napari_dinofuse.inference.predict import predict
    from napari_dinofuse.progress import Preview

    labels = sample.scribbles(seed=0)
    config = replace(QUICK, iterations=8)
    region = (slice(5, 6), slice(0, 128), slice(16, 80))
    seen = []  # per preview: the model's mode, weights and class shares when it was asked

    def preview(model):
        seen.append((model.training, copy.deepcopy(model.state_dict())))
        return predict(model, source, region, attention=False, device="cpu")

    plain = drive(fine_tune(source, labels, config, NewModel(base_channels=4)))
    start = StartModel(plain.model, plain.info, plain.log)
    for run in ("new", "continuing"):
        seen.clear()
        steps = []
        previewed = drive(fine_tune(source, labels, config, NewModel(base_channels=4) if run == "new" else None,
                                    start if run == "continuing" else None, preview=preview), steps.append)
        without = plain if run == "new" else drive(fine_tune(source, labels, config, start=start))
        after = previewed.model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in without.model.state_dict().items()), run
        assert [e["loss"] for e in previewed.log] == [e["loss"] for e in without.log]
        shown = [p.partial for p in steps if isinstance(p.partial, Preview)]
        assert [p.iteration for p in shown] == [round(share * 8) for share in PREVIEW_AT], run
        assert all(p.iterations == 8 for p in shown)
        during = [p for p in steps if "preview" in p.message]
        assert len(during) > 3 and all(p.total == 8 and 0 < p.done < 8 and p.metrics == {} for p in during), run
        assert sum("loss" in p.metrics for p in steps) == 8
        for (training, state), p in zip(seen, shown):  # a model in training predicts at equal shares
            assert training and torch.equal(state["class_prior"], torch.full((4,), 0.25)), run
            then = copy.deepcopy(previewed.model)
            then.load_state_dict(state)
            expected = predict_to_memory(then, source, region, attention=False, device="cpu").arrays["labels"]
            assert p.sink.arrays["labels"].shape == (1, 128, 64) and np.array_equal(p.sink.arrays["labels"], expected)
        assert not all(torch.equal(seen[0][1][k], v) for k, v in seen[-1][1].items())  # the weights moved

    def failing(model):
        yield from ()
        raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")

    messages = []
    failed = drive(fine_tune(source, labels, config, NewModel(base_channels=4), preview=failing),
                   lambda p: messages.append(p.message))
    assert sum(m.startswith("warning: the training preview failed (OutOfMemoryError") for m in messages) == 1
    assert all(torch.equal(v, failed.model.state_dict()[k]) for k, v in plain.model.state_dict().items())

    run = fine_tune(source, labels, config, NewModel(base_channels=4), preview=preview)
    for p in run:
        if p.message.endswith("previewing the view"):
            run.close()  # Cancel while a preview runs
            break
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dinofuse")]


def test_a_preview_corrects_its_labels_for_the_shares_its_own_posteriors_give():
    """At equal shares a model calls a rare class wherever it is unsure; the preview's labels use the shares its
    posteriors estimate (as the volume's estimate does after training), unless that would erase a class."""
    from napari_dinofuse.training.train import labels_at_own_shares

    truth = np.repeat([1, 2], [900, 100])
    probs = np.where(truth == 2, 0.8, 0.1)  # class 2's voxels called with 0.8; most of class 1's with 0.1
    probs[:200] = 0.55  # 200 of class 1's, unsure: called class 2 at equal shares
    probabilities = np.stack([1 - probs, probs]).reshape(2, 1, 10, 100)
    equal = probabilities.argmax(0) + 1
    assert (equal == 2).sum() == 300
    labels = labels_at_own_shares(probabilities.astype(np.float16))
    assert labels.shape == (1, 10, 100) and np.array_equal(labels.ravel(), truth)
    # Where the shares would erase a class its own predictions call on a fair share, they are tempered.
    unsure = np.stack([np.full(1000, 0.45), np.full(1000, 0.55)])
    unsure[:, :900] = [[0.9], [0.1]]
    assert (labels_at_own_shares(unsure) == 2).sum() == 100


def test_a_model_that_does_not_fit_the_features_is_refused(sample, source):
    labels = sample.scribbles(seed=0)
    fused = drive(fine_tune(source, labels, QUICK, NewModel(base_channels=4)))
    raw_only = FeatureSource(source.raw, source.raw_features)
    with pytest.raises(InputError, match="fuses a context"):
        drive(fine_tune(raw_only, labels, QUICK, start=StartModel(fused.model, fused.info, fused.log)))
    with pytest.raises(InputError, match="needs a context"):
        drive(fine_tune(raw_only, labels, QUICK, NewModel(fusion="attention")))


def test_continuing_keeps_only_the_start_models_sure_calls_away_from_its_wrong_strokes():
    # One tile of 3 x 20 x 20 voxels, two classes; the start model calls class 1 everywhere, sure except in one column.
    logits = torch.zeros(1, 2, 3, 20, 20)
    logits[:, 0] = 5.0  # posterior 0.993
    logits[:, 0, :, :, 15] = 0.5  # 0.62: unsure
    labels = torch.zeros(1, 3, 20, 20, dtype=torch.long)
    labels[0, 1, 2, 2] = 2  # a stroke the start model got wrong
    labels[0, 1, 2, 12] = 1  # and one it got right
    start = logits.log_softmax(1)
    mask = keep_mask(start, labels, sure=0.95, reach=(1, 3, 3))
    assert not mask[0, :, :6, :6].any()  # within reach of the wrong stroke: the strokes correct those calls
    assert mask[0, :, 6:, 6:8].all() and mask[0, :, :6, 6:8].all()  # beyond it, kept
    assert mask[0, :, :, 9:15][labels[0, :, :, 9:15] == 0].all()  # around the right stroke too
    assert not mask[0, 1, 2, 12]  # the strokes are the user's: never held to the start model's calls
    assert not mask[0, :, :, 15].any()  # unsure calls are free to change
    # The term is 0 where the model agrees with the start model and grows where it moves away from it, on the
    # masked voxels only.
    assert float(keep_loss(logits, start, mask)) == pytest.approx(0, abs=1e-6)
    moved = logits.clone()
    moved[:, 1, :, :, 17:] = 10.0
    assert float(keep_loss(moved, start, mask)) > 0.1
    moved_unsure = logits.clone()
    moved_unsure[:, 1, :, :, 15] = 10.0
    assert float(keep_loss(moved_unsure, start, mask)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(InputError, match="keep_weight"):
        TrainConfig(keep_weight=-1)
    with pytest.raises(InputError, match="keep_sure"):
        TrainConfig(keep_sure=1)


def test_corrections_move_the_start_models_calls_away_from_them_less_with_the_keep_term(sample, source):
    labels = sample.scribbles(seed=0)
    config = TrainConfig(iterations=40, tile_shape=(8, 32, 32), tiles_per_step=4, seed=1)
    first = drive(fine_tune(source, labels, config, NewModel(base_channels=4)))
    region = (slice(0, 16), slice(0, 128), slice(0, 128))
    inputs = source.tile(region, intensity=True, halo=first.model.intensity_halo)

    def calls(model):  # at equal shares, as training sees the classes
        model = copy.deepcopy(model).eval()
        model.class_prior.fill_(0.25)
        with torch.no_grad():
            return model(inputs.raw, inputs.context, (16, 128, 128), inputs.intensity).logits.argmax(1)[0].numpy() + 1

    start = calls(first.model)
    # Corrections in one corner: background painted over what the start model called membrane there.
    corner = np.zeros(labels.shape, bool)
    corner[:, :40, :40] = True
    strokes = np.where(labels > 0, labels, np.where(corner & (start == 2), 1, 0)).astype(labels.dtype)
    corrected = strokes != labels
    assert np.count_nonzero(corrected) > 1000
    far = np.ones(labels.shape, bool)
    far[:, :56, :56] = False  # beyond the term's reach (8 voxels in y/x) of the corrections
    far &= strokes == 0
    moved, learned = {}, {}
    for weight in (0.0, 5.0):
        # This small model's calls are at most ~0.9 sure (measured): the term holds every call here (0.3).
        again = drive(fine_tune(source, strokes, replace(config, iterations=30, keep_weight=weight, keep_sure=0.3),
                                start=StartModel(first.model, first.info, first.log)))
        now = calls(again.model)
        moved[weight] = float(np.mean(now[far] != start[far]))
        learned[weight] = float(np.mean(now[corrected] == 1))
    assert moved[5.0] < 0.6 * moved[0.0], moved  # measured 0.10 vs 0.23
    # The strokes still win where they are: these corrections contradict the calls the term holds elsewhere (the
    # same membrane called background), yet most of them are learned (measured 0.92 with the term, 1.0 without).
    assert learned[0.0] > 0.95 and learned[5.0] > 0.85, learned
