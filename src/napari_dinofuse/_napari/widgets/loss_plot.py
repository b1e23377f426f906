"""A small live loss curve (QPainter: no plotting library needed)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget


class LossPlot(QWidget):
    """Raw and smoothed loss against iteration; the y axis spans the values seen so far."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.total = 1

    def reset(self, total: int) -> None:
        self.losses, self.smoothed, self.total = [], [], max(1, int(total))
        self.update()

    def add(self, loss: float, smoothed: float) -> None:
        self.losses.append(float(loss))
        self.smoothed.append(float(smoothed))
        self.update()

    def paintEvent(self, event):
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        if self.losses:
            # Scale to the smoothed curve (with room above it): one early spike must not flatten the rest.
            low = min(min(self.losses), min(self.smoothed))
            high = 1.5 * max(self.smoothed[len(self.smoothed) // 10:])
            span = (high - low) or 1.0
            w, h = self.width() - 4, self.height() - 4

            def points(values):
                n = max(self.total, len(values)) - 1 or 1
                return QPolygonF([QPointF(2 + w * i / n, 2 + h * (1 - (v - low) / span)) for i, v in enumerate(values)])

            painter.setPen(QPen(QColor(120, 120, 140), 1))
            painter.drawPolyline(points([min(v, high) for v in self.losses]))
            painter.setPen(QPen(QColor(255, 170, 60), 2))
            painter.drawPolyline(points(self.smoothed))
            painter.setPen(QColor(220, 220, 220))
            corner = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop
            painter.drawText(self.rect().adjusted(4, 2, -4, -2), corner,
                             f"loss {self.smoothed[-1]:.3f}")
        painter.end()
