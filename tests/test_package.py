"""What napari and pip see of the package: manifest, cheap import, console command."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import napari_dinofuse

ROOT = Path(__file__).resolve().parents[1]
# The console script pip installed beside this interpreter (the venv may not be on PATH).
DINOFUSE = str(Path(sys.executable).with_name("dinofuse"))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_import_pulls_in_neither_torch_nor_qt():
    result = _python("import sys, napari_dinofuse; "
                     "print(sorted(m for m in ('torch', 'transformers', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6', "
                     "'napari') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_npe2_validates_manifest_with_imports():
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-dinofuse", "--imports"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()


def test_top_level_manifest_is_the_packaged_one():
    packaged = Path(napari_dinofuse.__file__).with_name("napari.yaml")
    assert (ROOT / "napari.yaml").samefile(packaged)


def test_distribution_metadata_for_the_plugin_manager():
    meta = metadata.metadata("napari-dinofuse")
    assert "Framework :: napari" in meta.get_all("Classifier")
    assert meta["Requires-Python"].startswith(">=3.11")
    requires = [r.split(";")[0].lower() for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert not any(r.startswith(("pyqt", "pyside")) for r in requires), requires
    entry_points = metadata.entry_points(group="napari.manifest")
    assert any(ep.value == "napari_dinofuse:napari.yaml" for ep in entry_points)


@pytest.mark.parametrize("modules", [
    "napari_dinofuse._napari.reader, napari_dinofuse.io",  # opening a file in napari
    "napari_dinofuse._napari.widgets, napari_dinofuse.session",  # building the dock widget
    "napari_dinofuse._napari.sample_data",  # napari's sample-data menu
])
def test_what_napari_loads_at_start_imports_no_torch(modules):
    """torch takes seconds to import: napari's start-up and the widget's first paint must not wait for it."""
    result = _python(f"import sys; import {modules}; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_cli_help_lists_subcommands_without_importing_torch():
    result = _python("import sys\nfrom napari_dinofuse.cli import main\n"
                     "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                     "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    assert result.returncode == 0, result.stderr
    for command in ("check-backbone", "extract", "cache", "train", "predict", "demo"):
        assert command in result.stdout
    assert result.stdout.strip().endswith("NO-TORCH")


def test_cli_unreachable_weights_give_one_clear_line():
    # HF_HUB_OFFLINE makes the hub unreachable at once (as on a machine without network).
    result = subprocess.run([DINOFUSE, "check-backbone", "--backbone", "facebook/dinov3-vits16-pretrain-lvd1689m"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1
    assert "licence" in error_lines[0] and "save_pretrained" in error_lines[0]


def test_cli_check_backbone_runs_a_random_backbone_and_says_so():
    result = subprocess.run([DINOFUSE, "check-backbone", "--backbone", "random:tiny", "--size", "40"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NOT DINOv3" in result.stdout
    assert "(64, 3, 3)" in result.stdout  # 40 px -> ceil(40/16) = 3 patches, 64-d
