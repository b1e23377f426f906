"""Qt dock widgets: thin drivers over :mod:`napari_dinofuse.session` (no engine logic here)."""

from .dock import DinofuseWidget

__all__ = ["DinofuseWidget"]
