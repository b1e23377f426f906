"""Model folders: ``config.json`` + ``model.safetensors`` + ``training_log.json``.

Nothing is pickled: weights are safetensors and everything else JSON, so opening a model
someone shared cannot run code.

Label mapping: the UNet predicts ``num_classes`` logits; class index ``i`` is label value
``i + 1`` in a napari Labels layer (``ModelInfo.class_names[i]`` names it), and label 0 stays
"unlabelled" for painting and training.

Saving is atomic per folder: files go to a hidden temporary sibling (``.<name>.tmp-*``), are
fsynced, then swapped in by renames. A crash at any point leaves the previous complete model or
the new complete model at ``<name>``; if the process dies between the two renames, the previous
model waits at ``.<name>.old-*`` and the next :func:`load_model` or :func:`save_model` of that
folder puts it back. Concurrent saves to the *same* folder are not supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..atomic import fsync_dir, recover, siblings, staging, swap_in
from ..errors import CheckpointError
from .unet import FusedUNet3D, UNetConfig, place

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "LOG_FILE",
    "MIN_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "CheckpointError",
    "ModelInfo",
    "check_backbone_compatible",
    "is_model_folder",
    "load_model",
    "read_training_log",
    "save_model",
]

# Bump FORMAT_VERSION whenever a reader of the old format would misread the new one (renamed or
# removed keys, new weight layout). New optional keys do not need a bump: readers ignore unknown keys.
# 2: BatchNorm instead of GroupNorm, a context branch at the context's resolution, anisotropic pooling.
# 3: per-voxel ChannelNorm instead of BatchNorm, a per-voxel head on the first level.
# 4: the filter banks' responses and the context features are standardised (saved statistics; format 3 ran them
#    raw: it loads with identity statistics); planes, feature tile size and intensity mode are typed fields
#    (format 3 kept them in "extra": read from there).
# 5: a context head (trained beside the main logits, unused when predicting; formats 3-4 load with a new one).
# 6: the context head's logits take part in predictions (UNetConfig.context_evidence; formats 3-5 load with it
#    off) and the estimated class shares (``class_prior``; formats 3-5 load with equal shares: as they predicted).
# 7, 8: (experiments, reverted: gates that read the class evidence; Hessian filters; retired.)
# 9: the patch features join the encoder at level 1, with a short path from level 1 to the logits
#    (UNetConfig.feature_level; formats 3-6 load with it at 0, as they ran).
# 10: predictions add the context head's logits scaled (UNetConfig.context_evidence_scale; formats 3-9 load with
#    it at 1, as they ran).
FORMAT_VERSION = 10
# Oldest format this version still reads.
MIN_FORMAT_VERSION = 3

# Formats whose models this version replaced, and why (a newer model is a re-training away).
_RETIRED = {
    1: "a GroupNorm UNet whose predictions depended on the tiling and whose context stopped at the tile's edge",
    2: "a BatchNorm UNet whose inference statistics did not match what its few training tiles showed",
    7: "an experiment whose attention gates read the class evidence, not carried on",
    8: "an experiment whose filter banks gave the Hessian's eigenvalues, not carried on",
}

_INPUT_STATISTICS = ("stem.0.mean", "stem.0.std", "context_encoder.feature_mean", "context_encoder.feature_std")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LOG_FILE = "training_log.json"
_MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, LOG_FILE)
_UPGRADE_HINT = "upgrade napari-dinofuse (pip install -U napari-dinofuse)"


# -- metadata ---------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; numpy/torch scalars and arrays via ``tolist``; NaN/inf -> None
    (``json`` would write bare ``NaN``, which strict JSON readers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot store {type(obj).__name__} in JSON: {obj!r}")


def _voxel_size(value, name: str) -> tuple[float, float, float]:
    try:
        vs = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} needs 3 numbers (z, y, x) in nm, got {value!r}") from None
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise ValueError(f"{name} needs 3 positive numbers (z, y, x) in nm, got {value!r}")
    return vs


@dataclass
class ModelInfo:
    """Everything needed to use a trained model besides its weights.

    ``class_names[i]`` names class index ``i`` of the logits, shown as label value ``i + 1``.
    ``package_version`` is the napari-dinofuse version that wrote the folder (set by
    :func:`save_model`). ``planes``, ``feature_tile_size`` and ``intensity_mode``: how the features it was
    trained on were extracted (predicting needs the same). ``extra``: free-form JSON-able metadata of the user's;
    nothing here depends on it.
    """

    unet: UNetConfig
    class_names: list[str]
    backbone: str
    normalization: str
    backbone_dim: int
    raw_voxel_size: tuple[float, float, float]
    context_voxel_size: tuple[float, float, float] | None = None
    package_version: str = __version__
    planes: str = "xy"
    feature_tile_size: int | None = None  # pixels per ViT tile of the feature extraction (None: unknown)
    intensity_mode: str | None = None  # "dtype" or "percentile" (None: unknown)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"unet must be a UNetConfig, got {type(self.unet).__name__}")
        self.class_names = list(self.class_names)
        if not all(isinstance(n, str) and n.strip() for n in self.class_names):
            raise ValueError(f"class_names must be non-empty strings, got {self.class_names!r}")
        if len(self.class_names) != self.unet.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for a model with {self.unet.num_classes} classes"
            )
        for name in ("backbone", "normalization", "package_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.backbone_dim, bool) or not isinstance(self.backbone_dim, int) or self.backbone_dim < 1:
            raise ValueError(f"backbone_dim must be a positive integer, got {self.backbone_dim!r}")
        self.raw_voxel_size = _voxel_size(self.raw_voxel_size, "raw_voxel_size")
        if self.context_voxel_size is not None:
            self.context_voxel_size = _voxel_size(self.context_voxel_size, "context_voxel_size")
        if self.planes not in ("xy", "ortho"):
            raise ValueError(f"planes must be 'xy' or 'ortho', got {self.planes!r}")
        if self.feature_tile_size is not None and (isinstance(self.feature_tile_size, bool)
                                                   or not isinstance(self.feature_tile_size, int)
                                                   or self.feature_tile_size < 1):
            raise ValueError(f"feature_tile_size must be a positive integer, got {self.feature_tile_size!r}")
        if self.intensity_mode not in (None, "dtype", "percentile"):
            raise ValueError(f"intensity_mode must be 'dtype' or 'percentile', got {self.intensity_mode!r}")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        self.extra = dict(self.extra)

    def label_names(self) -> dict[int, str]:
        """Label value -> class name (label 0, unlabelled, is not a class)."""
        return {i + 1: name for i, name in enumerate(self.class_names)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "package_version": self.package_version,
            "unet": self.unet.to_dict(),
            "class_names": list(self.class_names),
            "backbone": self.backbone,
            "normalization": self.normalization,
            "backbone_dim": self.backbone_dim,
            "raw_voxel_size": list(self.raw_voxel_size),
            "context_voxel_size": None if self.context_voxel_size is None else list(self.context_voxel_size),
            "planes": self.planes,
            "feature_tile_size": self.feature_tile_size,
            "intensity_mode": self.intensity_mode,
            "extra": _jsonable(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        """Inverse of :meth:`to_dict`; ``format_version`` and unknown keys are ignored here
        (:func:`load_model` checks the version). Raises ValueError on missing or bad values."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        required = ("unet", "class_names", "backbone", "normalization", "backbone_dim", "raw_voxel_size")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing keys: {missing}")
        if not isinstance(data["unet"], Mapping):
            raise ValueError("'unet' must be a JSON object")
        extra = dict(data.get("extra") or {})
        if "planes" not in data:  # format 3 kept these in "extra"
            data = {**data, "planes": extra.pop("planes", "xy"), "feature_tile_size": extra.pop("tile_size", None),
                    "intensity_mode": extra.pop("intensity_mode", None)}
        return cls(
            unet=UNetConfig.from_dict(data["unet"]),
            class_names=data["class_names"],
            backbone=data["backbone"],
            normalization=data["normalization"],
            backbone_dim=data["backbone_dim"],
            raw_voxel_size=data["raw_voxel_size"],
            context_voxel_size=data.get("context_voxel_size"),
            package_version=data.get("package_version", "unknown"),
            planes=data["planes"],
            feature_tile_size=data.get("feature_tile_size"),
            intensity_mode=data.get("intensity_mode"),
            extra=extra,
        )


