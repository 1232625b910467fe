#!/usr/bin/env bash
# Install lmforge into a virtual environment (default .venv; set VENV to change it).
#   scripts/install.sh         the package and its runtime dependencies
#   scripts/install.sh --dev   plus the test tools (pytest, transformers for the export checks) and Debian's
#                              Chromium for the browser tests (scripts/install_chromium.sh: apt-get, as root)
#   scripts/install.sh --bench plus the peers the benchmarks compare against
# Without an NVIDIA GPU it installs the CPU build of PyTorch (pinned, small, no CUDA download); with one it lets
# pip pick the default CUDA build. Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose the
# index torch comes from, or TORCH_SPEC to choose the version. An already installed torch >= 2.5 is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS=""
DEV=""
for arg in "$@"; do
  case "$arg" in
    --dev) EXTRAS="${EXTRAS:+$EXTRAS,}dev"; DEV=1 ;;
    --bench) EXTRAS="${EXTRAS:+$EXTRAS,}bench" ;;
    *) echo "unknown option $arg (allowed: --dev, --bench)" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 5) else 1)
PY
then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the CUDA build of PyTorch"
    "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch>=2.5}"
  else
    echo "no GPU: installing the CPU build of PyTorch"
    "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi

"${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
[ -z "$DEV" ] || scripts/install_chromium.sh
"$VENV/bin/python" -c "import torch, lmforge; print(f'lmforge {lmforge.__version__} with torch {torch.__version__} in $VENV')"
