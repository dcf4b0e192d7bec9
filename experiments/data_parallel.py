"""Data-parallel training of the MNIST-1D MLP on 1, 2, 4, 8 devices and on 2 processes.

Each configuration trains with ``jbp.fit(..., mesh=...)`` (the batch split over the
devices, params replicated, XLA's all-reduce of the gradients) and, in the same process,
without a mesh; it reports how far the two runs' params and losses are apart, the time of
one training step (hand-written backward and ``jax.grad``, interleaved) and examples/s,
and the bytes all-reduced per step: the gradients' size, and what XLA's compiled program
all-reduces (parsed from its HLO text).

The device count must be fixed before JAX starts, so by default this script is a driver:
it runs itself once per configuration in a fresh process (``--worker``; on CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=K``, elsewhere on the first K
devices), the multi-process one as N processes on 127.0.0.1, and merges their results.
On a cluster run it once per process with ``--coordinator`` (or ``--coordinator auto``
under Slurm / Open MPI / on a TPU slice): that is one configuration over every device.

On a CPU the "devices" are threads of one machine sharing its cores: more of them
cannot make a step faster (and on 2 cores they make it slower); the timings show the
overhead of the sharded program and its all-reduce, not a speed-up.

Writes ``results.json``, ``curves.png`` (test accuracy and train loss per epoch for every
configuration over the single-device run) and ``scaling.png`` (step time and examples/s).

    .venv/bin/python experiments/data_parallel.py --out runs/data_parallel
    bash scripts/launch_local.sh 2 experiments/data_parallel.py --out runs/dp_2proc
"""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbp
from jbp import bench, data_parallel, distributed
from jbp.cli import (experiment_parser, plot_with_zeros, plt, save_figure, show_progress,
                     start_device)
from jbp.io import write_json

GRADS = ("manual", "autodiff")
FULL = {"hidden": [256, 256], "epochs": 20, "batch_size": 128, "rounds": 60,
        "device_counts": [1, 2, 4, 8], "processes": 2, "devices_per_process": 2}
QUICK = {"hidden": [32], "epochs": 2, "batch_size": 200, "rounds": 5,
         "device_counts": [2], "processes": 2, "devices_per_process": 1}
WORKER_TIMEOUT = 3600  # seconds one configuration may take before the driver gives up


