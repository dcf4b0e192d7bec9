"""What every experiment script shares: its flags, the device choice, its output folder.

Each script in ``experiments/`` takes ``--quick`` (a tiny configuration, for the tests and
a first look), ``--seed``, ``--out DIR``, ``--platform {cpu,gpu,tpu}`` and
``--no-progress``, prints the device it runs on, and writes ``results.json`` plus PNG plots
into ``--out``. A quick run says so across the top of its plots (``save_figure(..., quick=True)``),
and only a full run on a terminal draws progress bars (:func:`show_progress`).
"""

import argparse
import importlib.util
import os
import platform as _platform
import sys
from pathlib import Path

import jax
import jaxlib

from jbp.io import write_atomic


CUDA_SETUP = "JBP_EXTRAS=test,cuda bash scripts/setup.sh"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: there the help says what happens."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def sibling(script: str, name: str):
    """The experiment script ``name``.py in the folder of ``script`` (a ``__file__``), loaded
    as a module: how one experiment reuses another's models."""
    path = Path(script).resolve().with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every experiment has."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration for the tests and a first look (seconds to "
                             "a few minutes on a CPU); its numbers are not the full run's")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--out", type=Path, default=Path(default_out),
                        help="folder for results.json and the PNG plots")
    parser.add_argument("--platform", choices=["cpu", "gpu", "tpu"], default=None,
                        help="JAX backend to run on (default: what JAX finds first)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (there are none either with --quick or when "
                             "the output is not a terminal)")
    return parser


def show_progress(args) -> bool:
    """Whether an experiment draws progress bars: not with ``--quick`` or ``--no-progress``,
    and not when stdout or stderr is not a terminal (a log file gets no bars)."""
    if getattr(args, "quick", False) or getattr(args, "no_progress", False):
        return False
    return sys.stdout.isatty() and sys.stderr.isatty()


QUICK_NOTE = "quick run (--quick): a tiny configuration, not the full run's results"



def select_platform(name: str | None) -> jax.Device:
    """Make ``name``'s first device the default one and return it.

    Raises a ValueError naming the backends that exist when ``name`` is not available.
    """
    if name is None:
        return jax.devices()[0]
    try:
        device = jax.devices(name)[0]
    except RuntimeError:
        available = sorted({d.platform for d in jax.devices()})
        hint = (f"; for an NVIDIA GPU install the CUDA build of jaxlib with "
                f"`{CUDA_SETUP}`" if name == "gpu" else "")
        raise ValueError(f"--platform {name}: no such backend here; available: "
                         f"{', '.join(available)}{hint}") from None
    jax.config.update("jax_default_device", device)
    return device


def device_info(device: jax.Device) -> dict:
    """What ran the experiment, for results.json and the printed header."""
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "cpu_count": os.cpu_count(),
        "processor": _platform.processor() or _platform.machine(),
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ''."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def start_device(platform: str | None) -> dict:
    """Select the backend for an experiment, print the device line it starts with, and
    return :func:`device_info`. A missing backend ends the script with an error that names
    the backends there are."""
    try:
        device = select_platform(platform)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    info = device_info(device)
    cpu = f"{info['cpu_model'] or info['processor']}, " if info["platform"] == "cpu" else ""
    print(f"device: {info['platform']} ({cpu}{info['device_kind']}), jax {info['jax']}, "
          f"{info['cpu_count']} CPUs")
    return info


def plt():
    """matplotlib.pyplot with a non-interactive backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def plot_with_zeros(ax, x, y, *, label=None, **style):
    """Plot ``y`` against ``x`` on ``ax`` (a log-scaled y axis): the positive values as a
    line, the exact zeros, which a log scale cannot show, as ▼ on the bottom edge (labelled
    "= 0") rather than at some small number."""
    import numpy as np

    x, y = np.asarray(x), np.asarray(y, dtype=float)
    positive = y > 0
    (line,) = ax.plot(x[positive], y[positive], label=label, **style)
    if not positive.all():
        ax.plot(x[~positive], np.full((~positive).sum(), 0.02), "v", ms=5,
                color=line.get_color(), transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"{label} = 0" if label else "= 0")
    return line


def save_figure(fig, path, *, dpi: int = 120, tight_rect=(0, 0, 1, 1),
                quick: bool = False) -> Path:
    """Lay ``fig`` out tightly within ``tight_rect`` (None: keep the figure's own layout),
    write it to ``path`` as a PNG, atomically (a plot is never left half-written), and
    close it. ``quick``: the figure is of a ``--quick`` run; a red line across its top
    says so (:data:`QUICK_NOTE`)."""
    if quick:
        fig.text(0.5, 0.995, QUICK_NOTE, ha="center", va="top", color="tab:red",
                 fontsize=9)
    if tight_rect is not None:
        left, bottom, right, top = tight_rect
        fig.tight_layout(rect=(left, bottom, right, top - 0.04 * quick))
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt().close(fig)
