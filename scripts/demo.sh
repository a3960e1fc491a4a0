#!/usr/bin/env bash
# Set up and run the demo: a tiny random checkpoint, synthetic paired clips, LoRA training with validation on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "The demo trains a LoRA on a tiny RANDOM model: its validation videos are coloured noise by design."
echo "It proves the pipeline; at the end it prints where to look (loss curve, held-out loss, files)."
exec longcat-tuner demo "$@"
