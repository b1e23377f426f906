"""The frozen DINOv3 ViT: loading (hub id | local folder | ``random:<arch>``), preprocessing, patch grid.

Everything here works on 2D slices; walking a volume slice by slice is ``extract.py``'s job.
torch and transformers are imported here, never by the package's ``__init__``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..defaults import BACKBONE_ENV, COMPILE_ENV, DEFAULT_BACKBONE, default_backbone_spec  # noqa: F401
from ..errors import BackboneError, InputError
from ..precision import bf16_on

PATCH_SIZE = 16

# Per-checkpoint pixel statistics (the checkpoints' own preprocessing): satellite vs web images.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
    "lvd1689m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Shapes of the official ViTs, for random-initialised stand-ins (tests, offline demos).
RANDOM_ARCHS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "vits16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vitl16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


class RandomBackboneWarning(UserWarning):
    """The features come from random weights, not from DINOv3."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackboneError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device 'cuda' was asked for, but torch sees no CUDA GPU: use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BackboneError("device 'mps' was asked for, but it is not available: use --device cpu or auto")
    return device


# ---------------------------------------------------------------------------------------------
# Intensity normalisation (EM grayscale -> [0, 1]); computed once per volume, applied per slice.

def intensity_range(data, mode: str = "dtype", sample_size: int = 2_000_000) -> tuple[float, float]:
    """(low, high) that map ``data`` onto [0, 1].

    ``dtype``: the integer type's full range (uint8 -> 0..255); floats fall back to percentiles.
    ``percentile``: robust 0.5/99.5 percentiles of an evenly strided sample (bounded time on huge arrays).
    """
    dtype = np.dtype(data.dtype)
    if mode == "dtype" and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    if mode not in ("dtype", "percentile"):
        raise InputError(f"unknown intensity normalisation {mode!r}: use 'dtype' or 'percentile'")
    sample = np.asarray(_strided_sample(data, sample_size), dtype=np.float64)
    if not np.all(np.isfinite(sample)):
        raise InputError("the data contain NaN or infinite values: fill or mask them before segmenting")
    low, high = np.percentile(sample, [0.5, 99.5])
    if high <= low:  # constant image: avoid a division by zero, map everything to 0
        high = low + 1.0
    return float(low), float(high)


def _strided_sample(data, size: int):
    """An evenly spaced subset of at most ~size elements, read without loading the whole array."""
    shape = data.shape
    total = int(np.prod(shape))
    step = max(1, int(np.ceil((total / size) ** (1 / len(shape)))))
    sample = data[tuple(slice(None, None, step) for _ in shape)]
    return sample.compute() if hasattr(sample, "compute") else sample


# numpy dtypes torch takes as they are; others (uint16, uint32, ...) are converted on the host first.
_TORCH_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16,
                                                 np.float32, np.float64, np.bool_))


def to_unit_range(images, low: float, high: float, device=None) -> torch.Tensor:
    """Grayscale images of any dtype -> a new float32 tensor in [0, 1] (clipped), on ``device`` (None: where they
    are). They travel in their own dtype (uint8: a quarter of float32's bytes) and are converted there, in
    place in one copy of our own (the input may be a view of the user's data)."""
    if isinstance(images, np.ndarray):
        images = np.ascontiguousarray(images)
        images = torch.from_numpy(images if images.dtype in _TORCH_DTYPES else images.astype(np.float32))
    images = images.to(device=device if device is not None else images.device, dtype=torch.float32, copy=True)
    return images.sub_(low).div_(high - low).clamp_(0.0, 1.0)


def normalization_for(spec: str, folder: Path | None = None) -> str:
    """Which pixel statistics a checkpoint was trained with."""
    if folder is not None:
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            mean = json.loads(processor.read_text()).get("image_mean")
            for name, (ref_mean, _) in NORMALIZATIONS.items():
                if mean is not None and np.allclose(mean, ref_mean, atol=2e-3):
                    return name
    return "sat493m" if "sat493m" in spec.lower() else "lvd1689m"


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class BackboneSpec:
    kind: str  # "hub" | "local" | "random"
    value: str  # hub id, folder path, or arch name

    @classmethod
    def parse(cls, spec: str) -> "BackboneSpec":
        spec = str(spec).strip()
        if spec.startswith("random:"):
            arch = spec.split(":", 1)[1]
            if arch not in RANDOM_ARCHS:
                raise BackboneError(f"unknown random architecture {arch!r}: choose one of "
                                    + ", ".join(f"random:{a}" for a in RANDOM_ARCHS))
            return cls("random", arch)
        path = Path(spec).expanduser()
        if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            if not path.is_dir():
                raise BackboneError(f"backbone folder {spec!r} does not exist: pass a folder written by "
                                    "DINOv3ViTModel.save_pretrained, or a hub id such as " + DEFAULT_BACKBONE)
            return cls("local", str(path.resolve()))
        if spec.count("/") != 1:
            raise BackboneError(f"{spec!r} is neither a hub id (owner/name), a local folder, nor random:<arch>")
        return cls("hub", spec)

    def __str__(self) -> str:
        return f"random:{self.value}" if self.kind == "random" else self.value


