"""Fixtures of the dock-widget tests: a private feature cache and settings store per test, the notifications a
test sees, and a model fine-tuned once by the engine for the tests that need a trained model but not the
painting and training through the dock (tests/gui/test_widget.py trains through the dock itself)."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFUSE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _private_settings(tmp_path):
    """The dock's remembered settings go to tmp_path, never to the user's own store."""
    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    return tmp_path / "settings"


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A folder with a model fine-tuned on two classes of the sample (background, mitochondria as class 2) with
    the dock's test settings (random tiny backbone, NOT DINOv3; base 4), saved with its strokes, and the strokes."""
    from napari_dinofuse.annotations import AUTOSAVE_ENV
    from napari_dinofuse.progress import drive
    from napari_dinofuse.session import Session, SessionSettings
    from napari_dinofuse.synthetic.sample import make_sample

    folder = tmp_path_factory.mktemp("trained")
    sample = make_sample(seed=0)
    truth = sample.ground_truth
    strokes = sample.scribbles(seed=0)
    labels = np.where((strokes > 0) & (truth == 3), 2, np.where((strokes > 0) & (truth == 1), 1, 0)).astype(np.uint8)
    settings = SessionSettings(backbone="random:tiny", device="cpu", cache=str(folder / "cache"), base_channels=4,
                               iterations=20)
    session = Session()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(AUTOSAVE_ENV, str(folder / "autosave.zarr"))
        drive(session.fine_tune(sample.raw, sample.context, labels, settings))
    session.save(folder / "model")
    return folder / "model", labels
