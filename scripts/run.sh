#!/usr/bin/env bash
# Set up .venv if needed, then run the pipeline: `python train/run.py` with the given overrides.
# Without arguments this is the CPU-sized `tiny` default (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train/run.py "$@"
