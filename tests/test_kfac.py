"""Kronecker-factored curvature (jbp.kronecker_factors) and the K-FAC optimizer (jbp.kfac).

Every factor is compared with its definition built independently: the GGN block from
jax.jacrev and the loss Hessian, the deltas from jax.vjp of the rest of the network, the
convolution's patches from lax.conv_general_dilated_patches. float64 throughout but for
the fit test."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp

CE, MSE = jbp.losses.softmax_cross_entropy, jbp.losses.mean_squared_error


def _ggn_block(apply_M, M, out_hessian):
    """Jᵀ H J for the outputs ``apply_M(M)`` (flattened) and the Hessian of C w.r.t. them."""
    J = jax.jit(jax.jacrev(apply_M))(M)
    J = J.reshape(-1, M.size)
    return J.T @ out_hessian @ J


def test_one_example_dense_block_is_exactly_a_kron_g():
    with jax.enable_x64(True):
        model = jbp.dense(3, dtype=jnp.float64)
        _, p = model.init(jax.random.key(0), (4,))
        x = jax.random.normal(jax.random.key(1), (1, 4), jnp.float64)
        f = jax.jit(jbp.kronecker_factors(model, CE))(p, x, jnp.array([1]))
        M = jnp.concatenate([p["W"], p["b"][None]])
        out = lambda M: model.apply({"W": M[:4], "b": M[4]}, x)  # noqa: E731
        prob = jax.nn.softmax(out(M)[0])
        ggn = _ggn_block(out, M, jnp.diag(prob) - jnp.outer(prob, prob))
        np.testing.assert_allclose(jnp.kron(f.A, f.G), ggn, rtol=0, atol=1e-12 * np.abs(ggn).max())


def _mlp_batch():
    """A float64 MLP (call inside jax.enable_x64), its params and a batch of 6."""
    model = jbp.serial(jbp.dense(5, dtype=jnp.float64), jbp.tanh(), jbp.dense(3, dtype=jnp.float64))
    _, p = model.init(jax.random.key(0), (4,))
    x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
    return model, p, x, jnp.array([0, 1, 2, 1, 0, 2])


def test_batch_factors_equal_their_definitions_from_vjp_deltas():
    """A = mean ã ãᵀ over the batch; G = Σ_k Σ_i δ_ik δ_ikᵀ with δ_ik the jax.vjp of the
    network above the layer at column k of the loss Hessian's square-root factor."""
    with jax.enable_x64(True):
        model, p, x, y = _mlp_batch()
        f = jax.jit(jbp.kronecker_factors(model, CE))(p, x, y)
        z1 = model.layers[0].apply(p[0], x)
        a1 = jnp.tanh(z1)
        above = {0: lambda z: model.layers[2].apply(p[2], jnp.tanh(z)),
                 2: lambda z: z}
        inputs = {0: x, 2: a1}
        outs = {0: z1, 2: model.layers[2].apply(p[2], a1)}
        S = jbp.curvature.loss_hessian_factor(CE, outs[2], y)  # (K, B, 3)
        for i in (0, 2):
            _, vjp = jax.vjp(above[i], outs[i])
            deltas = jnp.stack([vjp(s)[0] for s in S])  # (K, B, n_out)
            a = jnp.concatenate([inputs[i], jnp.ones((6, 1))], axis=1)
            A = a.T @ a / 6
            G = jnp.einsum("kbi,kbj->ij", deltas, deltas)
            np.testing.assert_allclose(f[i].A, A, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(f[i].G, G, rtol=1e-12, atol=1e-15)
        assert f[1] == {}  # tanh: no params


def test_monte_carlo_factors_converge_to_the_exact_ones():
    """The mean over 4000 sampled targets: relative Frobenius error of G within 0.1 (the
    estimate's own spread is ~1/√4000 ≈ 0.016 of the entries' scale); A has no noise."""
    with jax.enable_x64(True):
        model, p, x, y = _mlp_batch()
        exact = jax.jit(jbp.kronecker_factors(model, CE))(p, x, y)
        mc = jax.jit(jbp.kronecker_factors(model, CE, kind="mc", samples=4000))(
            p, x, y, key=jax.random.key(2))
        for e, m in zip(jax.tree_util.tree_leaves(exact[2]), jax.tree_util.tree_leaves(mc[2])):
            assert float(jnp.linalg.norm(m - e) / jnp.linalg.norm(e)) < 0.1
        np.testing.assert_allclose(mc[0].A, exact[0].A, rtol=1e-12)
        mse_exact = jax.jit(jbp.kronecker_factors(model, MSE))(p, x, x[:, :3])
        mse_mc = jax.jit(jbp.kronecker_factors(model, MSE, kind="mc", samples=4000))(
            p, x, x[:, :3], key=jax.random.key(3))
        err = jnp.linalg.norm(mse_mc[2].G - mse_exact[2].G) / jnp.linalg.norm(mse_exact[2].G)
        assert float(err) < 0.1


def test_conv_factors_are_the_kfc_definitions_from_lax_patches():
    with jax.enable_x64(True):
        conv = jbp.conv(4, 3, stride=2, padding="SAME", dtype=jnp.float64)
        model = jbp.serial(conv, jbp.flatten(), jbp.dense(2, dtype=jnp.float64))
        _, p = model.init(jax.random.key(0), (7, 7, 2))
        x = jax.random.normal(jax.random.key(1), (3, 7, 7, 2), jnp.float64)
        y = jnp.array([0, 1, 1])
        f = jax.jit(jbp.kronecker_factors(model, CE))(p, x, y)
        lax_patches = jax.lax.conv_general_dilated_patches(
            x, (3, 3), (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # lax orders a patch channel-major (C, kh, kw); the kernel's rows are (kh, kw, C)
        rows = lax_patches.reshape(3, 4, 4, 2, 9).swapaxes(-1, -2).reshape(-1, 18)
        a = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1))], axis=1)
        np.testing.assert_allclose(f[0].A, a.T @ a / a.shape[0], rtol=1e-12)
        z = conv.apply(p[0], x)
        out = model.apply(p, x)
        _, vjp = jax.vjp(lambda z: jbp.serial(*model.layers[1:]).apply(p[1:], z), z)
        deltas = jnp.stack([vjp(s)[0] for s in jbp.curvature.loss_hessian_factor(CE, out, y)])
        g = deltas.reshape(-1, 4)
        np.testing.assert_allclose(f[0].G, g.T @ g, rtol=1e-12)