PRECISIONS = ("auto", "fp32", "bf16", "autocast")
FORWARDS = ("fused", "transformers")


class CompileFallbackWarning(UserWarning):
    """torch.compile failed: the backbone runs eagerly instead."""


class Backbone:
    """A frozen DINOv3 ViT in eval mode that turns [0, 1] grayscale slices into patch-grid features.

    ``precision``: ``fp32``; ``bf16`` (weights cast to bfloat16 once: no per-call weight casts, half the
    weight memory, bf16 activations throughout); ``autocast`` (fp32 weights under bf16 autocast: fp32
    residual stream); ``auto``: bf16 where the device computes it (:func:`~napari_dinofuse.precision.bf16_on`: CUDA,
    CPUs with bf16 instructions), fp32 elsewhere.
    ``forward``: ``fused`` (:class:`~napari_dinofuse.features.fused_vit.FusedViT`, the default) or ``transformers``
    (the reference it is tested against). ``compile``: run the forward through ``torch.compile`` (pays off on
    large volumes on a GPU: each new slice shape compiles once, tens of seconds); a compile failure falls back
    to the eager forward with one warning.
    """

    patch_size = PATCH_SIZE

    def __init__(self, model, spec: BackboneSpec, normalization: str, device: torch.device,
                 precision: str = "auto", forward: str = "fused", compile: bool = False):
        if precision not in PRECISIONS:
            raise BackboneError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if forward not in FORWARDS:
            raise BackboneError(f"unknown forward {forward!r}: choose one of {', '.join(FORWARDS)}")
        if precision == "auto":
            precision = "bf16" if bf16_on(device) else "fp32"
        self.precision, self.forward, self.config = precision, forward, model.config
        model = model.eval().requires_grad_(False)
        # The weights' identity is that of the checkpoint as loaded, before any fusing or cast: every forward
        # and precision of one model shares cache entries.
        self._fingerprint = _weights_hash(model)
        if forward == "fused":
            from .fused_vit import FusedViT

            model = FusedViT(model)  # the transformers model is not kept: one copy of the weights
        if precision == "bf16":
            for param in model.parameters():  # parameters only: buffers (RoPE frequencies) stay fp32
                param.data = param.data.to(torch.bfloat16)
        self.model = model.to(device)
        compiled = model.encode if forward == "fused" else model
        self._compiled = torch.compile(compiled, dynamic=False) if compile else None
        self._compiled_batch = 0
        self.spec = spec
        self.device = device
        self.normalization = normalization
        mean, std = NORMALIZATIONS[normalization]
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @property
    def embed_dim(self) -> int:
        return self.config.hidden_size

    @property
    def is_random(self) -> bool:
        return self.spec.kind == "random"

    def describe(self) -> str:
        cfg = self.config
        note = "  RANDOM WEIGHTS, NOT DINOv3" if self.is_random else ""
        run = self.forward + (", compiled" if self._compiled is not None else "")
        return (f"{self.spec}: {cfg.hidden_size}-d, {cfg.num_hidden_layers} layers, "
                f"normalisation {self.normalization}, device {self.device} ({self.precision}, {run}){note}")

    def fingerprint(self) -> str:
        """A hash of the weights themselves, so caches never mix features of different models."""
        return self._fingerprint

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, H, W) in [0, 1] -> (B, 3, H, W) standardised with the checkpoint's mean/std."""
        x = images01.to(self.device, torch.float32).unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def patch_features(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, H, W) grayscale in [0, 1] -> (B, C, ceil(H/16), ceil(W/16)) float32 features.

        Sizes that are not multiples of 16 are padded by reflection, so the border patches still
        see image content; the grid covers every input pixel (nothing is dropped).
        """
        if images01.ndim != 3:
            raise ValueError(f"expected a batch of 2D slices (B, H, W), got shape {tuple(images01.shape)}")
        _, h, w = images01.shape
        p = self.patch_size
        gh, gw = -(-h // p), -(-w // p)
        x = self.preprocess(images01)
        pad_h, pad_w = gh * p - h, gw * p - w
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        if self.precision == "bf16":  # also makes the RoPE tables bf16, so q, k and v share a dtype
            x = x.to(torch.bfloat16)
        with self._autocast():
            tokens = self._tokens(x)
        grid = tokens.reshape(x.shape[0], gh, gw, -1)
        return grid.permute(0, 3, 1, 2).float()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, patches, C) final-normed patch tokens, row-major."""
        batch = x.shape[0]
        if self._compiled is not None:
            # Batches padded to the largest one seen: the last, shorter batch of a volume does not recompile.
            self._compiled_batch = max(self._compiled_batch, batch)
            try:
                return self._run(self._compiled, F.pad(x, (0, 0, 0, 0, 0, 0, 0, self._compiled_batch - batch)))[:batch]
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # no compiler, an unsupported op...: the eager forward computes the same
                warnings.warn(f"torch.compile of the backbone failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); running it without compiling",
                              CompileFallbackWarning, stacklevel=3)
                self._compiled = None
        return self._run(self.model.encode if self.forward == "fused" else self.model, x)

    def _run(self, forward, x: torch.Tensor) -> torch.Tensor:
        if self.forward == "fused":  # the RoPE tables are made outside any compiled code
            return forward(x, *self.model.rope_tables(x.shape[2] // PATCH_SIZE, x.shape[3] // PATCH_SIZE, x.device))
        tokens = forward(pixel_values=x).last_hidden_state
        return tokens[:, 1 + self.config.num_register_tokens:]  # [CLS, registers, patches row-major]

    def _autocast(self):
        if self.precision == "autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _weights_hash(model) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_backbone(spec: str | None = None, device: str = "auto", normalization: str | None = None,
                  offline: bool = False, precision: str = "auto", forward: str = "fused",
                  compile: bool | None = None) -> Backbone:
    """Load a frozen DINOv3 from a hub id, a local folder, or ``random:<arch>`` (tests only).

    ``offline``: take hub checkpoints only from the local download cache, never from the network.
    ``precision``, ``forward``, ``compile``: see :class:`Backbone` (default: bf16 weights where the device computes
    bf16, fp32 elsewhere; the fused forward; compiled when ``$DINOFUSE_COMPILE`` is 1).

    Raises :class:`BackboneError` with one actionable message when the weights cannot be had.
    """
    parsed = BackboneSpec.parse(spec or default_backbone_spec())
    torch_device = resolve_device(device)
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise BackboneError(f"unknown normalisation {normalization!r}: choose one of {sorted(NORMALIZATIONS)}")
    if parsed.kind == "random":
        model = _random_model(parsed.value)
        norm = normalization or "lvd1689m"
    else:
        folder = Path(parsed.value) if parsed.kind == "local" else None
        model = _pretrained_model(parsed, offline)
        norm = normalization or normalization_for(parsed.value, folder)
    if compile is None:
        compile = os.environ.get(COMPILE_ENV, "") == "1"
    return Backbone(model, parsed, norm, torch_device, precision, forward, compile)


def random_config(arch: str):
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(patch_size=PATCH_SIZE, num_register_tokens=4, layerscale_value=1.0,
                           **RANDOM_ARCHS[arch])


def _random_model(arch: str):
    from transformers import DINOv3ViTModel

    warnings.warn(f"backbone random:{arch} has RANDOM weights: its features are NOT DINOv3's. "
                  "Use it for tests and offline demos only.", RandomBackboneWarning, stacklevel=3)
    # Seeded from the name alone, so the same spec gives the same weights in every process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"random:{arch}".encode()))
        return DINOv3ViTModel(random_config(arch))


def _pretrained_model(spec: BackboneSpec, offline: bool = False):
    from transformers import DINOv3ViTModel

    local = spec.kind == "local"
    if local:
        folder = Path(spec.value)
        if not (folder / "config.json").is_file():
            raise BackboneError(f"{folder} holds no config.json: it is not a saved model. Save one with "
                                "DINOv3ViTModel.from_pretrained(HUB_ID).save_pretrained(FOLDER)")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != "dinov3_vit":
            raise BackboneError(f"{folder} holds a {model_type!r} model, not a DINOv3 ViT (model_type "
                                "'dinov3_vit'); ConvNeXt DINOv3 variants are not supported")
    try:
        # safetensors only (no pickle); never trust_remote_code.
        return DINOv3ViTModel.from_pretrained(spec.value, local_files_only=local or offline, use_safetensors=True)
    except Exception as exc:  # transformers raises OSError / hub errors / ValueError
        raise BackboneError(_explain_load_failure(spec, exc)) from None


def _explain_load_failure(spec: BackboneSpec, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if spec.kind == "local":
        return (f"could not load DINOv3 weights from {spec.value} ({text.splitlines()[0]}). The folder needs "
                "config.json and model.safetensors as written by save_pretrained.")
    low = text.lower()
    if "gated" in low or "401" in low or "403" in low or "restricted" in low:
        why = "the checkpoint is gated and this machine is not authorised"
    elif any(k in low for k in ("connection", "offline", "resolve", "network", "couldn't connect",
                                 "cannot find the requested files", "local_files_only")):
        why = "the model hub cannot be reached and the weights are not in the local cache"
    elif "not found" in low or "404" in low or "repository" in low:
        why = "no such model on the hub"
    else:
        why = text.splitlines()[0]
    return (f"could not load DINOv3 weights {spec.value!r}: {why}. Accept the licence on "
            f"https://huggingface.co/{spec.value} and log in (`hf auth login`), or pass a local folder "
            "saved with save_pretrained, or random:vits16 for an offline demo (random features, not DINOv3).")
