"""Progress events of long engine operations, and the one way to drive them.

Every long operation (extraction, training, prediction) is a generator that yields :class:`Progress`
between batches and returns its result; operations compose with ``yield from`` (or :func:`within`, which
places a sub-operation's steps inside a larger count). A driver (CLI, widget, cluster task, test) runs one with
:func:`drive`, showing progress and stopping the work by closing the generator (GUI Cancel, Ctrl-C): the
operation then ends at a batch boundary with its finished work saved.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

__all__ = ["CANCELLED", "Preview", "Progress", "cancellable", "drive", "within"]


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    message: str = ""
    metrics: dict = field(default_factory=dict)  # e.g. {"loss": 0.31} while training
    # A result that can be shown before the end, e.g. a prediction's sink once the region in view is written, or a
    # Preview while training.
    partial: object = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


class Preview(NamedTuple):
    """A region predicted with the weights of a model still training (a sink), after ``iteration`` of
    ``iterations``: shown for a while, replaced by the finished prediction."""

    sink: object
    iteration: int
    iterations: int


class _Cancelled:
    def __repr__(self) -> str:
        return "CANCELLED"


CANCELLED = _Cancelled()  # what a cancelled operation returns


def cancellable(generator: Generator, cancel: Callable[[], bool]) -> Generator[Progress, None, object]:
    """``generator``'s steps; once ``cancel()`` is true, it is closed (its cleanup runs) and CANCELLED returned."""
    while True:
        if cancel():
            generator.close()
            return CANCELLED
        try:
            step = next(generator)
        except StopIteration as finished:
            return finished.value
        yield step


def drive(generator: Generator, on_progress: Callable[[Progress], None] | None = None,
          cancel: Callable[[], bool] | None = None):
    """Run an operation to its end and return its value (CANCELLED if ``cancel()`` turned true first), calling
    ``on_progress`` with each step."""
    steps = cancellable(generator, cancel) if cancel is not None else generator
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            return finished.value
        if on_progress is not None:
            on_progress(step)


def within(generator: Generator, done: int, total: int, message: str = "") -> Generator[Progress, None, object]:
    """A sub-operation's steps as part of a larger one: its step k is reported as ``done + k`` of ``total``."""
    try:
        while True:
            try:
                step = next(generator)
            except StopIteration as finished:
                return finished.value
            yield replace(step, done=done + step.done, total=total, message=message or step.message)
    finally:
        generator.close()  # also when the outer operation is closed (Cancel) mid-way