def parse_args(argv=None):
    parser = experiment_parser(__doc__.splitlines()[0], "runs/data_parallel")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help=f"hidden layer widths (default {FULL['hidden']}; quick "
                             f"{QUICK['hidden']})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of each run (default {FULL['epochs']})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"global batch, split over the devices; must divide every device "
                             f"count (default {FULL['batch_size']})")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="float64 shows the agreement without float32 round-off")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed steps per gradient (default {FULL['rounds']})")
    parser.add_argument("--device-counts", type=int, nargs="+", default=None,
                        help=f"configurations of one process (default {FULL['device_counts']})")
    parser.add_argument("--processes", type=int, default=None,
                        help=f"also run this many processes on 127.0.0.1, 0 for none "
                             f"(default {FULL['processes']})")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help=f"host devices of each of those processes (default "
                             f"{FULL['devices_per_process']})")
    parser.add_argument("--worker", action="store_true",
                        help="run one configuration in this process (on --devices devices) "
                             "instead of driving a sweep; implied by --coordinator")
    parser.add_argument("--devices", type=int, default=None,
                        help="with --worker: use the first this many devices (default: all)")
    parser.add_argument("--no-plots", action="store_true",
                        help="write results.json only (the driver's workers do)")
    distributed.add_flags(parser)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.coordinator is not None:
        args.worker = True
    try:
        distributed.check_flags(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        parser.error(str(err))
    counts = args.device_counts + ([args.processes * args.devices_per_process]
                                   if args.processes else [])
    bad = [n for n in counts + ([args.devices] if args.devices else []) if args.batch_size % n]
    if bad:
        parser.error(f"--batch-size {args.batch_size} does not divide the device counts {bad}")
    return args


# ---------------------------------------------------------------------------- one configuration

def max_rel(a, b) -> float:
    """Max over leaves of ‖a − b‖/‖b‖ (float64, on the host)."""
    errs = []
    for p, q in zip(jax.tree_util.tree_leaves(data_parallel.gather(a)),
                    jax.tree_util.tree_leaves(data_parallel.gather(b)), strict=True):
        p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
        errs.append(float(np.linalg.norm(p - q) / max(np.linalg.norm(q), 1e-300)))
    return max(errs)


def step_times(model, loss, params, optimizer, mesh, data, batch_size, rounds):
    """Median step time (s) of each gradient: the sharded step on ``mesh``, interleaved,
    on one fixed batch, plus what XLA all-reduces in that step."""
    out = {}
    idx = np.arange(batch_size)
    thunks = {}
    for grad in GRADS:
        dp = data_parallel.DataParallel(model, loss, grad, optimizer, mesh, False, data.x_train,
                                   data.y_train)
        p, s = dp.place(params), dp.place(optimizer.init(params))
        xb, yb = dp._global(idx, 0)
        key = jax.random.key(0)
        text = dp.step.lower(p, s, {}, xb, yb, key).compile().as_text()
        out[grad] = {"collectives": data_parallel.collective_bytes(text)}
        thunks[grad] = (lambda dp=dp, p=p, s=s, xb=xb, yb=yb, key=key:
                        dp.step(p, s, {}, xb, yb, key))
    times = bench.interleaved_times(thunks, rounds, warmup=2, swap=[GRADS])
    for grad in GRADS:
        out[grad]["time"] = bench.summary(times[grad])
        out[grad]["examples_per_s"] = batch_size / out[grad]["time"]["median"]
    return out


def run_worker(args) -> dict:
    """Train with and without the mesh, time the steps; every process returns the same."""
    data = jbp.data.load_mnist1d()
    dtype = jnp.dtype(args.dtype)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    data = data._replace(x_train=data.x_train.astype(dtype), x_test=data.x_test.astype(dtype))
    devices = jax.devices() if args.devices is None else jax.devices()[:args.devices]
    if args.devices is not None and len(devices) < args.devices:
        raise SystemExit(f"error: --devices {args.devices}, but only {len(devices)} exist here")
    mesh = jbp.data_mesh(devices)
    model = jbp.mlp([data.x_train.shape[1], *args.hidden, 10], "relu", dtype=dtype)
    _, params = model.init(jax.random.key(args.seed), (data.x_train.shape[1],))
    loss = jbp.losses.softmax_cross_entropy
    optimizer = optax.adam(args.lr)
    main = distributed.is_main_process()
    label = (f"{jax.process_count()} processes x {devices_text(jax.local_device_count())}"
             if jax.process_count() > 1 else devices_text(len(devices)))

    runs = {}
    for name, where in (("single", None), ("mesh", mesh)):
        snapshots = [data_parallel.gather(params)]
        start = time.perf_counter()
        final, history = jbp.fit(model, loss, params, data, key=jax.random.key(args.seed + 1),
                                 optimizer=optimizer, epochs=args.epochs,
                                 batch_size=args.batch_size, grad="manual", mesh=where,
                                 progress=main and show_progress(args),
                                 on_epoch=lambda e, p, h: snapshots.append(data_parallel.gather(p)))
        runs[name] = {"params": final, "history": history, "snapshots": snapshots,
                      "seconds": time.perf_counter() - start}
    loss_single = np.array(runs["single"]["history"]["loss"])
    loss_mesh = np.array(runs["mesh"]["history"]["loss"])
    timing = step_times(model, loss, params, optimizer, mesh, data, args.batch_size, args.rounds)
    single = None  # the step on one of this process's devices, for the same-process ratio
    if len(devices) > 1 and not args.quick:
        single = step_times(model, loss, params, optimizer,
                            jbp.data_mesh(jax.local_devices()[:1]), data, args.batch_size,
                            args.rounds)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    return {
        "label": label, "devices": len(devices), "processes": jax.process_count(),
        "n_params": n_params, "grad_bytes": data_parallel.tree_bytes(params),
        "max_rel_param_diff": max_rel(runs["mesh"]["params"], runs["single"]["params"]),
        "param_rel_diff_per_epoch": [max_rel(a, b) for a, b in zip(
            runs["mesh"]["snapshots"], runs["single"]["snapshots"], strict=True)],
        "max_rel_loss_diff": float(np.max(np.abs(loss_mesh - loss_single)
                                          / np.abs(loss_single))),
        "history": {name: r["history"]["eval"] for name, r in runs.items()},
        "fit_seconds": {name: r["seconds"] for name, r in runs.items()},
        "step": timing, "step_one_device_same_process": single,
    }


# ---------------------------------------------------------------------------- the driver

def devices_text(n: int) -> str:
    return f"{n} device{'s' * (n != 1)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_argv(args, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out),
            "--seed", str(args.seed), "--hidden", *map(str, args.hidden),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--dtype", args.dtype, "--rounds", str(args.rounds),
            "--init-timeout", str(args.init_timeout),
            "--heartbeat-timeout", str(args.heartbeat_timeout), "--no-plots"]
    if args.quick:
        argv.append("--quick")
    if args.platform:
        argv += ["--platform", args.platform]
    return argv


