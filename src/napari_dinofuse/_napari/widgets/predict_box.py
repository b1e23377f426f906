"""The Predict form: which region, in memory or to disk, and Save results."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QPushButton

from .fields import key_text

WHOLE, AROUND_VIEW = "whole volume", "region around the view"
# Below this many raw voxels "Fine-tune" and "Predict" default to the whole volume, above to the view.
WHOLE_VOLUME_DEFAULT_MAX = 256**3


class PredictBox(QGroupBox):
    def __init__(self, shortcut: str):
        super().__init__("Predict")
        form = QFormLayout(self)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems([WHOLE, AROUND_VIEW])
        self.scope_combo.setToolTip("Also used by the prediction after a Fine-tune. For volumes too large to "
                                    "hold in memory, use Predict to disk…")
        self.predict_button = QPushButton("Predict")
        self.predict_button.setToolTip(f"Segment the region with the current model ({key_text(shortcut)} "
                                       "in the viewer)")
        self.predict_disk_button = QPushButton("Predict to disk…")
        self.predict_disk_button.setToolTip("Write the prediction of the region as OME-Zarr into a folder you "
                                            "choose, block by block (any volume size, memory bounded by a block), "
                                            "showing blocks as they are written, then the result read lazily from "
                                            "there; objects are then found on disk")
        form.addRow("region", self.scope_combo)
        row = QHBoxLayout()
        row.addWidget(self.predict_button)
        row.addWidget(self.predict_disk_button)
        form.addRow(row)
        self.save_results_button = QPushButton("Save results…")
        self.save_results_button.setToolTip("Write the prediction, uncertainty, attention maps and objects with "
                                            "their measurements into an OME-Zarr folder that napari opens again "
                                            "in place (drag it in, or File > Open Folder)")
        form.addRow(self.save_results_button)

    def default_scope(self, shape) -> None:
        """The whole volume for a raw of ``shape`` that fits in memory easily, else the region around the view."""
        self.scope_combo.setCurrentText(AROUND_VIEW if int(np.prod(shape)) > WHOLE_VOLUME_DEFAULT_MAX else WHOLE)

    def region(self, view):
        """The prediction region: None (the whole volume) or ``view``, the raw voxels around the view
        (:func:`~napari_dinofuse.display.view_region`)."""
        return None if self.scope_combo.currentText() == WHOLE else view
