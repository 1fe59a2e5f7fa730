#!/usr/bin/env bash
# Create .venv and install PoD with everything it needs. Idempotent: re-runs only when
# pyproject.toml changed. torch is installed first and pinned, so that no other requirement pulls
# a newer torch with GBs of CUDA packages onto a CPU machine (on a GPU cluster the same pin
# installs the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.pod-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "== setting up .venv (first run takes ~2 minutes)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
# DeepSpeed's C++ ops are built on first use (or not at all on CPU); skip building them at install.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[dev,eval]"
echo "$want" > "$stamp"
echo "== .venv ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
