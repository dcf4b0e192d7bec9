"""Curvature through the hand-written backward equals JAX's own: HVPs against jvp-of-grad,
the GGN diagonal against Jᵀ H J built from JAX Jacobians and Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbp
from reference_models import BATCH, TOL, L, case, random_params, rel_err, target

LOSSES = [L.softmax_cross_entropy, L.mean_squared_error, L.sigmoid_binary_cross_entropy]


def reference_hvp(model, loss, params, x, y, v, kw):
    grad = jax.grad(lambda p: loss.value(model.apply(p, x, **kw), y))
    return jax.jvp(grad, (params,), (v,))[1]


def reference_ggn_diagonal(model, loss, params, x, y, kw):
    """diag(Jᵀ H J): J the Jacobian of all outputs w.r.t. all params, H the loss Hessian."""
    flat, unravel = ravel_pytree(params)
    out = model.apply(params, x, **kw)
    jac = jax.jacrev(lambda f: model.apply(unravel(f), x, **kw))(flat).reshape(out.size, flat.size)
    hess = jax.hessian(lambda o: loss.value(o, y))(out).reshape(out.size, out.size)
    return unravel(jnp.einsum("ap,ab,bp->p", jac, hess, jac))


def _tangent(params, seed=7):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _check(name, dtype, losses=LOSSES, y=None):
    """HVP and GGN diagonal of model ``name`` for each loss, in one jitted call."""
    model, params, x, _, kw = case(name, dtype)
    rng = np.random.default_rng(3)
    ys = [target(loss, 3, BATCH, rng, dtype) if y is None else y for loss in losses]
    v = _tangent(params)

    @jax.jit
    def both(params, x, ys, v):
        return [(jbp.hvp(model, loss)(params, x, yl, v, **kw),
                 reference_hvp(model, loss, params, x, yl, v, kw),
                 jbp.ggn_diagonal(model, loss)(params, x, yl, **kw),
                 reference_ggn_diagonal(model, loss, params, x, yl, kw))
                for loss, yl in zip(losses, ys)]

    for loss, (hv, hv_ref, ggn, ggn_ref) in zip(losses, both(params, x, ys, v)):
        assert rel_err(hv, hv_ref) <= TOL[dtype], loss.name
        assert rel_err(ggn, ggn_ref) <= TOL[dtype], loss.name
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda g: bool(jnp.all(g >= 0)), ggn))


# "mixed": flatten, dense, maxout, gelu, dropout with a key; "activations": all nine.
# A single dense layer (not in a serial) is the linear-model test below.
@pytest.mark.parametrize("name", ["mixed", "activations"])
def test_hvp_and_ggn_diagonal_float64(name):
    with jax.enable_x64(True):
        _check(name, jnp.float64)


def test_hvp_and_ggn_diagonal_float32():
    _check("mixed", jnp.float32, [L.softmax_cross_entropy])


def test_ggn_with_soft_targets_that_do_not_sum_to_one():
    with jax.enable_x64(True):
        y = jnp.asarray(np.random.default_rng(0).uniform(size=(BATCH, 3)))  # rows sum to ~1.5
        _check("tanh", jnp.float64, [L.softmax_cross_entropy], y=y)


def test_for_a_linear_model_and_mse_the_ggn_is_the_hessian():
    """f linear in params ⇒ Jᵀ H J is the full Hessian: an outside check on the GGN."""
    with jax.enable_x64(True):
        model = jbp.dense(3, dtype=jnp.float64)
        rng = np.random.default_rng(1)
        _, params = random_params(model, (4,), rng, jnp.float64)
        x = jnp.asarray(rng.normal(size=(6, 4)))
        y = jnp.asarray(rng.normal(size=(6, 3)))
        loss = L.mean_squared_error
        flat, unravel = ravel_pytree(params)
        hess, ggn = jax.jit(lambda p: (
            jax.hessian(lambda f: loss.value(model.apply(unravel(f), x), y))(ravel_pytree(p)[0]),
            jbp.ggn_diagonal(model, loss)(p, x, y)))(params)
        assert rel_err(ggn, unravel(jnp.diag(hess))) <= 1e-12


def test_errors():
    model, params, x, y, _ = case("tanh", jnp.float32)
    other = jbp.Loss("huber", L.mean_squared_error.per_example, L.mean_squared_error.grad)
    with pytest.raises(ValueError, match="no square-root Hessian factor for loss 'huber'; "
                                         "supported: mean_squared_error"):
        jbp.ggn_diagonal(model, other)
    hvp = jbp.hvp(model, L.softmax_cross_entropy)
    with pytest.raises(ValueError, match="v must be shaped like params"):
        hvp(params, x, y, params[0])
    wrong = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape + (1,)), params)
    with pytest.raises(ValueError, match=r"a leaf of shape \(4, 6\) got a tangent of shape \(4, 6, 1\)"):
        hvp(params, x, y, wrong)
    with pytest.raises(TypeError, match="model must be a jbp Layer"):
        jbp.hvp(None, L.mean_squared_error)


def test_ggn_diagonal_of_a_sequence_model_with_logits_per_position():
    """(B, T, C) logits, the output of every sequence model, with padding labels: each
    example's loss is the mean over its positions that count, its Hessian block diagonal over
    positions (T·C backward passes); equal to diag(Jᵀ H J) from JAX's Jacobian and Hessian."""
    with jax.enable_x64(True):
        model = jbp.serial(jbp.embedding(5, 3, dtype=jnp.float64), jbp.gru(4, dtype=jnp.float64),
                           jbp.dense(3, dtype=jnp.float64))
        _, params = model.init(jax.random.key(0), (4,))
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(0, 5, (3, 4)), jnp.int32)
        y = jnp.asarray([[0, 2, 1, 1], [2, 0, jbp.IGNORE_LABEL, jbp.IGNORE_LABEL],
                         [jbp.IGNORE_LABEL] * 4])  # the last example counts nothing
        loss = L.softmax_cross_entropy
        one_hot = jax.nn.one_hot(jnp.maximum(y[:2], 0), 3, dtype=jnp.float64)  # probabilities

        @jax.jit
        def both(p):
            return [(jbp.ggn_diagonal(model, loss)(p, i, t),
                     reference_ggn_diagonal(model, loss, p, i, t, {}))
                    for i, t in ((ids, y), (ids[:2], one_hot))]

        for got, want in both(params):
            assert rel_err(got, want) <= 1e-12