def check_backbone_compatible(info: ModelInfo, backbone_spec: str, backbone_dim: int) -> str | None:
    """Raise CheckpointError if ``backbone_dim`` differs from the model's; return a warning
    if only the backbone spec differs (same width, but possibly different features), else None."""
    if int(backbone_dim) != info.backbone_dim:
        raise CheckpointError(
            f"model trained on {info.backbone_dim}-d features, backbone {backbone_spec} gives "
            f"{int(backbone_dim)}-d: use --backbone {info.backbone}"
        )
    if str(backbone_spec).rstrip("/\\") != info.backbone.rstrip("/\\"):
        return (
            f"model was trained with backbone {info.backbone}, now using {backbone_spec} (same "
            f"{info.backbone_dim}-d width): results are only meaningful if it is the same network"
        )
    return None


# -- file helpers -----------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def is_model_folder(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


# -- save / load ------------------------------------------------------------------------


def save_model(
    folder: str | os.PathLike,
    model: FusedUNet3D,
    info: ModelInfo,
    training_log: list[dict] | None = None,
    annotations=None,
) -> Path:
    """Write ``model`` and ``info`` (stamped with this package version) to ``folder`` atomically,
    replacing a model already there. Refuses to replace a folder that holds anything else.
    ``annotations`` (a Volume: the labels it was trained on) are kept inside as ``annotations.zarr``."""
    folder = Path(folder).expanduser().absolute()
    if not isinstance(model, FusedUNet3D):
        raise TypeError(f"expected a FusedUNet3D, got {type(model).__name__}")
    if model.config.to_dict() != info.unet.to_dict():
        raise ValueError(f"model config {model.config} does not match info.unet {info.unet}")
    info = dataclasses.replace(info, package_version=__version__)
    config = info.to_dict()  # fails early (before touching disk) on non-JSON-able extra

    recover(folder, _complete)
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"cannot save a model to {folder}: it is a file")
        if any(folder.iterdir()) and not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"cannot save a model to {folder}: it is not empty and not a dinofuse model folder; "
                "choose a new or empty folder"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of earlier crashed saves to this folder (all hidden, so never taken for models).
    for stale in siblings(folder, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)

    tmp = staging(folder)
    tmp.mkdir()
    try:
        # safetensors wants contiguous CPU tensors; detach so no autograd state is kept alive.
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        metadata = {"format": "pt", "dinofuse_format_version": str(FORMAT_VERSION)}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata=metadata)
        _fsync_file(tmp / WEIGHTS_FILE)
        _write_json(tmp / LOG_FILE, list(training_log or []))
        if annotations is not None:
            from ..annotations import FILE, save_annotations

            save_annotations(tmp / FILE, annotations.data, annotations.grid)
        _write_json(tmp / CONFIG_FILE, config)
        fsync_dir(tmp)
        swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"corrupt {path.name} in {path.parent}: {exc}; the model folder is damaged, re-save or re-train it"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _check_format(config: Mapping[str, Any], folder: Path) -> int:
    version = config.get("format_version")
    writer = config.get("package_version", "an unknown version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"corrupt {CONFIG_FILE} in {folder}: format_version is {version!r}, expected an integer; "
            "the model folder is damaged, re-save or re-train it"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"model {folder} was written by napari-dinofuse {writer} in model format {version}; "
            f"napari-dinofuse {__version__} reads formats up to {FORMAT_VERSION}: {_UPGRADE_HINT}"
        )
    if version in _RETIRED:
        raise CheckpointError(
            f"model {folder} was written by napari-dinofuse {writer} in model format {version}: {_RETIRED[version]}. "
            "This version cannot use its weights: fine-tune a new model on the same painted labels (they are all "
            "it needs)"
        )
    if version < MIN_FORMAT_VERSION:
        raise CheckpointError(
            f"model {folder} was written by napari-dinofuse {writer} in model format {version}, which "
            f"napari-dinofuse {__version__} no longer reads (oldest: {MIN_FORMAT_VERSION}): use napari-dinofuse "
            f"{writer} to predict with it, or re-train it with this version"
        )
    return version


