"""The Attention form: which attention-map layers are shown, and how opaque."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QGroupBox, QHBoxLayout, QLabel, QSlider, QVBoxLayout

from ...display import ATTENTION_LEGEND, attention_style
from .results import ATTENTION_LAYERS, ours


class AttentionBox(QGroupBox):
    """One check box per level (shows or hides that level's layer) and one opacity for all of them."""

    def __init__(self, viewer):
        super().__init__("Attention maps (where the context steered)")
        self.viewer = viewer
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.attention_checks = []
        for k, role in enumerate(ATTENTION_LAYERS, start=1):
            check = QCheckBox(f"level {k}")
            check.setToolTip(f"Show '{role}': the context gate at the k-th encoder level (coarser than the raw by "
                             "that level's pooling)")
            check.toggled.connect(lambda on, role=role: self._set(role, visible=on))
            self.attention_checks.append(check)
            row.addWidget(check)
        layout.addLayout(row)
        self.attention_legend = QLabel(ATTENTION_LEGEND)  # what the colours mean, where the maps are switched on
        self.attention_legend.setWordWrap(True)
        layout.addWidget(self.attention_legend)
        opacity_row = QHBoxLayout()
        opacity_row.addWidget(QLabel("opacity"))
        self.attention_opacity = QSlider(Qt.Orientation.Horizontal)
        self.attention_opacity.setRange(0, 100)
        self.attention_opacity.setValue(round(100 * attention_style(1)["opacity"]))
        self.attention_opacity.setToolTip("Opacity of the attention layers, 0-100 %")
        self.attention_opacity.valueChanged.connect(
            lambda v: [self._set(role, opacity=v / 100) for role in ATTENTION_LAYERS])
        opacity_row.addWidget(self.attention_opacity)
        layout.addLayout(opacity_row)

    def _set(self, role: str, **props) -> None:
        layer = ours(self.viewer, role)
        if layer is not None:
            for key, value in props.items():
                setattr(layer, key, value)

    def sync(self) -> None:
        """The check boxes follow the attention layers there are (new results, layers the user hid)."""
        for check, role in zip(self.attention_checks, ATTENTION_LAYERS):
            layer = ours(self.viewer, role)
            check.setEnabled(layer is not None)
            check.blockSignals(True)
            check.setChecked(layer is not None and layer.visible)
            check.blockSignals(False)
            if layer is not None:
                layer.opacity = self.attention_opacity.value() / 100
