"""The Fine-tune form: the strokes layer, the training settings, Fine-tune, and the loss as it trains."""

from __future__ import annotations

from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox

from ... import defaults
from .fields import LayerCombo, key_text
from .loss_plot import LossPlot


class TrainBox(QGroupBox):
    def __init__(self, viewer, shortcut: str):
        super().__init__("Fine-tune")
        form = QFormLayout(self)
        self.labels_combo = LayerCombo(viewer, "Labels", prefer="annotations")
        self.labels_combo.setToolTip("The Labels layer with your strokes on the raw's grid: 0 = unpainted, 1 = "
                                     "background, 2, 3 … = your classes")
        self.new_labels_button = QPushButton("New annotation layer")
        self.new_labels_button.setToolTip("An empty Labels layer 'annotations' aligned to the raw: paint 1 = "
                                          "background, 2, 3 … = your classes")
        self.restore_button = QPushButton("Restore annotations")
        self.restore_button.setToolTip("Add the strokes the current model was trained on (kept in its model "
                                       "folder), or else those of the last Fine-tune started (autosaved in your "
                                       "user data folder), as a new Labels layer")
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 100_000)
        self.iterations_spin.setValue(defaults.ITERATIONS)
        self.iterations_spin.setToolTip("Training steps (one step: a few tiles around your strokes); every stroke "
                                        "trains")
        self.tiles_spin = QSpinBox()
        self.tiles_spin.setRange(1, 64)
        self.tiles_spin.setValue(defaults.TILES_PER_STEP)
        z, y, x = defaults.TRAIN_TILE
        self.tiles_spin.setToolTip(f"Training tiles per step ({z} x {y} x {x} voxels, each around one of your classes "
                                   f"in turn): {defaults.TILES_PER_STEP} learns more per step; 4 trains about twice "
                                   "as fast on a CPU, with a rougher first result")
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(defaults.LEARNING_RATE)
        self.lr_spin.setToolTip("Peak learning rate of the optimiser (no unit), after a warm-up, then decaying; "
                                f"continuing a model trains at {defaults.CONTINUE_LR_SCALE:.2g}x of it (it refines)")
        self.train_button = QPushButton("Fine-tune")
        self.train_button.setToolTip(f"Train on the painted voxels, then update the prediction "
                                     f"({key_text(shortcut)} in the viewer)")
        self.loss_plot = LossPlot()
        self.eta_label = QLabel()
        form.addRow("labels", self.labels_combo)
        row = QHBoxLayout()
        row.addWidget(self.new_labels_button)
        row.addWidget(self.restore_button)
        form.addRow(row)
        form.addRow("iterations", self.iterations_spin)
        form.addRow("tiles per step", self.tiles_spin)
        form.addRow("learning rate", self.lr_spin)
        form.addRow(self.train_button)
        form.addRow(self.loss_plot)
        form.addRow(self.eta_label)

    def show_step(self, p) -> None:
        """A training step's Progress: its loss on the plot, the time left and the held-out score below it."""
        self.loss_plot.add(p.metrics["loss"], p.metrics["smoothed"])
        seconds = p.metrics["seconds"]
        left = seconds / max(p.done, 1) * (p.total - p.done)
        best = p.metrics.get("best_validation")
        scored = f"; held-out strokes mIoU {best:.2f} (best so far)" if best is not None else ""
        self.eta_label.setText(f"iteration {p.done}/{p.total}, {seconds:.0f} s, at most {left:.0f} s left "
                               f"(then the prediction){scored}")
