"""Several processes (hosts) with ``jax.distributed``: flags, start-up, stopping together.

Every process runs the same script. ``jax.distributed.initialize`` connects them through a
coordinator (process 0's address); after it, ``jax.devices()`` lists the devices of every
process and a mesh over them (``jbp.data_mesh()``) spans all hosts. On CPU the collectives
go over Gloo (TCP), on GPU over NCCL, on TPU over the chips' own links.

Three ways to start:

- explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` in every process
  (``scripts/launch_local.sh N`` does it on this machine, 127.0.0.1 only);
- ``--coordinator auto``: ``jax.distributed.initialize()`` reads the cluster from its
  environment (Slurm, Open MPI / mpi4py, a Cloud TPU slice);
- no ``--coordinator``: one process, ``jax.distributed`` is not started.

If a process dies, JAX's coordination service notices its missing heartbeats
(``--heartbeat-timeout`` seconds) and terminates the others with an error that says so;
a Python error in one process ends it at once (:func:`stop_together`), so the others stop
within that time instead of waiting in a collective for ever.
"""

import argparse
import contextlib
import os
import sys
import traceback

import jax

AUTO = "auto"


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coordinator``, ``--num-processes``, ``--process-id`` and the two timeouts."""
    group = parser.add_argument_group("several processes (jax.distributed)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator; 'auto' lets "
                            "jax.distributed.initialize() detect Slurm, Open MPI or a TPU slice "
                            "(default: one process)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="how many processes take part: needed with --coordinator HOST:PORT, "
                            "found by --coordinator auto (default: this process alone)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's rank, 0 .. num-processes-1: needed with --coordinator "
                            "HOST:PORT, found by --coordinator auto (default: this process "
                            "alone)")
    group.add_argument("--init-timeout", type=int, default=300,
                       help="seconds to wait for every process to connect")
    group.add_argument("--heartbeat-timeout", type=int, default=100,
                       help="seconds without a heartbeat after which a process counts as dead "
                            "and the others stop")
    return parser


def check_flags(coordinator, num_processes, process_id) -> None:
    """A ValueError unless the three flags make sense together."""
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT "
                             "(or --coordinator auto)")
        return
    if coordinator == AUTO:
        return
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT (e.g. 127.0.0.1:12345) or 'auto', "
                         f"got {coordinator!r}")
    if num_processes is None or process_id is None:
        raise ValueError(f"--coordinator {coordinator} needs --num-processes and --process-id")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must lie in 0 .. {num_processes - 1} for "
                         f"--num-processes {num_processes}, got {process_id}")


def initialize(coordinator=None, num_processes=None, process_id=None, *,
               init_timeout: int = 300, heartbeat_timeout: int = 100) -> bool:
    """Start ``jax.distributed`` as the flags say; return whether it was started.

    Call it before anything else touches JAX's devices. ``coordinator=None`` (with the other
    two None) is a single process: nothing is started.
    """
    check_flags(coordinator, num_processes, process_id)
    if coordinator is None:
        return False
    kwargs = {"initialization_timeout": init_timeout,
              "heartbeat_timeout_seconds": heartbeat_timeout,
              "shutdown_timeout_seconds": max(10, heartbeat_timeout)}
    if coordinator == AUTO:
        jax.distributed.initialize(num_processes=num_processes, process_id=process_id, **kwargs)
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    return True


def initialize_from_args(args) -> bool:
    """:func:`initialize` with the flags of :func:`add_flags`; bad flags end the script
    with the error (exit status 2, like argparse)."""
    try:
        return initialize(args.coordinator, args.num_processes, args.process_id,
                          init_timeout=args.init_timeout,
                          heartbeat_timeout=args.heartbeat_timeout)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def is_main_process() -> bool:
    """True in process 0, the one that logs and writes files."""
    return jax.process_index() == 0


@contextlib.contextmanager
def stop_together():
    """In a multi-process run, turn an exception into an immediate exit (status 1) after
    printing it: the other processes then see this one's heartbeats stop and terminate,
    instead of waiting in a collective that will never complete. Alone, it does nothing."""
    try:
        yield
    except BaseException as err:
        if jax.process_count() == 1 or isinstance(err, SystemExit) and not err.code:
            raise
        traceback.print_exc()
        print(f"process {jax.process_index()}: stopping all {jax.process_count()} processes "
              f"after this error", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
