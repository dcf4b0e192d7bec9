"""What every experiment script shares: its flags, the device choice, its output folder.

Each script in ``experiments/`` takes ``--quick`` (seconds, for the tests), ``--seed``,
``--out DIR`` and ``--platform {cpu,gpu,tpu}``, prints the device it runs on, and writes
``results.json`` plus PNG plots into ``--out``.
"""

import argparse
import os
import platform as _platform
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


def experiment_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every experiment has."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration that runs in seconds (used by the tests)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--out", type=Path, default=Path(default_out),
                        help="folder for results.json and the PNG plots")
    parser.add_argument("--platform", choices=["cpu", "gpu", "tpu"], default=None,
                        help="JAX backend to run on (default: what JAX finds first)")
    return parser


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


def save_figure(fig, path, *, dpi: int = 120, tight_rect=(0, 0, 1, 1)) -> Path:
    """Lay ``fig`` out tightly within ``tight_rect`` (None: keep the figure's own layout),
    write it to ``path`` as a PNG, atomically (a plot is never left half-written), and
    close it."""
    if tight_rect is not None:
        fig.tight_layout(rect=tight_rect)
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt().close(fig)
