#!/usr/bin/env bash
# Install everything rankcut needs on a fresh Debian machine: the offline datasets (Debian packages) and a
# virtual environment with a CPU-only torch pinned by constraints.txt (an unpinned torch pulls CUDA builds).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -f /usr/share/wordnet/data.noun ] || need_apt+=(wordnet-base)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import torch, rankcut; print('rankcut', rankcut.__version__, 'with torch', torch.__version__)"
