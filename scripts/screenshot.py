"""Regenerate the README screenshot: the plugin after a fine-tune on the synthetic sample, in a real viewer.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot.py [docs/images/dinofuse.png]

Uses a random-initialised ViT (NOT DINOv3: no weights can be downloaded here), so the picture shows the
workflow and the layers, not the quality real DINOv3 features give.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path


def main(out: Path) -> None:
    warnings.simplefilter("ignore")
    import napari
    from qtpy.QtCore import QSettings
    from qtpy.QtWidgets import QApplication

    from napari_dinofuse._napari.widgets import DinofuseWidget
    from napari_dinofuse.synthetic.sample import make_sample

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("napari-dinofuse", "synthetic_em")
    # A throwaway settings store: the user's remembered settings neither steer nor record this run.
    store = QSettings(f"{tempfile.mkdtemp()}/dinofuse.ini", QSettings.Format.IniFormat)
    widget = DinofuseWidget(viewer, settings=store)
    viewer.window.add_dock_widget(widget, name="DINOfuse", area="right")
    widget.features_box.backbone_edit.setText("random:vits16")
    # The shipped recipe (base width, iterations) as a user gets it: the picture shows what the defaults give.
    labels = widget.new_annotation_layer()
    labels.data[:] = make_sample(seed=0).scribbles(seed=0)
    labels.refresh()
    widget.train_box.train_button.click()
    while widget.worker is not None:
        QApplication.processEvents()
        time.sleep(0.01)
    if not hasattr(widget.last_result, "arrays"):
        raise SystemExit(f"fine-tune failed: {widget.status_row.status_label.text()}")
    viewer.layers["context"].visible = False
    viewer.layers["prediction"].opacity = 0.45
    viewer.reset_view(layers=[viewer.layers["raw"]])
    for _ in range(20):
        QApplication.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/dinofuse.png"))
