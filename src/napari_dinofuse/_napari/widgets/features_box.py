"""The Features form: which backbone, on which device, which planes, cached where; and Extract."""

from __future__ import annotations

import os

from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton

from ...defaults import default_backbone_spec
from ...errors import DinofuseError
from .fields import WARNING_STYLE


class FeaturesBox(QGroupBox):
    def __init__(self):
        super().__init__("Features (DINOv3)")
        form = QFormLayout(self)
        self.backbone_edit = QLineEdit(default_backbone_spec())
        self.backbone_edit.setToolTip("A hub id (gated: accept the licence and log in), a local folder with "
                                      "the weights, or random:<tiny|vits16|vitb16|vitl16> (NOT DINOv3: tests "
                                      "and offline demos only)")
        self.backbone_folder_button = QPushButton("Choose folder…")
        self.backbone_folder_button.setToolTip("A folder with DINOv3 weights as transformers' save_pretrained "
                                               "writes them (config.json + model.safetensors), e.g. copied from "
                                               "a machine that has hub access")
        self.backbone_note = QLabel()
        self.backbone_note.setWordWrap(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_combo.setToolTip("Where the backbone and the model run: auto picks a GPU (cuda, mps) when "
                                     "there is one, else the cpu")
        self.planes_combo = QComboBox()
        self.planes_combo.addItems(["xy", "ortho"])
        self.planes_combo.setToolTip("xy: one pass over the z slices; ortho: xy + xz + yz (3x the time and disk)")
        self.cache_edit = QLineEdit()
        self.cache_edit.setPlaceholderText("default (DINOFUSE_CACHE or your user cache folder)")
        self.cache_edit.setToolTip("Folder for the extracted features (can take several GB per volume); "
                                   "reused by later runs and after Cancel")
        self.cache_edit.editingFinished.connect(self.show_cache_size)
        self.cache_size = QLabel()
        self.extract_button = QPushButton("Extract features")
        self.extract_button.setToolTip("Compute (or find in the cache) the backbone features of the raw and "
                                       "context now; optional: Fine-tune and Predict do it when needed")
        row = QHBoxLayout()
        row.addWidget(self.backbone_edit, 1)
        row.addWidget(self.backbone_folder_button)
        form.addRow("backbone", row)
        form.addRow(self.backbone_note)
        form.addRow("device", self.device_combo)
        form.addRow("planes", self.planes_combo)
        form.addRow("cache folder", self.cache_edit)
        form.addRow(self.cache_size)
        form.addRow(self.extract_button)
        self.show_cache_size()

    def backbone_spec(self) -> str:
        backbone = self.backbone_edit.text().strip()
        if not backbone:
            raise DinofuseError("enter a backbone: a hub id, a local folder or random:<arch>")
        return backbone

    def cache_folder(self) -> str | None:
        return self.cache_edit.text().strip() or None

    def show_backbone(self, loaded, loaded_spec: str | None) -> None:
        """What the backbone field will load, or (once ``loaded`` from ``loaded_spec``) what it loaded: DINOv3 or
        random weights."""
        spec = self.backbone_edit.text().strip()
        random = spec.startswith("random:")
        if loaded is not None and loaded_spec == spec:
            random = loaded.is_random
            text = f"loaded: {loaded.describe()}" if random else f"loaded: DINOv3, {loaded.describe()}"
        elif random:
            text = "⚠ RANDOM WEIGHTS, NOT DINOv3: for tests and offline demos only"
        else:
            text = ("official DINOv3 hub ids are gated: accept the licence on the model's hub page, then "
                    "`hf auth login`; or, on a machine with access, save_pretrained the model to a folder and "
                    "choose that folder here")
        self.backbone_note.setText(text)
        self.backbone_note.setStyleSheet(WARNING_STYLE if random else "")

    def show_cache_size(self) -> None:
        from ...features.cache import FeatureCache, format_bytes

        try:
            cache = FeatureCache(self.cache_folder())
            # Said before Extract fails on it: the nearest existing folder on the path must be a writable folder.
            there = next(p for p in (cache.root, *cache.root.parents) if p.exists())
            if not there.is_dir():
                self.cache_size.setText(f"⚠ cache folder {cache.root} cannot be created: {there} is a file")
            elif not os.access(there, os.W_OK | os.X_OK):
                self.cache_size.setText(f"⚠ cache folder {cache.root} is not writable")
            else:
                self.cache_size.setText(f"{cache.root}: {format_bytes(cache.size_bytes())} cached")
        except (OSError, DinofuseError) as exc:
            self.cache_size.setText(f"⚠ cache folder: {exc}")
