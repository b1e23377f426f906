import warnings

import pytest

from napari_dinofuse.backbone import RandomBackboneWarning


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random-initialised tiny DINOv3 ViT (not DINOv3's weights: shapes and code paths only)."""
    from napari_dinofuse.backbone import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        return load_backbone("random:tiny", device="cpu")
