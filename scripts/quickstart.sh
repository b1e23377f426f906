#!/usr/bin/env bash
# One entry point for the README's Quick start and for CI:
#   bash scripts/quickstart.sh demo   # set everything up, run the headless demo
#   bash scripts/quickstart.sh test   # set everything up, run the whole test suite
# Sets up (idempotently): Debian packages napari needs off-screen (Xvfb, Mesa, xcb), a virtual
# environment in .venv, a CPU build of torch, and this package with its testing and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-demo}"; shift || true
VENV="${DINOFUSE_VENV:-.venv}"
PY="${PYTHON:-python3}"

apt_packages=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3
  libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1)

install_system_packages() {
  command -v apt-get >/dev/null || { echo "no apt-get: install Xvfb and Mesa yourself" >&2; return; }
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo ">> installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python_packages() {
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 required" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install -q)
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    # The CPU build: a few hundred MB instead of several GB of CUDA libraries. Where the PyTorch
    # index cannot be reached, pip falls back to what the configured indexes offer.
    echo ">> installing torch (CPU build)"
    "${pip[@]}" --timeout 20 --retries 1 "torch==2.13.0" \
      --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
      || "${pip[@]}" "torch==2.13.0"
  fi
  echo ">> installing napari-dinofuse[testing,benchmark]"
  "${pip[@]}" -e ".[testing,benchmark]"
}

install_system_packages
install_python_packages
export PATH="$PWD/$VENV/bin:$PATH"

case "$what" in
  demo) exec dinofuse demo "$@" ;;
  test) exec python -m pytest "$@" ;;
  setup) ;;
  *) echo "usage: $0 demo|test|setup [args...]" >&2; exit 2 ;;
esac
