"""jbp.summary: a table of every layer (nested), its output shape, params and dtype, from
shapes alone. (tests/test_readme.py also prints it for every model of the README and docs.)"""

import jax
import jax.numpy as jnp
import pytest

import jbp
from jbp.model_summary import summary


def test_an_mlp_table_as_documented():
    lines = summary(jbp.mlp([4, 8, 3], activation="tanh"), (4,)).splitlines()
    assert lines[0].split() == ["layer", "output", "shape", "params", "dtype"]
    assert lines[2].split() == ["input", "(B,", "4)"]
    assert lines[3].split() == ["mlp([4,", "8,", "3],", "activation='tanh')", "(B,", "3)", "67",
                                "float32"]
    assert [line.split()[0] for line in lines[4:7]] == ["dense(8)", "tanh()", "dense(3)"]
    assert lines[-1] == "total: 67 params (268 B)"


def test_the_docstring_example_is_what_summary_prints():
    from jbp import model_summary
    doc = model_summary.__doc__
    shown = doc[doc.index("\nlayer  ") + 1:].rstrip()
    assert summary(jbp.mlp([4, 8, 3], activation="tanh"), (4,)) == shown


def test_nested_composites_state_and_token_ids():
    model = jbp.serial(jbp.embedding(20, 8), jbp.residual(jbp.serial(jbp.dense(8), jbp.relu())),
                       jbp.batch_norm(), jbp.parallel(jbp.dense(4, dtype=jnp.bfloat16),
                                                      jbp.dense(2), combine="concat"))
    lines = summary(model, (5,)).splitlines()
    rows = [(line[:len(line) - len(line.lstrip())], line.split()[0]) for line in lines[3:-2]]
    assert rows == [("", "serial(…)"), ("  ", "embedding(20,"), ("  ", "residual(…)"),
                    ("    ", "serial(…)"), ("      ", "dense(8)"), ("      ", "relu()"),
                    ("  ", "batch_norm()"), ("  ", "parallel(…)"), ("    ", "dense(4,"),
                    ("    ", "dense(2)")]
    assert "(B, 5, 6)" in lines[3] and "(B, 5, 4)" in lines[11]
    n = 20 * 8 + (8 * 8 + 8) + 2 * 8 + (8 * 4 + 4) + (8 * 2 + 2)
    assert lines[3].split()[-3:] == [f"{n:,}", "bfloat16,", "float32"]
    assert n == 302  # 36 in bfloat16 (2 bytes), 266 in float32: 1136 bytes
    assert lines[-1] == "total: 302 params (1.1 KiB), state: 16 values (not trained)"


def test_no_params_are_drawn_and_bad_input_is_named():
    big = jbp.mlp([4096, 4096, 4096])  # 16.8M params: shapes only, nothing allocated
    assert summary(big, (4096,)).splitlines()[-1] == "total: 33,562,624 params (128.0 MiB)"
    with pytest.raises(TypeError, match="summary: model must be a jbp Layer, got function"):
        summary(jbp.dense, (4,))
    with pytest.raises(TypeError, match="summary: in_shape must be a tuple of ints"):
        summary(jbp.dense(3), 4)
    with pytest.raises(ValueError, match=r"built for per-example input shape \(40,\), got \(39,\)"):
        summary(jbp.mlp([40, 10]), (39,))
    jbp.print_summary(jbp.dense(3), (4,), input_dtype=jnp.float32)
