"""The GUI's engine-side state: what it keeps between clicks and when it must not."""

import warnings

import numpy as np

from napari_dinofuse.features.backbone import RandomBackboneWarning
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


def test_a_failed_autosave_is_a_warning_and_the_fine_tune_goes_on(tmp_path, monkeypatch):
    from napari_dinofuse.annotations import AUTOSAVE_ENV

    (tmp_path / "a file").write_text("not a folder")
    monkeypatch.setenv(AUTOSAVE_ENV, str(tmp_path / "a file" / "annotations.zarr"))
    raw = Volume(np.random.default_rng(1).integers(0, 255, (4, 32, 32), dtype=np.uint8), (8.0, 4.0, 4.0))
    labels = np.zeros(raw.shape, np.uint8)
    labels[:, 2:6, 2:30], labels[:, 20:24, 2:30] = 1, 2
    session = Session()
    settings = SessionSettings("random:tiny", device="cpu", cache=str(tmp_path / "cache"), fusion="none",
                               base_channels=4, iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        messages = [p.message for p in session.fine_tune(raw, None, labels, settings)]
    assert any(m.startswith("warning: the annotations could not be autosaved") for m in messages), messages
    assert session.model is not None and np.array_equal(np.asarray(session.annotations.data), labels)


def test_painted_strokes_survive_a_crash_and_travel_with_the_model(tmp_path):
    from napari_dinofuse.annotations import autosave_path, load_annotations

    rng = np.random.default_rng(1)
    raw = Volume(rng.integers(0, 255, (4, 32, 32), dtype=np.uint8), (8.0, 4.0, 4.0), (0.0, 40.0, -8.0))
    labels = np.zeros(raw.shape, np.uint8)
    labels[:, 2:6, 2:30] = 1
    labels[:, 20:24, 2:30] = 2
    session = Session()
    settings = SessionSettings("random:tiny", device="cpu", cache=str(tmp_path / "cache"), fusion="none",
                               base_channels=4, iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        run = session.fine_tune(raw, None, labels, settings)
        next(run)
        run.close()  # the viewer closed (or crashed) mid fine-tune: the strokes are already kept
        kept = load_annotations(autosave_path())
        assert np.array_equal(kept.data[:], labels) and kept.voxel_size == raw.voxel_size
        assert kept.offset == raw.offset and session.annotations is None  # no model trained on them yet

        drive(session.fine_tune(raw, None, labels, settings))
    session.save(tmp_path / "model")
    loaded = Session()
    loaded.load(tmp_path / "model")
    assert np.array_equal(loaded.annotations.data[:], labels) and loaded.annotations.offset == raw.offset
    loaded.save(tmp_path / "model")  # saved again where it was read from: still whole
    assert np.array_equal(loaded.annotations.data[:], labels)
    again = Session()
    again.load(tmp_path / "model")
    assert np.array_equal(again.annotations.data[:], labels)
    loaded.reset_model()
    assert loaded.annotations is None


def test_fine_tune_previews_the_slice_in_view_where_it_lies(tmp_path):
    from napari_dinofuse.progress import Preview

    rng = np.random.default_rng(2)
    raw = Volume(rng.integers(0, 255, (6, 32, 48), dtype=np.uint8), (8.0, 4.0, 4.0), (16.0, 40.0, -8.0))
    labels = np.zeros(raw.shape, np.uint8)
    labels[:, 2:6, 2:46], labels[:, 20:24, 2:46] = 1, 2
    settings = SessionSettings("random:tiny", device="cpu", cache=str(tmp_path / "cache"), fusion="none",
                               base_channels=4, iterations=4)
    shown = (slice(3, 4), slice(0, 32), slice(16, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        steps = []
        sink = drive(Session().fine_tune(raw, None, labels, settings, preview=shown), steps.append)
        # The user scrolls while it trains: each preview covers the slice in view then.
        moving = iter([shown, (slice(0, 1), slice(16, 32), slice(0, 48)), (slice(5, 6), slice(0, 32), slice(0, 16))])
        moved = []
        drive(Session().fine_tune(raw, None, labels, settings, preview=lambda: next(moving)), moved.append)
    previews = [p.partial for p in steps if isinstance(p.partial, Preview)]
    assert [p.iteration for p in previews] == [1, 2, 3]
    for p in previews:
        assert p.sink.arrays["labels"].shape == (1, 32, 32) and set(p.sink.arrays) == {"labels"}
        assert p.sink.grids["labels"] == raw.grid.crop((3, 0, 16), (4, 32, 48))  # placed on the raw's slice
        assert np.isin(p.sink.arrays["labels"], (1, 2)).all()
    assert sink.arrays["labels"].shape == raw.shape  # the finished prediction: the whole volume, as without
    grids = [p.partial.sink.grids["labels"] for p in moved if isinstance(p.partial, Preview)]
    assert grids == [raw.grid.crop((3, 0, 16), (4, 32, 48)), raw.grid.crop((0, 16, 0), (1, 32, 48)),
                     raw.grid.crop((5, 0, 0), (6, 32, 16))]
