"""Defaults shared by the engine and the widgets, importable without torch (napari start-up stays fast)."""

from __future__ import annotations

import os

DEFAULT_BACKBONE = "facebook/dinov3-vitl16-pretrain-sat493m"
BACKBONE_ENV = "DINOFUSE_BACKBONE"


def default_backbone_spec() -> str:
    return os.environ.get(BACKBONE_ENV) or DEFAULT_BACKBONE
