"""Shared fixtures of the bridge, per-example and curvature tests: one small model per
layer type, inputs and targets for every loss, and the references computed by JAX itself."""

import jax
import jax.numpy as jnp
import numpy as np

import jbp
from jbp.layers.activations import ACTIVATIONS
from conftest import rel_err  # noqa: F401  (re-exported for the tests that import from here)

L = jbp.losses
# Normwise relative error allowed between a quantity from the hand-written backward and the
# same quantity from jax.grad / jax.jvp / Jacobians.
TOL = {jnp.float64: 1e-10, jnp.float32: 2e-5}
BATCH = 5
KEY = jax.random.key(42)  # the fixed dropout key


def _zoo():
    """name -> (layers(dtype), per-example input shape, forward kwargs)."""
    zoo = {"dense": (lambda dt: [jbp.dense(3, dtype=dt)], (4,), {})}
    for name in ACTIVATIONS:
        zoo[name] = (lambda dt, n=name: [jbp.dense(6, dtype=dt), jbp.activations.get(n),
                                         jbp.dense(3, dtype=dt)], (4,), {})
    zoo["maxout"] = (lambda dt: [jbp.dense(6, dtype=dt), jbp.maxout(2), jbp.dense(3, dtype=dt)],
                     (4,), {})
    zoo["flatten"] = (lambda dt: [jbp.flatten(), jbp.dense(5, dtype=dt), jbp.tanh(),
                                  jbp.dense(3, dtype=dt)], (2, 3), {})
    zoo["dropout-eval"] = (lambda dt: [jbp.dense(6, dtype=dt), jbp.relu(), jbp.dropout(0.5),
                                       jbp.dense(3, dtype=dt)], (4,), {})
    zoo["dropout-key"] = (lambda dt: [jbp.dense(6, dtype=dt), jbp.relu(), jbp.dropout(0.5),
                                      jbp.dense(3, dtype=dt)], (4,), {"key": KEY, "train": True})
    return zoo


ZOO = _zoo()


def mixed(dtype):
    """One model with every kind of layer: flatten, dense, maxout, an activation, dropout."""
    return [jbp.flatten(), jbp.dense(6, dtype=dtype), jbp.maxout(2), jbp.dense(6, dtype=dtype),
            jbp.gelu(), jbp.dropout(0.5), jbp.dense(3, dtype=dtype)]


ZOO["mixed"] = (mixed, (2, 2), {"key": KEY, "train": True})


def every_activation(dtype):
    """Every activation in one deep chain (for curvature: each σ′ is differentiated again)."""
    layers = []
    for name in ACTIVATIONS:
        layers += [jbp.dense(4, dtype=dtype), jbp.activations.get(name)]
    return layers + [jbp.dense(3, dtype=dtype)]


# Models that case() knows but the per-layer-type parametrisations leave out.
EXTRA = {"activations": (every_activation, (4,), {})}


def target(loss, out_dim, batch, rng, dtype):
    if loss is L.softmax_cross_entropy:
        return jnp.asarray(rng.integers(0, out_dim, batch), jnp.int32)
    if loss is L.mean_squared_error:
        return jnp.asarray(rng.normal(size=(batch, out_dim)), dtype)
    return jnp.asarray(rng.uniform(size=(batch, out_dim)), dtype)


def random_params(model, in_shape, rng, dtype):
    """``(out_shape, params)`` with N(0, 1/fan_in) weights and N(0, 0.3²) biases, drawn by
    numpy (eager jax.random would compile a kernel for every new shape: slow in tests)."""
    box = {}

    def init(key):
        box["out"], params = model.init(key, in_shape)
        return params

    shapes = jax.eval_shape(init, jax.random.key(0))

    def draw(s):
        scale = 0.3 if len(s.shape) == 1 else 1 / np.sqrt(s.shape[0])
        return jnp.asarray(rng.normal(size=s.shape) * scale, dtype)

    return box["out"], jax.tree_util.tree_map(draw, shapes)


def case(name, dtype, loss=L.softmax_cross_entropy, batch=BATCH, seed=0):
    """``(model, params, x, y, kwargs)`` for the zoo entry ``name``; biases are nonzero."""
    layers, in_shape, kwargs = ZOO[name] if name in ZOO else EXTRA[name]
    layers = layers(dtype)
    model = layers[0] if len(layers) == 1 else jbp.serial(*layers)
    rng = np.random.default_rng(seed)
    (out_dim,), params = random_params(model, in_shape, rng, dtype)
    x = jnp.asarray(rng.normal(size=(batch,) + in_shape), dtype)
    return model, params, x, target(loss, out_dim, batch, rng, dtype), kwargs


def reference_per_example_grads(model, loss, params, x, y, kwargs):
    """∇ℓ_i by ``jax.vmap(jax.grad(...))``.

    Without randomness each example runs alone (a batch of one). Dropout's mask depends on
    the whole batch's shape, so with a key every example runs the full batch and
    differentiates only its own loss ℓ_i.
    """
    if kwargs.get("train"):
        def loss_i(p, i):
            return loss.per_example(model.apply(p, x, **kwargs), y)[i]

        return jax.vmap(jax.grad(loss_i), in_axes=(None, 0))(params, jnp.arange(x.shape[0]))

    def loss_one(p, xi, yi):
        return loss.value(model.apply(p, xi[None], **kwargs), yi[None])

    return jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)


def flat_norms(per_example):
    """(B,) L2 norms over all leaves of a per-example pytree."""
    leaves = jax.tree_util.tree_leaves(per_example)
    return jnp.sqrt(sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in leaves))


def black_box_sum(a, b):
    """y = a(x) + b(x) with its own (correct) backward and no walk: a black box."""

    def init(key, in_shape):
        ka, kb = jax.random.split(key)
        shape, pa = a.init(ka, in_shape)
        return shape, (pa, b.init(kb, in_shape)[1])

    def forward(params, x, *, key=None, train=False):
        ya, ca, _ = a.forward(params[0], x)  # every forward gives (y, cache, new_state)
        yb, cb, _ = b.forward(params[1], x)
        return ya + yb, (ca, cb)

    def backward(params, cache, dy):
        ga, dxa = a.backward(params[0], cache[0], dy)
        gb, dxb = b.backward(params[1], cache[1], dy)
        return (ga, gb), dxa + dxb

    return jbp.Layer("sum", init, forward, backward, layers=(a, b))


def walked_sum(a, b):
    """The same composite written as a walk."""
    box = black_box_sum(a, b)

    def walk(params, cache, dy, visit):
        ra, dxa = visit(a, params[0], cache[0], dy)
        rb, dxb = visit(b, params[1], cache[1], dy)
        return (ra, rb), dxa + dxb

    return jbp.Layer("walked_sum", box.init, box.forward, layers=(a, b), walk=walk,
                     per_example=jbp.EXAMPLEWISE)


def assert_three_witnesses_agree(model, loss, params, x, y):
    """float64: the hand-written backward == jax.grad (≤ 1e-12) == central differences
    (≤ 1e-6), in one jitted call; returns backprop's deltas."""

    @jax.jit
    def three(params):
        return (jbp.backprop(model, loss, params, x, y),
                jbp.autodiff_value_and_grad(model, loss)(params, x, y),
                jbp.numerical_value_and_grad(model, loss)(params, x, y)[1])

    (value, grads, deltas), (auto_value, auto), fd = three(params)
    assert abs(value - auto_value) <= 1e-12 * abs(value)
    assert rel_err(grads, auto) <= 1e-12 and rel_err(grads, fd) <= 1e-6
    return deltas
