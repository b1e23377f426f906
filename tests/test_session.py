"""The GUI's engine-side state: what it keeps between clicks and when it must not."""

import warnings

import numpy as np

from napari_dinofuse.backbone import RandomBackboneWarning
from napari_dinofuse.geometry import Volume
from napari_dinofuse.progress import drive
from napari_dinofuse.session import Session, SessionSettings


def test_features_follow_the_data_not_the_array_object(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (2, 64, 64), dtype=np.uint8)
    raw = Volume(data, (8.0, 4.0, 4.0))
    session, settings = Session(), SessionSettings("random:tiny", device="cpu", cache=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        first = drive(session.extract(raw, None, settings))
        assert drive(session.extract(raw, None, settings)) is first  # unchanged data: kept, not re-read
        data[:, :32] = 255 - data[:, :32]  # the user edits the layer in place (same array object)
        second = drive(session.extract(raw, None, settings))
    assert second is not first
    region = (slice(0, 2), slice(0, 2), slice(0, 4))
    assert not np.array_equal(first.raw_features.read(region), second.raw_features.read(region))
