#!/usr/bin/env bash
# Install ftflow and its test tools into the current Python environment (a virtual environment, or the
# system Python as root).
# torch is installed first, pinned, when absent: an unpinned range would pull a multi-GB CUDA build.
# On a GPU machine, install the torch build for your CUDA first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Debian packages: WordNet 3.0 for the synonym / random_insert augmentations (read offline; nothing is
# downloaded at run time), and Chromium for the headless test of the Prefect UI (tests/ops/test_ui.py).
apt_packages=()
[ -f /usr/share/wordnet/index.noun ] || apt_packages+=(wordnet-base)
command -v chromium >/dev/null || apt_packages+=(chromium)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"
  else
    for package in "${apt_packages[@]}"; do
      case "$package" in
        wordnet-base) echo "WordNet missing: sudo apt-get install -y --no-install-recommends wordnet-base (or set augment.nltk_data_dir / NLTK_DATA)" >&2 ;;
        chromium) echo "Chromium missing: sudo apt-get install -y --no-install-recommends chromium (the UI test is skipped without it)" >&2 ;;
      esac
    done
  fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "torch==${FTFLOW_TORCH_VERSION:-2.13.0}"
fi
# The tested set of versions (constraints.txt, torch excepted: see above); FTFLOW_LATEST=1 takes the newest
# releases that pyproject.toml's ranges allow instead.
constraints=()
if [ "${FTFLOW_LATEST:-0}" != 1 ] && [ -f constraints.txt ]; then
  constraints=(--constraint constraints.txt)
fi
"$PYTHON" -m pip install --quiet "${constraints[@]}" -e ".[dev]"
