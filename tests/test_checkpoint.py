"""Checkpoints: round trip of params + optax state + step + key, refusal of bad files."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from jbp import checkpoint


def _state(sizes=(4, 8, 3), seed=0):
    model = jbp.mlp(list(sizes))
    _, params = model.init(jax.random.key(seed), (sizes[0],))
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    # one real update so the optimizer moments are non-zero
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": 7,
            "key": jax.random.key(seed + 1)}


def _assert_tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_params_optimizer_step_and_key(tmp_path):
    state = _state()
    path = checkpoint.save(tmp_path / "ck.npz", state, meta={"epoch": 2, "note": "x"})
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was moved into place
    restored, meta = checkpoint.load(path, _state(seed=5))  # template: other values, same shapes
    _assert_tree_equal(restored, state)
    assert restored["step"] == 7 and isinstance(restored["step"], int)
    assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    assert meta == {"epoch": 2, "note": "x"}
    assert checkpoint.read_meta(path) == meta
    # the restored key draws the same numbers as the saved one
    assert jax.random.normal(restored["key"]) == jax.random.normal(state["key"])


def test_file_holds_no_pickle(tmp_path):
    path = checkpoint.save(tmp_path / "ck.npz", _state())
    with np.load(path, allow_pickle=False) as f:
        for name in f.files:
            assert f[name].dtype != object


def test_overwrite_is_atomic_and_keeps_the_latest(tmp_path):
    path = tmp_path / "ck.npz"
    checkpoint.save(path, {"step": 1})
    checkpoint.save(path, {"step": 2})
    assert checkpoint.load(path, {"step": 0})[0]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_rejects_a_checkpoint_of_a_different_model_naming_the_leaf(tmp_path):
    path = checkpoint.save(tmp_path / "ck.npz", _state((4, 8, 3)))
    with pytest.raises(ValueError, match=r"different model: leaf \S*\[0\]\['W'\] "
                                         r"has shape \(4, 8\)"):
        checkpoint.load(path, _state((4, 16, 3)))
    # one layer more: the first leaf that differs is the second layer's weight matrix
    with pytest.raises(ValueError, match=r"different model: leaf \['opt_state'\]\S*\[2\]\['W'\] "
                                         r"has shape \(8, 3\).*expects shape \(8, 8\)"):
        checkpoint.load(path, _state((4, 8, 8, 3)))
    # a tree that only lacks a leaf at its end names that leaf as missing
    path = checkpoint.save(tmp_path / "short.npz", {"a": np.zeros(2)})
    with pytest.raises(ValueError, match=r"leaf \['b'\] is missing from the checkpoint"):
        checkpoint.load(path, {"a": np.zeros(2), "b": np.zeros(1)})


def test_rejects_wrong_dtype_naming_the_leaf(tmp_path):
    path = checkpoint.save(tmp_path / "ck.npz", {"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"leaf \['w'\].*dtype float32.*dtype int32"):
        checkpoint.load(path, {"w": np.zeros(3, np.int32)})


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_rejects_corrupt_files_naming_the_file(tmp_path, damage):
    state = _state()
    path = checkpoint.save(tmp_path / "ck.npz", state)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":  # inside a weight matrix's data: the zip CRC no longer matches
        at = raw.find(np.asarray(state["params"][0]["W"]).tobytes())
        assert at > 0
        raw[at + 5] ^= 0xFF
    else:
        raw = bytearray(b"\x93NUMPY this is not a checkpoint")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="ck.npz: corrupt or unreadable checkpoint"):
        checkpoint.load(path, _state())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz does not exist"):
        checkpoint.load(tmp_path / "nope.npz", {"step": 0})


def test_mismatch_names_the_leaf_where_the_trees_first_part(tmp_path):
    # the checkpoint has an extra params leaf, the template an extra state leaf: the params
    # come first in the flattened tree, so theirs is the difference to name
    path = checkpoint.save(tmp_path / "ck.npz", {"params": {"v": np.zeros(2), "w": np.zeros(3)},
                                                 "state": {}})
    with pytest.raises(checkpoint.Mismatch, match=r"different model: leaf \['params'\]\['v'\]") \
            as err:
        checkpoint.load(path, {"params": {"w": np.zeros(3)}, "state": {"m": np.zeros(3)}})
    assert err.value.leaf == "['params']['v']"
    assert isinstance(err.value, ValueError)
