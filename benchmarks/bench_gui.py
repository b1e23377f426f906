"""Viewer responsiveness while the dock widget works (issue: dock widgets). Run on demand, under Xvfb:

    xvfb-run -a python benchmarks/bench_gui.py [--backbone random:vits16] [--base-channels 16] [--iterations 60]

A QTimer probe fires every 10 ms on the main thread while the widget extracts features, fine-tunes and predicts
on the synthetic sample (whole volume), in a real napari viewer. Prints, per phase, the longest gap between two
probe ticks (a main-thread stall) and the 99th percentile, side by side with what one unit of that work takes
(what a blocking implementation would freeze the viewer for, at the least), and how long after the click the
region in view was shown (the prediction comes region in view first).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="random:vits16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import napari
    from qtpy.QtCore import QSettings, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_dinofuse._napari.widgets import DinofuseWidget
    from napari_dinofuse.progress import Preview
    from napari_dinofuse.synthetic.sample import make_sample

    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-dinofuse", "synthetic_em")
    # A throwaway settings store: the user's remembered settings neither steer nor record this run.
    store = QSettings(f"{tempfile.mkdtemp()}/dinofuse.ini", QSettings.Format.IniFormat)
    widget = DinofuseWidget(viewer, settings=store)
    viewer.window.add_dock_widget(widget)
    widget.features_box.backbone_edit.setText(args.backbone)
    widget.features_box.device_combo.setCurrentText(args.device)
    widget.model_box.base_spin.setValue(args.base_channels)
    widget.train_box.iterations_spin.setValue(args.iterations)
    labels = widget.new_annotation_layer()
    labels.data[:] = make_sample(seed=0).scribbles(seed=0)  # as if painted (the user's strokes)
    labels.refresh()

    gaps: list[float] = []
    ends: list[float] = []
    slow: list[tuple[float, str]] = []  # stalls over 50 ms, with what the widget was doing
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        ends.append(now)
        if now - last[0] > 0.05:
            slow.append((now - last[0], widget.status_row.status_label.text()[:70]))
        last[0] = now

    probe = QTimer()
    probe.timeout.connect(tick)
    probe.start(10)
    phases, in_view = {}, {}  # per phase: (seconds, stalls); seconds from the click to the region in view shown
    for name, button in (("extract features", widget.features_box.extract_button), ("fine-tune + predict", widget.train_box.train_button),
                         ("predict again", widget.predict_box.predict_button)):
        for _ in range(20):
            QApplication.processEvents()
        gaps.clear()
        ends.clear()
        losses: list[float] = []  # when each training step was reported
        last[0] = time.perf_counter()
        start = time.perf_counter()
        button.click()
        widget.worker.yielded.connect(lambda p, losses=losses: "loss" in p.metrics and
                                      losses.append(time.perf_counter()))

        def shown(p, handle=widget._on_progress, name=name, start=start):
            handle(p)  # the dock's own handler: it puts the region in view's labels in the viewer
            if p.partial is not None and not isinstance(p.partial, Preview):
                in_view.setdefault(name, time.perf_counter() - start)

        widget.worker.yielded.disconnect(widget._on_progress)
        widget.worker.yielded.connect(shown)
        while widget.worker is not None:
            QApplication.processEvents()
            time.sleep(0.001)
        seconds = time.perf_counter() - start
        settle = time.perf_counter() + 0.3  # the tick that ends a stall in the last slot arrives after it
        while time.perf_counter() < settle:
            QApplication.processEvents()
            time.sleep(0.001)
        phases[name] = (seconds, np.array(gaps[1:]) * 1000)
        if losses:  # the training steps alone, without the prediction and the layer updates after them
            inside = [g for g, t in zip(gaps, ends) if losses[0] < t <= losses[-1]]
            phases["  training steps only"] = (losses[-1] - losses[0], np.array(inside) * 1000)
        if not hasattr(widget.last_result, "arrays") and name != "extract features":
            raise SystemExit(f"{name} did not finish: {widget.status_row.status_label.text()}")
    probe.stop()

    log = widget.session.log
    per_iteration = log[-1]["seconds"] / len(log) * 1000
    print(f"backbone {args.backbone}, base {args.base_channels}, {args.iterations} iterations, raw "
          f"{viewer.layers['raw'].data.shape}, device {args.device}")
    print(f"{'phase':<22}{'wall s':>8}{'longest stall ms':>18}{'p99 ms':>8}{'ticks':>7}")
    for name, (seconds, ms) in phases.items():
        print(f"{name:<22}{seconds:8.1f}{ms.max():18.0f}{np.percentile(ms, 99):8.0f}{len(ms):7d}")
    for name, seconds in in_view.items():
        print(f"{name}: the region in view shown {seconds:.1f} s after the click, all of it {phases[name][0]:.1f} s")
    worst = phases["  training steps only"][1].max()
    print("stalls over 50 ms, with the status shown at the time:")
    for gap, status in sorted(slow, reverse=True)[:8]:
        print(f"  {gap * 1000:5.0f} ms  {status}")
    print(f"one training iteration takes {per_iteration:.0f} ms: a blocking implementation would stall at least "
          f"that long per iteration ({per_iteration / worst:.1f}x the longest stall while training), and "
          f"{phases['fine-tune + predict'][0]:.0f} s in all")
    viewer.close()


if __name__ == "__main__":
    main()
