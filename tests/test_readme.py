"""The Python examples of the README and docs/ run as written."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(f"{path.name}:{i}", code)
          for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    """MNIST-1D is generated into a cache of this test run, not the user's."""
    monkeypatch.setenv("JBP_CACHE", str(tmp_path_factory.getbasetemp() / "jbp-cache"))


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_python_block_runs(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    if "compare_grads" in code:
        assert "all leaves agree" in out.getvalue()


def test_readme_quotes_real_error_message():
    import jax.numpy as jnp
    import jax
    import jbp

    model = jbp.mlp([40, 100, 100, 10])
    _, params = model.init(jax.random.key(0), (40,))
    with pytest.raises(ValueError) as err:
        model.apply(params, jnp.ones((32, 39)))
    assert " ".join(str(err.value).split()) in " ".join(README.split())
