"""The README's Python examples run as written."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
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
