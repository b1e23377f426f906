"""The Data form: which layers are the raw and the context, and where they lie (voxel size, offset in nm)."""

from __future__ import annotations

from qtpy.QtWidgets import QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton

from ...errors import DinofuseError
from ...geometry import Volume
from .fields import WARNING_STYLE, LayerCombo, level0, parse_xyz, xyz_text


class DataBox(QGroupBox):
    """Raw and context layer choosers with their voxel sizes and offsets, and a line saying what is wrong with
    the choice (or what will be segmented). ``on_error(message)`` is told about a typo, which is undone."""

    def __init__(self, viewer, on_error):
        super().__init__("Data")
        self.on_error = on_error
        self.last_good = {}  # voxel-size / offset field -> its last valid text
        form = QFormLayout(self)
        self.raw_combo = LayerCombo(viewer, "Image", prefer="raw")
        self.context_combo = LayerCombo(viewer, "Image", allow_none=True, prefer="context")
        self.raw_voxel, self.raw_offset = QLineEdit(), QLineEdit()
        self.context_voxel, self.context_offset = QLineEdit(), QLineEdit()
        self.open_buttons = {}  # folder (bool) -> its button: the dock opens the dialogs
        open_row = QHBoxLayout()
        for text, folder in (("Open .tif / .h5 / .npy…", False), ("Open .zarr…", True)):
            button = QPushButton(text)
            button.setToolTip("Open volumes as layers, placed by their voxel size and offset (drag-and-drop "
                              "works too)")
            self.open_buttons[folder] = button
            open_row.addWidget(button)
        self.raw_combo.setToolTip("The image to segment (3D, z y x): the only layer you paint on and predict")
        self.context_combo.setToolTip("A wider, coarser image around the raw that the model may look at "
                                      "('(none)': raw only)")
        for edit, what in ((self.raw_voxel, "raw"), (self.context_voxel, "context")):
            edit.setToolTip(f"Size of one {what} voxel in nm, three numbers 'z, y, x' (e.g. '8, 4, 4'); "
                            "filled in from the layer's scale")
        for edit, what in ((self.raw_offset, "raw"), (self.context_offset, "context")):
            edit.setToolTip(f"Where the {what}'s first voxel lies, in nm 'z, y, x': places the raw inside the "
                            "context; filled in from the layer's translate")
        form.addRow("raw", self.raw_combo)
        form.addRow("  voxel size (nm, z, y, x)", self.raw_voxel)
        form.addRow("  offset (nm)", self.raw_offset)
        form.addRow("context", self.context_combo)
        form.addRow("  voxel size (nm, z, y, x)", self.context_voxel)
        form.addRow("  offset (nm)", self.context_offset)
        self.data_status = QLabel()
        self.data_status.setWordWrap(True)
        form.addRow(open_row)
        form.addRow(self.data_status)
        for edit, what, positive in ((self.raw_voxel, "raw voxel size", True), (self.raw_offset, "raw offset", False),
                                     (self.context_voxel, "context voxel size", True),
                                     (self.context_offset, "context offset", False)):
            edit.editingFinished.connect(lambda edit=edit, what=what, positive=positive:
                                         self.check_field(edit, what, positive))

    def refresh(self) -> None:
        """Follow the layer list (added, removed, renamed, moved layers)."""
        self.raw_combo.refresh()
        self.context_combo.refresh()
        self.check_data()

    def chosen_layers(self) -> tuple:
        return tuple(layer for layer in (self.raw_combo.layer(), self.context_combo.layer()) if layer is not None)

    def prefill(self, role: str):
        """Fill the voxel size and offset of ``role`` ("raw" or "context") from its layer; returns the layer."""
        combo = self.raw_combo if role == "raw" else self.context_combo
        voxel, offset = (self.raw_voxel, self.raw_offset) if role == "raw" else (self.context_voxel,
                                                                                  self.context_offset)
        layer = combo.layer()
        voxel.setText(xyz_text(layer.scale[-3:]) if layer is not None else "")
        offset.setText(xyz_text(layer.translate[-3:]) if layer is not None else "")
        for edit in (voxel, offset):
            self.last_good[edit] = edit.text()
            edit.setEnabled(layer is not None)
        self.check_data()
        return layer

    def volumes(self):
        """(raw, context or None) as Volumes over the chosen layers with the voxel sizes shown here."""
        raw_layer, context_layer = self.raw_combo.layer(), self.context_combo.layer()
        if raw_layer is None:
            raise DinofuseError("choose a raw image layer (or open a volume, or File > Open Sample > DINOfuse)")
        for layer in (raw_layer, context_layer):
            if layer is not None and getattr(layer, "rgb", False):
                raise DinofuseError(f"layer {layer.name!r} is an RGB image: dinofuse segments grayscale 3D volumes "
                                    "(EM has one channel); convert it to grayscale first")
            if layer is not None and layer.ndim != 3:
                raise DinofuseError(f"layer {layer.name!r} is {layer.ndim}D: dinofuse segments 3D volumes (z, y, x); "
                                    "choose a 3D image layer")
        raw = Volume(level0(raw_layer), parse_xyz(self.raw_voxel.text(), "raw voxel size", positive=True),
                     parse_xyz(self.raw_offset.text(), "raw offset"), raw_layer.name)
        context = None
        if context_layer is not None:
            if context_layer is raw_layer:
                raise DinofuseError("the context must be a different layer from the raw (or '(none)')")
            context = Volume(level0(context_layer),
                             parse_xyz(self.context_voxel.text(), "context voxel size", positive=True),
                             parse_xyz(self.context_offset.text(), "context offset"), context_layer.name)
            context.require_covers(raw)
        return raw, context

    def check_field(self, edit: QLineEdit, what: str, positive: bool) -> None:
        """A typo in a voxel size or offset is said at once and undone: the last good value stays in force."""
        if edit.text() == self.last_good.get(edit):
            return
        try:
            values = parse_xyz(edit.text(), what, positive)
        except DinofuseError as exc:
            edit.setText(self.last_good.get(edit, ""))
            self.on_error(f"{exc}; kept {edit.text() or 'the previous value'!s}")
            return
        edit.setText(xyz_text(values))
        self.last_good[edit] = edit.text()
        self.check_data()

    def check_data(self) -> None:
        """Say plainly what is wrong with the data choice (or what will be segmented)."""
        try:
            raw, context = self.volumes()
        except (DinofuseError, ValueError) as exc:
            self.data_status.setText(f"⚠ {exc}")
            self.data_status.setStyleSheet(WARNING_STYLE)
            return
        notes = [f"raw {raw.shape}, {raw.dtype}"]
        if tuple(raw.voxel_size) == (1.0, 1.0, 1.0):
            notes.append("⚠ raw voxel size missing (scale 1): enter it in nm")
        if context is None:
            notes.append("no context: fusion falls back to 'none'")
        else:
            notes.append(f"context {context.shape} covers the raw")
            if tuple(context.voxel_size) == (1.0, 1.0, 1.0):
                notes.append("⚠ context voxel size missing (scale 1): enter it in nm")
        self.data_status.setText("; ".join(notes))
        self.data_status.setStyleSheet(WARNING_STYLE if any("⚠" in n for n in notes) else "")
