#!/usr/bin/env bash
# Start N processes of a jbp experiment on this machine (127.0.0.1 only), connected by
# jax.distributed, and wait for all of them; fail if any fails (the others are stopped).
#
#   bash scripts/launch_local.sh N [SCRIPT.py] [ARGS...]
#
# SCRIPT defaults to experiments/data_parallel.py; each process gets ARGS plus
# --coordinator 127.0.0.1:PORT --num-processes N --process-id I (PORT: a free one).
# Every process sees JBP_HOST_DEVICES CPU devices (default 1; sets
# XLA_FLAGS=--xla_force_host_platform_device_count); PYTHON picks the interpreter
# (default .venv/bin/python, else python3). Output lines are prefixed with [pI].
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash scripts/launch_local.sh N [SCRIPT.py] [ARGS...]  (N: processes, >= 1)" >&2
    exit 2
fi
n=$1
shift
script=experiments/data_parallel.py
if [[ $# -gt 0 && "$1" == *.py ]]; then
    script=$1
    shift
fi
python=${PYTHON:-.venv/bin/python}
[[ -x "$python" ]] || python=python3
host_devices=${JBP_HOST_DEVICES:-1}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="$flags --xla_force_host_platform_device_count=$host_devices"

set -m  # each process (with its output filter) in a process group of its own
pids=()
stop_all() {  # SIGKILL: a process in jax.distributed takes SIGTERM as a preemption notice
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do  # and wait (up to 10 s) until every process of them is gone
        for ((tries = 0; tries < 100; tries++)); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.1
        done
    done
}
trap 'stop_all; exit 130' INT TERM
echo "launching $n processes of $script on 127.0.0.1:$port ($host_devices CPU devices each)" >&2
for ((i = 0; i < n; i++)); do
    (
        set +m -o pipefail  # the pipeline stays in this process group
        "$python" -u "$script" "$@" --coordinator "127.0.0.1:$port" --num-processes "$n" \
            --process-id "$i" 2>&1 | sed -u "s/^/[p$i] /"
    ) &
    pids+=($!)
done

status=0
for ((left = n; left > 0; left--)); do
    if ! wait -n && [[ $status == 0 ]]; then  # the first process to fail stops the rest
        status=1
        echo "launch_local.sh: a process failed; stopping the others" >&2
        stop_all
    fi
done
exit $status
