"""The one way to drive engine operations: progress, composition, cancel."""

from napari_dinofuse.progress import CANCELLED, Progress, drive, within


def _operation(steps, cleaned):
    try:
        for i in range(steps):
            yield Progress(i + 1, steps, "step")
        return "result"
    finally:
        cleaned.append(True)  # e.g. a writer storing what was computed


def test_drive_reports_each_step_and_returns_the_result():
    seen, cleaned = [], []
    assert drive(_operation(3, cleaned), seen.append) == "result"
    assert [p.done for p in seen] == [1, 2, 3] and cleaned


def test_cancel_stops_between_steps_and_runs_the_cleanup():
    seen, cleaned = [], []
    assert drive(_operation(10, cleaned), seen.append, cancel=lambda: len(seen) == 2) is CANCELLED
    assert len(seen) == 2 and cleaned == [True]


def test_a_sub_operation_counts_inside_the_larger_one_and_is_closed_with_it():
    cleaned = []

    def outer():
        first = yield from within(_operation(2, cleaned), 0, 5, "part 1")
        yield from within(_operation(3, cleaned), 2, 5)
        return first

    seen = []
    assert drive(outer(), seen.append) == "result"
    assert [(p.done, p.total) for p in seen] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert seen[0].message == "part 1" and seen[2].message == "step"

    cleaned.clear()
    assert drive(outer(), seen.append, cancel=lambda: seen[-1].done == 3) is CANCELLED
    assert cleaned == [True, True]  # the first part finished; the second was closed mid-way by the cancel
