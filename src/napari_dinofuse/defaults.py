"""The one place for defaults, sizes and names shared by the engine, the CLI, the reader and the widgets.

Importable without torch (napari start-up and the reader stay fast).
"""

from __future__ import annotations

import os

DEFAULT_BACKBONE = "facebook/dinov3-vitl16-pretrain-sat493m"
BACKBONE_ENV = "DINOFUSE_BACKBONE"
COMPILE_ENV = "DINOFUSE_COMPILE"  # 1: the backbone runs through torch.compile (large volumes on a GPU)
CPU_BF16_ENV = "DINOFUSE_CPU_BF16"  # 1 / 0: compute in bf16 on the CPU or not (default: where it has bf16 instructions)


def default_backbone_spec() -> str:
    return os.environ.get(BACKBONE_ENV) or DEFAULT_BACKBONE


# -- names and sizes ----------------------------------------------------------------------------------------
NUM_LEVELS = 4  # UNet encoder levels: one context gate (and one attention map) each
VOLUME_SUFFIXES = (".zarr", ".tif", ".tiff", ".npy", ".h5", ".hdf5")  # what `open_volume` and the napari reader read
HDF5_SUFFIXES = (".h5", ".hdf5")  # `file.h5/path/to/dataset`: the suffix marks the file part of the path
PREDICTION_KIND = "napari-dinofuse prediction"  # the `dinofuse.kind` attribute that marks a prediction store
ANNOTATIONS_KIND = "napari-dinofuse annotations"  # ... and labels it wrote (annotations; the writer): Labels
LABEL_CONVENTION = "0 = unpainted, k = class k"  # painted labels, on the raw grid
PREDICTION_LABELS = "class index i is label value i + 1; 0 = unlabelled"  # written into every prediction store


def attention_array(k: int) -> str:
    """The array of attention level ``k`` (1..NUM_LEVELS) in a prediction store."""
    return f"attention/level{k}"


def attention_layer(k: int) -> str:
    """The napari layer showing attention level ``k``."""
    return f"attention level {k}"


