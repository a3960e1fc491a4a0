#!/usr/bin/env bash
# Set up and run the demo: a tiny random checkpoint, synthetic paired clips, LoRA training with validation on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec longcat-tuner demo "$@"