def child_env(host_devices: int) -> dict:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    return os.environ | {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count="
                                      f"{host_devices}".strip()}


def run_children(commands, env) -> None:
    """Start the processes, wait for all; if one fails, stop the others and fail."""
    procs = [subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
             for cmd in commands]
    deadline = time.time() + WORKER_TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.time() > deadline:
                why = (f"exit status {failed[0].returncode}" if failed
                       else f"no end after {WORKER_TIMEOUT} s")
                raise SystemExit(f"error: a worker failed ({why}): {' '.join(commands[0])}")
            time.sleep(0.2)
        if any(p.returncode for p in procs):
            raise SystemExit(f"error: a worker failed (exit status "
                             f"{max(p.returncode for p in procs)})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def drive(args, platform: str) -> list[dict]:
    """Run every configuration in fresh processes; return their runs."""
    configs = [(n, 1, n) for n in args.device_counts]
    if args.processes and platform != "cpu":
        print(f"note: skipping the {args.processes}-process run on 127.0.0.1: it splits CPU host "
              f"devices between processes; on {platform} start one process per host with "
              f"--coordinator (see docs/scaling.md)", file=sys.stderr)
    elif args.processes:
        configs.append((args.processes * args.devices_per_process, args.processes,
                        args.devices_per_process))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (total, processes, per_process) in enumerate(configs):
            out = Path(tmp) / f"run{i}"
            what = (f"{processes} processes x {devices_text(per_process)}" if processes > 1
                    else devices_text(total))
            print(f"[{i + 1}/{len(configs)}] {what} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            base = worker_argv(args, out)
            if processes == 1:
                commands = [base + ["--devices", str(total)]]
            else:
                port = free_port()
                commands = [base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                    str(processes), "--process-id", str(p)]
                            for p in range(processes)]
            run_children(commands, child_env(per_process))
            run = json.loads((out / "results.json").read_text())["runs"][0]
            run["wall_seconds"] = time.perf_counter() - start
            runs.append(run)
    return runs


# ---------------------------------------------------------------------------- report

def plot(out: Path, runs: list[dict], quick: bool = False) -> None:
    pyplot = plt()
    fig, (ax_acc, ax_loss, ax_diff) = pyplot.subplots(1, 3, figsize=(16, 4))
    base = runs[0]["history"]["single"]
    epochs = [e["epoch"] for e in base]
    ax_acc.plot(epochs, [e["test_accuracy"] for e in base], color="black", lw=4, alpha=0.25,
                label="1 device, no mesh")
    ax_loss.plot(epochs, [e["train_loss"] for e in base], color="black", lw=4, alpha=0.25,
                 label="1 device, no mesh")
    for run in runs:
        ev = run["history"]["mesh"]
        ax_acc.plot([e["epoch"] for e in ev], [e["test_accuracy"] for e in ev], lw=1,
                    label=run["label"])
        ax_loss.plot([e["epoch"] for e in ev], [e["train_loss"] for e in ev], lw=1,
                     label=run["label"])
        diffs = run["param_rel_diff_per_epoch"]
        ax_diff.set_yscale("log")
        plot_with_zeros(ax_diff, range(len(diffs)), diffs, marker="o", ms=3, lw=1,
                        label=run["label"])
    ax_diff.set(xlabel="epoch", ylabel="max over leaves of ‖θ_mesh − θ_1‖ / ‖θ_1‖",
                title="params vs the single-device run")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="train loss", yscale="log")
    for ax in (ax_acc, ax_loss, ax_diff):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("MNIST-1D MLP, data-parallel (jbp.fit mesh=...) over the single-device run")
    save_figure(fig, out / "curves.png", quick=quick)

    fig, (ax_t, ax_e) = pyplot.subplots(1, 2, figsize=(11, 4))
    labels = [run["label"] for run in runs]
    pos = np.arange(len(runs))
    for k, grad in enumerate(GRADS):
        med = [run["step"][grad]["time"]["median"] * 1e3 for run in runs]
        lo = [m - run["step"][grad]["time"]["q25"] * 1e3 for m, run in zip(med, runs)]
        hi = [run["step"][grad]["time"]["q75"] * 1e3 - m for m, run in zip(med, runs)]
        ax_t.bar(pos + (k - 0.5) * 0.4, med, 0.4, yerr=[lo, hi], label=grad)
        ax_e.bar(pos + (k - 0.5) * 0.4, [run["step"][grad]["examples_per_s"] for run in runs],
                 0.4, label=grad)
    ax_t.set(ylabel="ms per step (median, IQR)", title="training step time")
    ax_e.set(ylabel="examples / s", title="throughput")
    for ax in (ax_t, ax_e):
        ax.set_xticks(pos, labels, rotation=20, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, out / "scaling.png", quick=quick)


