#!/usr/bin/env bash
# Set up and run the demo: a tiny random checkpoint, synthetic paired clips, LoRA training with validation on CPU.
# `bash scripts/demo.sh [FOLDER] [--steps N]`: FOLDER (default demo_output/) is taken from the folder you run it in,
# as `longcat-tuner demo FOLDER` would; only the setup runs in the checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$ROOT" && bash scripts/setup.sh)
. "$ROOT/.venv/bin/activate"
echo "The demo trains a LoRA on a tiny RANDOM model: its validation videos are coloured noise by design."
echo "It proves the pipeline; at the end it prints where to look (loss curve, held-out loss, files)."
echo "To run longcat-tuner yourself afterwards (e.g. the train command it prints), first: . $ROOT/.venv/bin/activate"
exec longcat-tuner demo "$@"