# -- the one recipe: the GUI, the CLI, the demo and the benchmarks start from these ---------------------------
BASE_CHANNELS = 16  # UNet width of a new model: 16 trains in minutes on a laptop CPU; 32-64 suit a GPU
CONTEXT_MARGIN_NM = 1024.0  # the context branch reads this far beyond a tile (its weight lies within ~1 um)
# Training steps. Few strokes are overfitted quickly: on the sample (docs/benchmarks.md, 2026-12-04 late) 100 steps
# beat 150 at both seeds on the context classes (seed 0 on every class), and 300 fitted the strokes better and
# generalised much worse. With a validation share, early stopping may end sooner.
ITERATIONS = 100
LEARNING_RATE = 3e-3  # peak, after a linear warm-up; cosine decay to 5 % of it
# Continuing a model (Fine-tune again after correction strokes) trains at this share of the peak rate: at the
# full rate the correction strokes pushed a class's edge past the truth (a membrane thinned, a granule grew into
# the background). In ten paired second rounds (docs/benchmarks.md, 2026-12-06 morning) half led a third slightly
# (the mean of every class), both ahead of the full rate; a fifth, and 50 steps instead of 100, were worse.
CONTINUE_LR_SCALE = 1 / 2
# Continuing a model, a term keeps its sure calls (largest posterior at least KEEP_SURE, at equal shares) on the
# unpainted voxels more than KEEP_REACH voxels (z, y, x) from any stroke it got wrong: without it, corrections of
# one class moved the edges of classes the user did not touch. Over 14 paired runs of three rounds
# (docs/benchmarks.md, 2026-12-06 late night) the membrane fell by more than .025 from round 2 to 3 in none (5 without),
# the means of membrane, mitochondria and granules rose in both rounds; one run's thick membrane was held (round-3
# worst .77 -> .72). Cost: a forward pass of the start model a step. 0: off.
KEEP_WEIGHT = 1.0
KEEP_SURE = 0.95
KEEP_REACH = (1, 8, 8)
# TrainConfig.mixed_precision by name (`dinofuse train --train-precision`; precision.py says why float32 by default).
TRAIN_PRECISIONS = {"float32": False, "bf16": True}
# Small tiles, several per step, each centred on a painted class in turn (with four classes a step sees each twice,
# for the cost of two 16 x 64 x 64 tiles). Voxels (z, y, x); the context comes from a wider window, not from the
# tile. Eight tiles (was four; with TrainConfig.context_dropout .25), over 14 paired runs (docs/benchmarks.md,
# 2026-12-06 evening): first-round membrane IoU .66 -> .73 on the mean (worst .43 -> .55), second round level.
# Cost: 1.7-2x a CPU step (`dinofuse train --tiles-per-step 4` or the dock's "tiles per step" 4: the old speed);
# a GPU step is bound by launching its kernels, so likely less there (unmeasured).
TRAIN_TILE = (16, 32, 32)
TILES_PER_STEP = 8
# Of each class's strokes, held out to score the model and stop early. 0 by default: with the few strokes a user
# paints, every stroke is worth more in training than as a score. Measured (docs/benchmarks.md): holding out a
# fifth of the sample's strokes cost ~0.3 IoU on the context-dependent classes, and the held-out score peaked
# after 25 steps while the scored voxels kept improving to 150 (then the recipe's length). Worth it with many
# strokes per class.
VALIDATION_SHARE = 0.0
# The edge term (training.train.edge_smoothness): its weight beside the strokes' loss, reached after growing from 0
# over the first steps, so the strokes shape the classes before the term pulls their edges onto the image's, and
# counted on a training tile only while the model calls EDGE_GATE of the tile's painted voxels right. On the sample
# (docs/benchmarks.md, 2026-12-06 late) 0.5 raised the mean of five first rounds and of four second-round models
# on every class; without the gate it once made a whole volume membrane, without the ramp weight 1 did.
# Weight 1, a gate of 0.95 and a gate per class (2026-12-06 night) were no better: the gate per class turns
# the term off on the tiles a second round's correction strokes fall on, where it helps most.
EDGE_WEIGHT = 0.5
EDGE_RAMP_STEPS = 50
EDGE_GATE = 0.9  # a training tile's share of painted voxels called right for the edge term to count it
# Prediction tiles are independent of the training tile (per-voxel normalisation): larger is faster, as fewer
# voxels are computed twice where tiles overlap. On 2 CPU cores (base 16, 96 x 384 x 384) 48 x 192 x 192 predicted
# 1.5x faster than 32 x 128 x 128 (55 vs 83 s), peak memory 2.1 vs 1.9 GB (docs/benchmarks.md).
PREDICT_TILE = (48, 192, 192)
# The tiles the class shares are estimated on after training (a few of them, at random): the smaller tile of
# before, so that this estimate costs a CPU a few seconds, not half a minute.
PRIOR_TILE = (32, 128, 128)
# On a GPU, larger: the UNet ran 3.7x more voxels/s through 64 x 256 x 256 tiles than through the CPU's tiles, and
# prediction end to end was 2.6x faster (H200, docs/benchmarks.md); out of memory, tiles are halved and retried.
GPU_PREDICT_TILE = (64, 256, 256)
PREDICT_OVERLAP = (8, 32, 32)
# Blocks of prediction: the features of one are read at once (and held on the device), one per cluster task.
PREDICT_BLOCK = (64, 512, 512)


def predict_tile(device_type: str) -> tuple[int, int, int]:
    """The prediction tile for a device type ("cuda", "cpu", "mps")."""
    return GPU_PREDICT_TILE if device_type == "cuda" else PREDICT_TILE


# While Fine-tune trains, the slice in view is predicted with the weights so far after these shares of the
# iterations, as a preview the finished prediction replaces (the user sees where training is heading long before
# it ends). It covers at most this many raw voxels either side of the view's centre in y and x: a preview computes
# ~20 slices of UNet for its one (the tiles' z overlap), 1.3 s for 256 x 256 on 2 CPU cores, so the three cost ~6 %
# of a CPU round (docs/benchmarks.md, "Training previews"); a whole 1024 x 1024 view would cost more than training.
PREVIEW_AT = (0.25, 0.5, 0.75)
PREVIEW_HALF_WIDTH = 128


def preview_region(view):
    """The part of ``view`` (3 slices of raw voxels, e.g. the slice in view) a training preview covers: at most
    ``PREVIEW_HALF_WIDTH`` voxels either side of its centre in y and x."""
    yx = []
    for s in view[1:]:
        centre = (s.start + s.stop) // 2
        yx.append(slice(max(s.start, centre - PREVIEW_HALF_WIDTH), min(s.stop, centre + PREVIEW_HALF_WIDTH)))
    return (view[0], *yx)