def report(runs: list[dict]) -> None:
    first = runs[0]
    print(f"model: MLP, {first['n_params']} params; gradients all-reduced per step: "
          f"{first['grad_bytes']} bytes")
    print(f"{'configuration':<26}{'ms manual':>10}{'ms autodiff':>12}{'ex/s manual':>12}"
          f"{'HLO all-reduce B':>17}{'test acc':>9}{'(1 dev)':>8}{'param rel diff':>15}"
          f"{'(epoch 1)':>11}")
    for run in runs:
        step = run["step"]
        hlo = step["manual"]["collectives"].get("all-reduce", {"bytes": 0})["bytes"]
        acc = run["history"]["mesh"][-1]["test_accuracy"]
        acc1 = run["history"]["single"][-1]["test_accuracy"]
        print(f"{run['label']:<26}{step['manual']['time']['median'] * 1e3:>10.3f}"
              f"{step['autodiff']['time']['median'] * 1e3:>12.3f}"
              f"{step['manual']['examples_per_s']:>12.0f}{hlo:>17}{acc:>9.3f}{acc1:>8.3f}"
              f"{run['max_rel_param_diff']:>15.2e}{run['param_rel_diff_per_epoch'][1]:>11.2e}")


# Assumed, not measured here: the bus bandwidth an all-reduce gets from a kind of link,
# and the latency of one step of the ring. Order-of-magnitude figures, for the estimate.
ASSUMED_LINKS = {
    "NVLink-class, one 8-GPU node": (8, 200e9, 5e-6),
    "PCIe-class, one 8-GPU node": (8, 20e9, 10e-6),
    "200 Gb/s network, 8 nodes x 8": (64, 25e9, 10e-6),
}


