"""The status line under the forms: what runs (or ran), its progress, and Cancel."""

from __future__ import annotations

from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget


class StatusRow(QWidget):
    def __init__(self):
        super().__init__()
        column = QVBoxLayout(self)
        column.setContentsMargins(0, 0, 0, 0)
        self.status_label = QLabel("ready")
        self.status_label.setWordWrap(True)
        row = QHBoxLayout()
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current batch; the cache and the last good model stay")
        row.addWidget(self.progress_bar)
        row.addWidget(self.cancel_button)
        column.addWidget(self.status_label)
        column.addLayout(row)

    def say(self, text: str) -> None:
        self.status_label.setText(text)

    def busy(self) -> None:
        """A job started: a progress bar that moves without a count, until the job reports one."""
        self.progress_bar.setRange(0, 0)

    def show_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(int(done))

    def finished(self) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
