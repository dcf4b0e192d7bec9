#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the test suite. Extra arguments go to pytest.
# Two worker processes by default (JBP_TEST_WORKERS=N to change, 0 for none): the suite is
# bound by XLA's compiler, which uses one core; each test file runs whole in one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -n "${JBP_TEST_WORKERS:-2}" --dist loadfile "$@"
