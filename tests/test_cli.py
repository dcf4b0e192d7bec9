"""The experiments' shared command line: the backend choice and its hint, progress bars,
quick-run titles."""

import pytest

from jbp import cli


def test_a_missing_gpu_says_how_to_install_the_cuda_build(monkeypatch):
    def no_such(name=None):
        if name is not None:
            raise RuntimeError(f"Unknown backend {name}")
        return [type("D", (), {"platform": "cpu"})()]

    monkeypatch.setattr(cli.jax, "devices", no_such)
    with pytest.raises(ValueError, match=r"--platform gpu: no such backend here; available: "
                                         r"cpu; for an NVIDIA GPU install the CUDA build of "
                                         r"jaxlib with `JBP_EXTRAS=test,cuda bash "
                                         r"scripts/setup.sh`"):
        cli.select_platform("gpu")
    with pytest.raises(ValueError, match=r"--platform tpu: no such backend here; available: "
                                         r"cpu$"):
        cli.select_platform("tpu")


class _Terminal:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, text):
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("quick, no_progress, stdout, stderr, shown", [
    (False, False, True, True, True), (True, False, True, True, False),
    (False, True, True, True, False), (False, False, False, True, False),
    (False, False, True, False, False)])
def test_progress_bars_only_for_a_full_run_on_a_terminal(monkeypatch, quick, no_progress,
                                                          stdout, stderr, shown):
    monkeypatch.setattr(cli.sys, "stdout", _Terminal(stdout))
    monkeypatch.setattr(cli.sys, "stderr", _Terminal(stderr))
    args = cli.experiment_parser("x", "runs/x").parse_args(
        ["--quick"] * quick + ["--no-progress"] * no_progress)
    assert cli.show_progress(args) is shown


def test_a_quick_figure_says_so_and_zeros_are_not_drawn_as_small_numbers(tmp_path):
    plt = cli.plt()
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    cli.plot_with_zeros(ax, [0, 1, 2, 3], [0.0, 1e-7, 0.0, 3e-6], label="diff", marker="o")
    line, zeros = ax.get_lines()
    assert list(line.get_xdata()) == [1, 3] and list(line.get_ydata()) == [1e-7, 3e-6]
    assert list(zeros.get_xdata()) == [0, 2] and zeros.get_label() == "diff = 0"
    assert min(ax.get_ylim()) > 1e-9  # no point pulled the axis down to a fake "zero"
    texts = []
    fig.text = lambda *a, **k: texts.append(a[2])  # what save_figure writes on the figure
    cli.save_figure(fig, tmp_path / "quick.png", quick=True)
    assert texts == [cli.QUICK_NOTE] and (tmp_path / "quick.png").stat().st_size > 1000
