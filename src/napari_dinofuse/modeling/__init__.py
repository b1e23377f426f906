"""Segmentation models operating on precomputed DINOv3 feature volumes (no Qt, no napari)."""

from .fusion import ContextAttentionFusion
from .unet import FusedUNet3D, UNetConfig, UNetOutput

__all__ = ["ContextAttentionFusion", "FusedUNet3D", "UNetConfig", "UNetOutput"]
