#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the main job on the built-in default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python experiments/gradient_check.py --out runs/gradient_check "$@"
