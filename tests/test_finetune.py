"""The one fine-tuning path the widget, the CLI and the demo share."""

import numpy as np
import pytest
import torch

from napari_dinofuse.cache import FeatureCache
from napari_dinofuse.errors import InputError
from napari_dinofuse.features import FeatureSource, compute_features
from napari_dinofuse.finetune import NewModel, StartModel, fine_tune
from napari_dinofuse.progress import drive
from napari_dinofuse.train import TrainConfig

QUICK = TrainConfig(iterations=3, tile_shape=(8, 32, 32), tiles_per_step=2, validation_share=0)


@pytest.fixture(scope="module")
def sample():
    from napari_dinofuse.sample_data import make_sample

    return make_sample(seed=0, raw_shape=(8, 128, 128))


@pytest.fixture(scope="module")
def source(sample, tiny_backbone, tmp_path_factory):
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    return FeatureSource(sample.raw, compute_features(sample.raw, tiny_backbone, cache),
                         sample.context, compute_features(sample.context, tiny_backbone, cache))


def test_continuing_trains_a_copy_and_keeps_names_and_history(sample, source):
    labels = sample.scribbles(seed=0)
    three = np.where(labels > 3, 0, labels)
    first = drive(fine_tune(source, three, QUICK, NewModel(base_channels=4, class_names=("bg", "membrane"))))
    assert first.info.class_names == ["bg", "membrane", "class 3"] and first.iterations == 3
    before = {k: v.clone() for k, v in first.model.state_dict().items()}

    second = drive(fine_tune(source, labels, QUICK, start=StartModel(first.model, first.info, first.log)))
    # The start model is untouched (a cancelled or failed run cannot damage it); the new one has a 4th class.
    assert first.model.config.num_classes == 3
    assert all(torch.equal(before[k], v) for k, v in first.model.state_dict().items())
    assert second.model is not first.model and second.model.config.num_classes == 4
    assert second.info.class_names == ["bg", "membrane", "class 3", "class 4"]
    assert len(second.log) == 6 and second.log[:3] == first.log


def test_a_model_that_does_not_fit_the_features_is_refused(sample, source, tmp_path):
    labels = sample.scribbles(seed=0)
    fused = drive(fine_tune(source, labels, QUICK, NewModel(base_channels=4)))
    raw_only = FeatureSource(source.raw, source.raw_features)
    with pytest.raises(InputError, match="fuses a context"):
        drive(fine_tune(raw_only, labels, QUICK, start=StartModel(fused.model, fused.info, fused.log)))
    with pytest.raises(InputError, match="needs a context"):
        drive(fine_tune(raw_only, labels, QUICK, NewModel(fusion="attention")))

