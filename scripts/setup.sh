#!/usr/bin/env bash
# Create .venv (if missing) and install jbp with its test extras into it.
# Usage: bash scripts/setup.sh            (CPU)
#        JBP_EXTRAS=test,cuda bash scripts/setup.sh   (NVIDIA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${JBP_EXTRAS:-test}]"
echo "jbp installed in $(pwd)/.venv"
