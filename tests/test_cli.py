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
