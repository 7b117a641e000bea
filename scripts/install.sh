#!/usr/bin/env bash
# Install ftflow and its test tools into the current Python environment.
# torch is installed first, pinned, when absent: an unpinned range would pull a multi-GB CUDA build.
# On a GPU machine, install the torch build for your CUDA first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==${FTFLOW_TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
