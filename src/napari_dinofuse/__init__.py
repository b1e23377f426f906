"""napari-dinofuse: volume-EM segmentation with DINOv3 features and a context-fused 3D UNet.

Importing this package stays cheap (no torch, no Qt): napari reads the manifest at start-up.
"""

__version__ = "0.1.0"