def _list(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _check_weights(model: FusedUNet3D, state: Mapping[str, torch.Tensor], folder: Path) -> None:
    expected = model.state_dict()
    problems = []
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing:
        problems.append(f"missing {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {_list(unexpected)}")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatch (file vs config) {'; '.join(shapes[:5])}")
    if problems:
        raise CheckpointError(
            f"weights in {folder / WEIGHTS_FILE} do not match its {CONFIG_FILE}: {'; '.join(problems)}; "
            "the folder mixes files from different models, re-save or re-train it"
        )


def _open_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder).expanduser()
    folder = recover(folder.absolute(), _complete)
    if not folder.is_dir():
        raise CheckpointError(f"not a dinofuse model folder: {folder} (no such folder)")
    return folder


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[FusedUNet3D, ModelInfo]:
    """Load a model folder; the model is on ``device`` and in eval mode."""
    folder = _open_folder(folder)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"not a dinofuse model folder: {folder} (missing {', '.join(missing)})")

    config = _read_json(folder / CONFIG_FILE)
    if not isinstance(config, Mapping):
        raise CheckpointError(f"corrupt {CONFIG_FILE} in {folder}: not a JSON object; re-save or re-train it")
    version = _check_format(config, folder)
    if isinstance(config.get("unet"), Mapping):  # how older formats ran where they saved no key
        older = {}
        if version < 6:  # predicted without the context head's logits
            older["context_evidence"] = False
        if version < 9:  # the patch features joined at level 0
            older["feature_level"] = 0
        if version < 10:  # the context head's logits added whole
            older["context_evidence_scale"] = 1.0
        config = {**config, "unet": {**older, **config["unet"]}}
    try:
        info = ModelInfo.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid {CONFIG_FILE} in {folder}: {exc}; re-save or re-train it") from None

    try:
        state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"cannot read {WEIGHTS_FILE} in {folder}: {exc}; the file is damaged, re-save or re-train it"
        ) from None
    model = FusedUNet3D(info.unet)
    defaults = model.state_dict()
    if version < 4:  # its inputs ran unstandardised: the identity statistics a new model starts with
        state = {**{k: v for k, v in defaults.items() if k.endswith(_INPUT_STATISTICS)}, **state}
    if version < 5:  # no context head yet: a new one (it does not take part in their predictions)
        state = {**{k: v for k, v in defaults.items() if k.startswith("context_head.")}, **state}
    if version < 6:  # no class shares yet: equal ones, i.e. no correction, as they predicted
        state = {"class_prior": defaults["class_prior"], **state}
    _check_weights(model, state, folder)
    model.load_state_dict(state, strict=True)
    place(model, device).eval()
    return model, info


def read_training_log(folder: str | os.PathLike) -> list[dict]:
    """The training log saved with a model ([] if the model was saved without one)."""
    folder = _open_folder(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"not a dinofuse model folder: {folder} (missing {CONFIG_FILE})")
    if not (folder / LOG_FILE).is_file():
        return []
    log = _read_json(folder / LOG_FILE)
    if not isinstance(log, list):
        raise CheckpointError(f"corrupt {LOG_FILE} in {folder}: expected a list of entries")
    return log
