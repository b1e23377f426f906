"""Defaults shared by the engine and the widgets, importable without torch (napari start-up stays fast)."""

from __future__ import annotations

import os

DEFAULT_BACKBONE = "facebook/dinov3-vitl16-pretrain-sat493m"
BACKBONE_ENV = "DINOFUSE_BACKBONE"


def default_backbone_spec() -> str:
    return os.environ.get(BACKBONE_ENV) or DEFAULT_BACKBONE


# -- the one recipe: the GUI, the CLI, the demo and the benchmarks start from these ---------------------------
BASE_CHANNELS = 16  # UNet width of a new model: 16 trains in minutes on a laptop CPU; 32-64 suit a GPU
CONTEXT_MARGIN_NM = 1024.0  # the context branch reads this far beyond a tile (its weight lies within ~1 um)
ITERATIONS = 300  # at most: early stopping on held-out strokes often ends sooner
LEARNING_RATE = 3e-3  # peak, after a linear warm-up; cosine decay to 5 % of it
# Small tiles, several per step (each centred on a painted class in turn): one step sees every class, at the
# cost of one 16 x 64 x 64 tile. Voxels (z, y, x); the context comes from a wider window, not from the tile.
TRAIN_TILE = (16, 32, 32)
TILES_PER_STEP = 4
VALIDATION_SHARE = 0.2  # of each class's strokes, held out to validate and stop early
# Prediction tiles are independent of the training tile (per-voxel normalisation): larger is faster.
PREDICT_TILE = (32, 128, 128)
PREDICT_OVERLAP = (8, 32, 32)
