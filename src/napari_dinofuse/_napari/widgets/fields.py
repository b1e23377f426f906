"""Small parts the dock's forms share: a layer chooser that follows the layer list, and 'z, y, x' fields."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox

from ...errors import DinofuseError
from ...geometry import triple
from .results import MARK

NONE = "(none)"
WARNING_STYLE = "color: #ff8c69"  # a line that says what is wrong


def key_text(key: str) -> str:
    """A napari key name as a tooltip shows it: 'Control-Shift-F' -> 'Ctrl+Shift+F'."""
    return key.replace("Control", "Ctrl").replace("-", "+")


def xyz_text(values) -> str:
    return ", ".join(f"{float(v):g}" for v in values)


def parse_xyz(text: str, what: str, positive: bool = False) -> tuple[float, float, float]:
    """Three numbers 'z, y, x' (nm) typed in a field; whether they are finite (and, with ``positive``, above 0)
    is the geometry's rule (:func:`~napari_dinofuse.geometry.triple`). Anything else is a DinofuseError."""
    try:
        values = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise DinofuseError(f"{what}: enter three numbers 'z, y, x' in nm, got {text!r}")
    return triple(values, what, positive)


def level0(layer):
    """The full-resolution array of a layer (level 0 of a multiscale one)."""
    return layer.data[0] if layer.multiscale else layer.data


class LayerCombo(QComboBox):
    """Layers of one kind (Image or Labels) in the viewer, kept in sync with the layer list.

    The choice follows the layer itself (item data = its id), so renaming the chosen layer keeps it chosen.
    A stand-in choice (the first layer, because none was named ``prefer``) gives way to a ``prefer`` layer when
    one appears (the sample adds the context before the raw); a layer chosen by the user or a script stays.
    """

    def __init__(self, viewer, kind: str, allow_none: bool = False, prefer: str | None = None):
        super().__init__()
        self.viewer, self.kind, self.allow_none, self.prefer = viewer, kind, allow_none, prefer
        self.stand_in = False
        # refresh() blocks signals: this sees only choices made from outside (a click, setCurrentText).
        self.currentIndexChanged.connect(lambda _: setattr(self, "stand_in", False))
        self.refresh()

    def layers(self):
        return [layer for layer in self.viewer.layers
                if type(layer).__name__ == self.kind and layer.metadata.get(MARK) is None]

    def refresh(self) -> None:
        chosen, text = self.currentData(), self.currentText()
        self.blockSignals(True)
        self.clear()
        if self.allow_none:
            self.addItem(NONE, None)
        for layer in self.layers():
            self.addItem(layer.name, id(layer))
        index = self.findData(chosen) if chosen is not None else -1
        preferred = self.findText(self.prefer) if self.prefer is not None else -1
        if index < 0 or self.stand_in:
            index = preferred
            self.stand_in = preferred < 0 and self.count() > (1 if self.allow_none else 0)
        self.setCurrentIndex(max(index, 0))
        self.blockSignals(False)
        if self.currentText() != text:
            self.currentTextChanged.emit(self.currentText())

    def layer(self):
        wanted = self.currentData()
        return next((layer for layer in self.layers() if id(layer) == wanted), None)