def ring_estimate(t1: float, grad_bytes: int, batch: int) -> list[dict]:
    """Step time on N accelerators from the measured one-device step ``t1`` (s) and a ring
    all-reduce of the gradients: 2(N−1)/N · bytes / bandwidth, plus 2(N−1) latencies."""
    rows = []
    for link, (n, bandwidth, latency) in ASSUMED_LINKS.items():
        transfer = 2 * (n - 1) / n * grad_bytes / bandwidth
        hops = 2 * (n - 1) * latency
        strong = t1 / n + transfer + hops  # the same global batch, split N ways
        weak = t1 + transfer + hops  # the same batch per device, N times the global batch
        rows.append({"link": link, "n": n, "assumed_bandwidth_GBps": bandwidth / 1e9,
                     "assumed_latency_us": latency * 1e6, "compute_ms": t1 * 1e3,
                     "transfer_ms": transfer * 1e3, "latency_ms": hops * 1e3,
                     "strong_step_ms": strong * 1e3, "strong_speedup": t1 / strong,
                     "weak_examples_per_s": n * batch / weak,
                     "weak_efficiency": t1 / weak})
    return rows


def report_estimate(rows: list[dict], batch: int) -> None:
    print(f"ring all-reduce estimate (bandwidths and latencies ASSUMED; compute: the measured "
          f"1-device step, {rows[0]['compute_ms']:.3f} ms at batch {batch}):")
    print(f"{'link (assumed)':<32}{'N':>4}{'GB/s':>6}{'µs/hop':>7}{'transfer ms':>12}"
          f"{'latency ms':>11}{'strong ms':>10}{'speedup':>8}{'weak eff.':>10}")
    for r in rows:
        print(f"{r['link']:<32}{r['n']:>4}{r['assumed_bandwidth_GBps']:>6.0f}"
              f"{r['assumed_latency_us']:>7.0f}{r['transfer_ms']:>12.4f}{r['latency_ms']:>11.3f}"
              f"{r['strong_step_ms']:>10.3f}{r['strong_speedup']:>8.2f}"
              f"{r['weak_efficiency']:>10.3f}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        distributed.initialize_from_args(args)
        with distributed.stop_together():
            with contextlib.redirect_stdout(sys.stdout if distributed.is_main_process()
                                            else io.StringIO()):
                info = start_device(args.platform)  # the device line from process 0 only
            runs = [run_worker(args)]
    else:
        info = start_device(args.platform)
        runs = drive(args, info["platform"])
    if args.worker and not distributed.is_main_process():
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "runs": runs, "device": info,
        "config": {"model": "mlp", "hidden": args.hidden, "epochs": args.epochs,
                   "batch_size": args.batch_size, "optimizer": "adam", "lr": args.lr,
                   "dtype": args.dtype, "rounds": args.rounds, "seed": args.seed,
                   "quick": args.quick, "data": "MNIST-1D (4000 train / 1000 test)",
                   "device_counts": None if args.worker else args.device_counts,
                   "processes": None if args.worker else args.processes,
                   "devices_per_process": None if args.worker else args.devices_per_process},
        "note": ("host devices of one CPU share its cores: more of them cannot be faster"
                 if info["platform"] == "cpu" else None),
    }
    one = [r for r in runs if r["devices"] == 1 and r["processes"] == 1]
    if one:
        results["estimate"] = ring_estimate(one[0]["step"]["manual"]["time"]["median"],
                                            one[0]["grad_bytes"], args.batch_size)
    write_json(args.out / "results.json", results)
    if args.no_plots:
        return results
    plot(args.out, runs, args.quick)
    report(runs)
    if one:
        report_estimate(results["estimate"], args.batch_size)
    if info["platform"] == "cpu":
        print(f"note: these 'devices' are threads sharing {info['cpu_count']} CPU cores; "
              f"more of them cannot make a step faster here")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'curves.png'}, "
          f"{args.out / 'scaling.png'}")
    return results


if __name__ == "__main__":
    main()
