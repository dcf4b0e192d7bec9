#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the benchmark: hand-written backward vs jax.grad over
# a grid of MLPs and two CNNs. Writes runs/benchmark/results.json and PNG plots. Extra
# arguments go to experiments/benchmark.py (e.g. --quick, --platform gpu, --models cnn,
# --batch 64,1024, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python experiments/benchmark.py --out runs/benchmark "$@"
