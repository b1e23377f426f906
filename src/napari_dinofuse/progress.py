"""Progress events of long engine operations, and a driver that runs one to its end.

Every long operation (extraction, training, prediction) is a generator that yields :class:`Progress`
between batches and returns its result. A driver shows progress and stops the work by closing the
generator (GUI Cancel, Ctrl-C): the operation then ends at a batch boundary with its finished work saved.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    message: str = ""
    metrics: dict = field(default_factory=dict)  # e.g. {"loss": 0.31} while training

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def run_to_end(generator: Generator):
    """Drive an engine generator to its end and return its value (scripts, tests, CLI without a bar)."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value
