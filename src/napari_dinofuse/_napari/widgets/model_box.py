"""The Model form: what the current model is, how a new one is built, and New / Load / Save."""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox

from ... import defaults


class ModelBox(QGroupBox):
    def __init__(self):
        super().__init__("Model")
        form = QFormLayout(self)
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.fusion_combo = QComboBox()
        self.fusion_combo.addItems(["attention", "concat", "none"])
        self.fusion_combo.setToolTip("attention: context gates the raw skips (shows attention maps); concat: "
                                     "ablation; none: raw only")
        self.base_spin = QSpinBox()
        self.base_spin.setRange(2, 128)
        self.base_spin.setValue(defaults.BASE_CHANNELS)
        self.base_spin.setToolTip("UNet width (channels at the first level) of a new model: 16 suits a "
                                  "laptop, 32-128 a GPU")
        self.stem_check = QCheckBox("raw-intensity stem (sharper boundaries)")
        self.stem_check.setChecked(True)
        self.stem_check.setToolTip("A new model also reads the raw intensities at full resolution (a fixed "
                                   "filter bank), for sharper boundaries than the 16-voxel backbone patches")
        self.new_model_button = QPushButton("New")
        self.new_model_button.setToolTip("Forget the current model: the next Fine-tune starts from scratch "
                                         "with the settings above")
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Load a model folder (config.json + model.safetensors) to predict or "
                                    "fine-tune further")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the current model to a folder (for `dinofuse predict` or later)")
        row = QHBoxLayout()
        for button in (self.new_model_button, self.load_button, self.save_button):
            row.addWidget(button)
        form.addRow(self.model_label)
        form.addRow("fusion", self.fusion_combo)
        form.addRow("base channels", self.base_spin)
        form.addRow(self.stem_check)
        form.addRow(row)

    def show_model(self, config) -> None:
        """Show the settings a loaded model was built with (its UNetConfig)."""
        self.fusion_combo.setCurrentText(config.fusion)
        self.base_spin.setValue(config.base_channels)
