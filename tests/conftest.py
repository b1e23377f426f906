import os
import warnings

import pytest

from napari_dinofuse.defaults import CPU_BF16_ENV
from napari_dinofuse.features.backbone import RandomBackboneWarning

# The suite computes in fp32 on any CPU, so its results do not depend on whether the test machine's CPU has bf16
# instructions (the default would use them); tests/test_precision.py switches bf16 on.
os.environ[CPU_BF16_ENV] = "0"


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random-initialised tiny DINOv3 ViT (not DINOv3's weights: shapes and code paths only)."""
    from napari_dinofuse.features.backbone import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        return load_backbone("random:tiny", device="cpu")


@pytest.fixture(autouse=True)
def _private_autosave(tmp_path, monkeypatch):
    """Annotations autosaved by a fine-tune go to tmp_path, never to the user's data folder."""
    from napari_dinofuse.annotations import AUTOSAVE_ENV

    monkeypatch.setenv(AUTOSAVE_ENV, str(tmp_path / "autosave" / "annotations.zarr"))