def test_expand_is_exact_for_a_linear_layer_shared_over_positions():
    """dense on (B, T, in) under mean squared error over every position: the loss is
    quadratic in M, so its Hessian is the GGN block, and KFAC-expand's A ⊗ G equals it."""
    with jax.enable_x64(True):
        model = jbp.dense(3, dtype=jnp.float64)
        _, p = model.init(jax.random.key(0), (5, 4))
        x = jax.random.normal(jax.random.key(1), (2, 5, 4), jnp.float64)
        target = jax.random.normal(jax.random.key(2), (2, 5, 3), jnp.float64)
        f = jax.jit(jbp.kronecker_factors(model, MSE))(p, x, target)
        M = jnp.concatenate([p["W"], p["b"][None]])
        cost = lambda M: MSE.value(model.apply({"W": M[:4], "b": M[4]}, x), target)  # noqa: E731
        H = jax.jit(jax.hessian(cost))(M).reshape(M.size, M.size)
        np.testing.assert_allclose(jnp.kron(f.A, f.G), H, rtol=0, atol=1e-12 * np.abs(H).max())


def test_kfac_step_on_a_linear_gaussian_model_is_the_natural_gradient_step():
    with jax.enable_x64(True):
        model = jbp.dense(2, dtype=jnp.float64)
        _, p = model.init(jax.random.key(0), (3,))
        x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
        target = jax.random.normal(jax.random.key(2), (8, 2), jnp.float64)
        lr, damping = 0.5, 1e-3
        opt = jbp.kfac(model, MSE, (3,), learning_rate=lr, damping=damping, kl_clip=None)
        _, grads = jax.jit(jbp.manual_value_and_grad(model, MSE))(p, x, target)
        updates, _ = jax.jit(lambda g, s, p: opt.update(g, s, p, x=x, y=target))(
            grads, opt.init(p), p)
        M = jnp.concatenate([p["W"], p["b"][None]])
        cost = lambda M: MSE.value(model.apply({"W": M[:3], "b": M[3]}, x), target)  # noqa: E731
        fisher = jax.jit(jax.hessian(cost))(M).reshape(M.size, M.size)  # linear-Gaussian: F = H = GGN
        g = jax.jit(jax.grad(cost))(M).reshape(-1)
        natural = -lr * jnp.linalg.solve(fisher + damping * jnp.eye(M.size), g)
        got = jnp.concatenate([updates["W"], updates["b"][None]]).reshape(-1)
        np.testing.assert_allclose(got, natural, rtol=1e-10)


def test_kfac_trains_in_fit_and_passes_other_params_to_the_fallback():
    model = jbp.serial(jbp.dense(16), jbp.relu(), jbp.layer_norm(), jbp.dense(3))
    _, p0 = model.init(jax.random.key(0), (4,))
    x = jax.random.normal(jax.random.key(1), (64, 4))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5).astype(jnp.int32)
    opt = jbp.kfac(model, CE, (4,), learning_rate=0.05, damping=1e-2,
                   fallback=optax.sgd(0.0))  # a frozen fallback: layer_norm must not move
    p, history = jbp.fit(model, CE, p0, (x, y), key=jax.random.key(2), optimizer=opt,
                         steps=20, batch_size=32, progress=False)
    losses = history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    for a, b in zip(jax.tree_util.tree_leaves(p[2]), jax.tree_util.tree_leaves(p0[2])):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"kronecker_factors: layer gru\(4\) declares no "
                                         r"Kronecker factors"):
        jbp.kronecker_factors(jbp.serial(jbp.gru(4), jbp.dense(2)), CE)
    with pytest.raises(ValueError, match=r"layer batch_norm declares no Kronecker factors"):
        jbp.kronecker_factors(jbp.serial(jbp.dense(4), jbp.batch_norm(), jbp.dense(2)), CE)
    with pytest.raises(ValueError, match=r"kfac: .* keeps state \(batch_norm\)"):
        jbp.kfac(jbp.serial(jbp.dense(4), jbp.batch_norm(), jbp.dense(2)), CE, (3,))
    for damping in (0.0, -1.0, "1e-3"):
        with pytest.raises(ValueError, match=r"kfac: damping must be a number > 0"):
            jbp.kfac(jbp.dense(2), CE, (3,), damping=damping)
    with pytest.raises(ValueError, match=r"kfac: kl_clip must be a number > 0 or None"):
        jbp.kfac(jbp.dense(2), CE, (3,), kl_clip=0)
    with pytest.raises(ValueError, match=r"kronecker_factors: kind must be one of"):
        jbp.kronecker_factors(jbp.dense(2), CE, kind="kflr")
    model = jbp.dense(2)
    _, p = model.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"kind='mc' samples targets: pass key="):
        jbp.kronecker_factors(model, CE, kind="mc")(p, jnp.ones((2, 3)), jnp.array([0, 1]))
