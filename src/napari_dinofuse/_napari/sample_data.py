"""npe2 sample data: the synthetic EM world (raw 4 nm, context 64 nm) and, separately, its ground truth."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _sample():
    from ..synthetic.sample import make_sample

    return make_sample(seed=0)


def synthetic_em() -> list[tuple]:
    sample = _sample()
    return [(sample.context.data, {"name": "context", "scale": sample.context.voxel_size,
                                   "translate": sample.context.offset, "opacity": 0.7}, "image"),
            (sample.raw.data, {"name": "raw", "scale": sample.raw.voxel_size, "translate": sample.raw.offset}, "image")]


def synthetic_em_ground_truth() -> list[tuple]:
    from ..display import class_features, label_colormap

    sample = _sample()
    # The class colours of the annotations and the prediction; class_names[0] names label 0 (unlabelled).
    return [(sample.ground_truth, {"name": "ground truth", "scale": sample.raw.voxel_size,
                                   "translate": sample.raw.offset, "opacity": 0.5,
                                   "colormap": label_colormap(show_background=False),
                                   "features": class_features(sample.class_names[1:])}, "labels")]
