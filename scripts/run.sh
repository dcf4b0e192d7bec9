#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the main job on the built-in default data (MNIST-1D).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The headline: one MLP on MNIST-1D trained with the hand-written backward and with jax.grad
# (a few minutes on a 2-core CPU). Extra arguments go to it, e.g. --platform gpu.
.venv/bin/python experiments/compare_training.py --out runs/compare_training "$@"
# A short gradient check: manual vs jax.grad vs finite differences.
.venv/bin/python experiments/gradient_check.py --quick --out runs/gradient_check
echo "plots: runs/compare_training/curves.png runs/compare_training/param_diff.png" \
     "and runs/gradient_check/ (results.json beside them)"
