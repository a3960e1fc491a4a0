#!/usr/bin/env bash
# Create .venv and install longcat-tuner into it. Torch is installed first from TORCH_SPEC
# (default torch==2.13.0, a CPU build on the project's machines; on a CUDA box use e.g. TORCH_SPEC="torch==2.11.*"
# with the matching index), so the package's own range never pulls several GB of CUDA wheels by surprise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-server}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" >/dev/null 2>&1 || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[${EXTRAS}]"
