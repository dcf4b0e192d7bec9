"""experiments/torch_peer.py: the PyTorch twin of a jbp model computes jbp's loss and
gradients at the same weights, and the check that says so can fail.

Skipped without PyTorch (``pip install -e .[peers]``); CI has none. One tiny model per kind
of layer the benchmark's points use; each jbp gradient compiles once and is shared.
"""

import functools

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jbp  # noqa: E402
from conftest import load_script  # noqa: E402

tp = load_script("torch_peer")
mnist1d_models = load_script("mnist1d_models")
denoise_unet = load_script("denoise_unet")


def _cnn2d():
    block = [jbp.conv(4, 3), jbp.relu(), jbp.conv(4, 3), jbp.relu(), jbp.max_pool(2)]
    return jbp.serial(*block, *block, jbp.flatten(), jbp.dense(10))


def _attention(causal):
    # T 12 over blocks of 4 keys: jbp's blocked forward against PyTorch's own kernel
    return jbp.serial(jbp.dense(8), jbp.attention(2, 4, causal=causal, block_size=4),
                      jbp.global_avg_pool(), jbp.dense(10))


MODELS = {  # name -> (model, per-example input shape, batch)
    "mlp": (lambda: jbp.mlp([6, 16, 16, 10], "tanh"), (6,), 8),
    "cnn2d": (_cnn2d, (8, 8, 3), 4),
    "cnn1d": (lambda: mnist1d_models.build("cnn", 4)[0], (40, 1), 4),
    "unet1d": (lambda: jbp.serial(denoise_unet.unet(4, "conv_transpose", 1),
                                  jbp.global_avg_pool(), jbp.dense(10)), (16, 1), 4),
    **{cell: (lambda cell=cell: jbp.serial(getattr(jbp, cell)(8, return_sequences=False),
                                           jbp.dense(10)), (6, 4), 4)
       for cell in ("rnn", "gru", "lstm")},
    "attention": (lambda: _attention(False), (12, 4), 2),
    "attention_causal": (lambda: _attention(True), (12, 4), 2),
}


@functools.cache
def point(name):
    """(model, in_shape, params, x, y, jbp's loss, jbp's manual gradient): computed once."""
    build, in_shape, batch = MODELS[name]
    model = build()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *in_shape), np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    params = model.init(jax.random.key(1), in_shape)[1]
    loss, grads = jax.jit(jbp.manual_value_and_grad(model, jbp.losses.softmax_cross_entropy))(
        params, x, y)
    return model, in_shape, params, x, y, loss, grads


def check(name, corrupt=None):
    model, in_shape, params, x, y, loss, grads = point(name)
    peer = tp.peer_of(model, in_shape, params)
    if corrupt is not None:
        with torch.no_grad():
            corrupt(dict(peer.module.named_parameters()))
    return peer, tp.agreement(peer, tp.torch_input(peer, x), tp.torch_labels(y), loss, grads)


@pytest.mark.parametrize("name", list(MODELS))
def test_peer_computes_jbps_loss_and_gradients(name):
    peer, result = check(name)
    assert result["ok"], result
    assert result["max_rel_grad_err"] < 1e-4 and result["loss_rel_err"] < 1e-5
    # the module holds jbp's weights, in PyTorch's layout, and nothing else
    _, _, params, *_ = point(name)
    state = {k: v.numpy() for k, v in peer.module.state_dict().items()}
    assert state.keys() == peer.to_torch(params).keys()
    assert peer.channels_first == (name in ("cnn2d", "cnn1d", "unet1d"))


def _transpose(name):
    def corrupt(p):
        p[name].copy_(p[name].T.clone())
    return corrupt


def _swap_gates(name, hidden=8):
    def corrupt(p):  # GRU blocks [r, z, n]: r and z exchanged
        w = p[name].clone()
        p[name][:hidden], p[name][hidden:2 * hidden] = w[hidden:2 * hidden], w[:hidden]
    return corrupt


@pytest.mark.parametrize("name,corrupt,param", [
    ("mlp", _transpose("2.weight"), "2.weight"),                  # a square dense weight
    ("gru", _swap_gates("0.cell.weight_hh_l0"), "0.cell.weight_hh_l0"),  # wrong gate order
])
def test_a_wrong_mapping_is_caught(name, corrupt, param):
    _, result = check(name, corrupt)
    assert not result["ok"] and result["max_rel_grad_err"] > 1e-2, result


def test_the_float64_witness_passes_the_right_mapping_and_catches_a_wrong_one():
    """With jbp's float64 gradient as the witness (what the benchmark asks for when two
    float32 gradients differ by more than rtol), the right module still passes and a
    transposed weight still fails."""
    model, in_shape, params, x, y, loss, grads = point("mlp")
    with jax.enable_x64(True):
        exact = jbp.manual_value_and_grad(model, jbp.losses.softmax_cross_entropy)(
            jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params),
            x.astype(jnp.float64), y)[1]
    for corrupt, ok in ((None, True), (_transpose("2.weight"), False)):
        peer = tp.peer_of(model, in_shape, params)
        if corrupt is not None:
            with torch.no_grad():
                corrupt(dict(peer.module.named_parameters()))
        result = tp.agreement(peer, tp.torch_input(peer, x), tp.torch_labels(y), loss, grads,
                              grads_exact=exact)
        assert result["ok"] == ok and result["exact"]["jbp_max_err"] < 1e-5, result


def test_flatten_needs_the_permuted_dense_rows():
    # jbp flattens (H, W, C), PyTorch's channels-first (C, H, W): the dense layer's weight
    # without its columns permuted fails the check
    dense = np.array(point("cnn2d")[2][-1]["W"])

    def unpermuted(p):
        p["11.weight"].copy_(torch.from_numpy(dense.T))
    _, result = check("cnn2d", unpermuted)
    assert not result["ok"], result


def test_step_trains_and_unsupported_layers_say_so():
    model, in_shape, params, x, y, *_ = point("mlp")
    peer = tp.peer_of(model, in_shape, params)
    opt = tp.torch_optimizer(peer.module)
    xt, yt = tp.torch_input(peer, x), tp.torch_labels(y)
    losses = [tp.torch_step(peer.module, opt, xt, yt) for _ in range(5)]
    assert all(isinstance(v, float) for v in losses) and losses[-1] < losses[0]
    assert tp.about()["threads"] == torch.get_num_threads()
    with pytest.raises(NotImplementedError, match="dropout"):
        tp.peer_of(jbp.serial(jbp.dense(4), jbp.dropout(0.5)), (3,), None)
