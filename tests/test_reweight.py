"""Tests of the spatial learning-to-reweight weights (sct_jax.meta.reweight).

References: a closed-form float64 numpy formula for a per-pixel linear model, central
finite differences of the lookahead validation loss, and the literal nested ``jax.grad``
written out here. Float64 is enabled only inside this module's tests (context manager).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sct_jax.errors import ConfigError
from sct_jax.meta.reweight import (normalize_weights, reweight, spatial_weights,
                                   spatial_weights_and_pullback, weighted_l1)
from sct_jax.models.layers import Conv
from sct_jax.models.unet import UNetGenerator

METHODS = ("jvp", "lookahead")


def _flat_normal(key, shape, dtype):
    # Drawn flat and reshaped: XLA:CPU compiles rank-4 samplers slowly.
    return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def _sub(params, step, alpha=1.0):
    return jax.tree_util.tree_map(lambda p, g: p - alpha * g, params, step)


def _naive_lookahead_u(loss_map_fn, val_loss_fn, params, alpha):
    """The literal definition, written independently of the module: -d/d eps at 0."""
    def lookahead_val_loss(eps):
        inner = jax.grad(lambda theta: jnp.sum(eps * loss_map_fn(theta)))(params)
        return val_loss_fn(_sub(params, inner, alpha))
    return -jax.grad(lookahead_val_loss)(jnp.zeros_like(loss_map_fn(params)))


# ------------------------------------------------------------ per-pixel linear model
def _linear_problem(train_target_sign=None, val_target_sign=None, seed=0):
    """``f(x; a, b) = a x + b`` per pixel, float64 numpy data (B=2, 4x3, 1; M=3)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.0, (2, 4, 3, 1))
    xv = rng.uniform(0.1, 1.0, (3, 4, 3, 1))
    params = {"a": np.float64(0.7), "b": np.float64(-0.2)}
    y = rng.normal(size=x.shape)
    yv = rng.normal(size=xv.shape)
    if train_target_sign is not None:  # targets all above / below the prediction
        a, b = 0.0, 0.0
        params = {"a": np.float64(a), "b": np.float64(b)}
        y = train_target_sign * rng.uniform(0.5, 1.0, x.shape)
        yv = val_target_sign * rng.uniform(0.5, 1.0, xv.shape)
    return params, x, y, xv, yv


def _linear_fns(x, y, xv, yv):
    loss_map_fn = lambda p: jnp.abs(y - (p["a"] * x + p["b"]))
    val_loss_fn = lambda p: jnp.mean(jnp.abs(yv - (p["a"] * xv + p["b"])))
    return loss_map_fn, val_loss_fn


def _linear_u_numpy(params, x, y, xv, yv, alpha):
    """u_p = alpha <grad l_p, grad L_val>, by hand: grad l_p = -s_p (x_p, 1)."""
    s = np.sign(y - (params["a"] * x + params["b"]))
    sv = np.sign(yv - (params["a"] * xv + params["b"]))
    g_val = -np.array([np.mean(sv * xv), np.mean(sv)])
    return alpha * (-s * x * g_val[0] - s * g_val[1])


@pytest.mark.parametrize("method", METHODS)
def test_linear_model_matches_closed_form(method):
    with jax.enable_x64(True):
        params, x, y, xv, yv = _linear_problem()
        loss_map_fn, val_loss_fn = _linear_fns(x, y, xv, yv)
        alpha = 0.3
        u_ref = _linear_u_numpy(params, x, y, xv, yv, alpha)
        assert (u_ref > 0).any() and (u_ref < 0).any()  # both signs exercised

        raw, loss_map, stats = spatial_weights(loss_map_fn, val_loss_fn, params,
                                               alpha=alpha, method=method,
                                               normalize=False)
        np.testing.assert_allclose(raw, np.maximum(u_ref, 0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(loss_map, np.abs(y - 0.7 * x + 0.2), rtol=1e-12)
        np.testing.assert_allclose(stats["u_min"], u_ref.min(), rtol=1e-12)
        np.testing.assert_allclose(stats["u_positive_fraction"], np.mean(u_ref > 0))

        weights, _, _ = spatial_weights(loss_map_fn, val_loss_fn, params, alpha=alpha,
                                        method=method)
        w_ref = np.maximum(u_ref, 0) / np.maximum(u_ref, 0).sum()
        np.testing.assert_allclose(weights, w_ref, rtol=1e-12, atol=1e-15)
        assert weights.dtype == jnp.float64


@pytest.mark.parametrize("method", METHODS)
def test_weights_zero_when_every_pixel_hurts_and_uniform_when_all_help(method):
    with jax.enable_x64(True):
        # Training targets all above the prediction pull b up; validation targets all
        # below want b down: every u_p = -alpha (x_p mean(xv) + 1) < 0.
        params, x, y, xv, yv = _linear_problem(train_target_sign=1.0, val_target_sign=-1.0)
        loss_map_fn, val_loss_fn = _linear_fns(x, y, xv, yv)
        weights, _, stats = spatial_weights(loss_map_fn, val_loss_fn, params,
                                            alpha=2.0, method=method)
        assert float(stats["u_max"]) < 0
        np.testing.assert_array_equal(weights, np.zeros_like(x))
        np.testing.assert_allclose(stats["u_max"], -2.0 * (x.min() * xv.mean() + 1))

        # Both sets above the prediction: every pixel helps.
        params, x, y, xv, yv = _linear_problem(train_target_sign=1.0, val_target_sign=1.0)
        loss_map_fn, val_loss_fn = _linear_fns(x, y, xv, yv)
        weights, _, _ = spatial_weights(loss_map_fn, val_loss_fn, params, method=method)
        u_ref = x * xv.mean() + 1
        np.testing.assert_allclose(weights, u_ref / u_ref.sum(), rtol=1e-12)
        assert float(jnp.min(weights)) > 0


def test_normalize_weights_sums_to_one_or_stays_zero():
    u = jnp.array([[-1.0, 0.5], [3.0, -0.0]])
    np.testing.assert_allclose(normalize_weights(u), [[0, 0.5 / 3.5], [3 / 3.5, 0]])
    np.testing.assert_array_equal(normalize_weights(-jnp.abs(u)), np.zeros((2, 2)))
    assert not np.isnan(np.asarray(jax.grad(lambda v: normalize_weights(v).sum())(-u))).any()


def test_weighted_l1_with_uniform_weights_is_the_mean_l1():
    loss_map = jnp.asarray(np.random.default_rng(1).uniform(0, 2, (2, 5, 3, 1)),
                           jnp.float32)
    uniform = jnp.full(loss_map.shape, 1.0 / loss_map.size, jnp.float32)
    np.testing.assert_allclose(weighted_l1(uniform, loss_map),
                               np.mean(np.asarray(loss_map, np.float64)), rtol=1e-6)
    # ... and so does the update direction: d/d pred of sum(w |pred - y|) = sign / N.
    pred = jnp.zeros_like(loss_map)
    grad = jax.grad(lambda p: weighted_l1(uniform, jnp.abs(p - loss_map)))(pred)
    np.testing.assert_allclose(grad, -np.sign(np.asarray(loss_map)) / loss_map.size,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        weighted_l1(uniform[:1], loss_map)


def test_pullback_with_outputs_and_unknown_method():
    with jax.enable_x64(True):
        params, x, y, xv, yv = _linear_problem()
        loss_map_fn, val_loss_fn = _linear_fns(x, y, xv, yv)
        both = lambda p: (loss_map_fn(p), p["a"] * x + p["b"])
        ct_pred = np.random.default_rng(2).normal(size=x.shape)
        for method in METHODS:
            w, _, pullback, _ = spatial_weights_and_pullback(
                both, val_loss_fn, params, method=method, has_outputs=True)
            ref = jax.grad(lambda p: weighted_l1(w, loss_map_fn(p))
                           + jnp.sum(ct_pred * (p["a"] * x + p["b"])))(params)
            got = pullback((w, jnp.asarray(ct_pred)))
            for k in ("a", "b"):
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-12)
    with pytest.raises(ConfigError, match="meta.method"):
        spatial_weights(lambda p: p, lambda p: p, 0.0, method="hessian")


# -------------------------------------------------------------- tiny conv net, float64
class _TwoConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(Conv(4, 3, padding=1, name="conv0")(x))
        return Conv(1, 3, padding=1, name="conv1")(h)


@pytest.fixture(scope="module")
def conv_problem():
    """Float64 numpy arrays of a 2-layer conv net: 2x8x8x1 train, 3x8x8x1 val."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2, 2, 8, 8, 1))
    xv, yv = rng.normal(size=(2, 3, 8, 8, 1))
    # Weights far larger than N(0, 0.02), so that the net is far from linear.
    params = {"conv0": {"kernel": rng.normal(0, 0.3, (3, 3, 1, 4)),
                        "bias": rng.normal(0, 0.1, (4,))},
              "conv1": {"kernel": rng.normal(0, 0.3, (3, 3, 4, 1)),
                        "bias": rng.normal(0, 0.1, (1,))}}
    return _TwoConv(), params, x, y, xv, yv


def test_conv_net_forms_agree_with_each_other_and_finite_differences(conv_problem):
    model, params, x, y, xv, yv = conv_problem
    alpha = 0.5
    with jax.enable_x64(True):
        loss_map_fn = lambda p: jnp.abs(y - model.apply({"params": p}, x))
        val_loss_fn = lambda p: jnp.mean(jnp.abs(yv - model.apply({"params": p}, xv)))

        @jax.jit
        def all_forms(p):
            raw = {m: spatial_weights(loss_map_fn, val_loss_fn, p, alpha=alpha, method=m,
                                      normalize=False)[0] for m in METHODS}
            naive = _naive_lookahead_u(loss_map_fn, val_loss_fn, p, alpha)
            return raw, naive

        raw, u_naive = all_forms(params)
        assert raw["jvp"].dtype == raw["lookahead"].dtype == jnp.float64
        assert (u_naive > 0).any() and (u_naive < 0).any()
        scale = float(jnp.max(jnp.abs(u_naive)))
        for method in METHODS:
            err = float(jnp.max(jnp.abs(raw[method] - jnp.maximum(u_naive, 0)))) / scale
            assert err < 1e-10, (method, err)

        # Central differences of L_val(theta'(eps)) at a few pixels, both signs of u.
        flat_u = np.asarray(u_naive).ravel()
        pixels = [int(np.argmax(flat_u)), int(np.argmin(flat_u)), 5, 77]
        h = 1e-6

        @jax.jit
        def lookahead_val_losses(eps_stack):
            def one(eps):
                inner = jax.grad(lambda th: jnp.sum(eps * loss_map_fn(th)))(params)
                return val_loss_fn(_sub(params, inner, alpha))
            return jax.vmap(one)(eps_stack)

        eps = np.zeros((2 * len(pixels), y.size))
        for i, p in enumerate(pixels):
            eps[2 * i, p], eps[2 * i + 1, p] = h, -h
        losses = np.asarray(lookahead_val_losses(jnp.asarray(eps.reshape(-1, *y.shape))))
        u_fd = -(losses[0::2] - losses[1::2]) / (2 * h)
        for method in METHODS:
            got = np.asarray(raw[method]).ravel()[pixels]
            np.testing.assert_allclose(got, np.maximum(u_fd, 0), atol=1e-6 * scale)
        np.testing.assert_allclose(flat_u[pixels], u_fd, atol=1e-6 * scale)


# ------------------------------------------------------- tiny UNet generator, float32
def test_unet_forms_agree_under_jit_and_pullback_is_the_weighted_gradient():
    # num_downs 3 with max_mult 1 is the smallest U-Net with a dropout level. XLA's
    # convolutions compile in half the time of the CPU lowering's; the conv-net test
    # above runs that lowering's custom JVP through both forms.
    model = UNetGenerator(ngf=4, num_downs=3, max_mult=1, conv_impl="xla")
    keys = jax.random.split(jax.random.key(4), 6)
    x = _flat_normal(keys[0], (2, 8, 8, 1), jnp.float32)
    y = jnp.tanh(_flat_normal(keys[1], (2, 8, 8, 1), jnp.float32))
    xv = _flat_normal(keys[2], (3, 8, 8, 1), jnp.float32)
    yv = jnp.tanh(_flat_normal(keys[3], (3, 8, 8, 1), jnp.float32))
    params = model.init({"params": keys[4], "dropout": keys[5]}, x, train=True)["params"]

    def fns(batch, dropout_key):
        x, y, xv, yv = batch
        rngs = {"dropout": dropout_key}  # one fixed key: the same masks in every term
        loss_map_fn = lambda p: jnp.abs(y - model.apply({"params": p}, x, train=True,
                                                         rngs=rngs))
        val_loss_fn = lambda p: jnp.mean(jnp.abs(
            yv - model.apply({"params": p}, xv, train=True, rngs=rngs)))
        return loss_map_fn, val_loss_fn

    @jax.jit
    def meta(p, batch, dropout_key):
        loss_map_fn, val_loss_fn = fns(batch, dropout_key)
        out = {}
        for m in METHODS:
            w, l, pullback, stats = spatial_weights_and_pullback(loss_map_fn, val_loss_fn,
                                                                 p, method=m)
            out[m] = (w, l, pullback(w), stats)
        # References: the loss map and a fresh gradient of sum(w * l), no sharing.
        w = out["jvp"][0]
        reference = (loss_map_fn(p), jax.grad(lambda q: weighted_l1(w, loss_map_fn(q)))(p))
        return out, reference

    out, (l_ref, g_ref) = meta(params, (x, y, xv, yv), keys[5])
    out2, _ = meta(params, (x, -y, xv, yv), jax.random.fold_in(keys[5], 1))
    assert meta._cache_size() == 1  # new data and key: no recompilation

    w_jvp, l_jvp, g_jvp, stats = out["jvp"]
    w_la, l_la, g_la, _ = out["lookahead"]
    assert 0 < float(stats["u_positive_fraction"]) < 1
    np.testing.assert_allclose(float(jnp.sum(w_jvp)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(w_la)), 1.0, rtol=1e-5)
    assert float(jnp.min(w_jvp)) >= 0 and float(jnp.min(w_la)) >= 0
    np.testing.assert_allclose(w_la, w_jvp, atol=1e-4 * float(jnp.max(w_jvp)))
    np.testing.assert_allclose(l_jvp, l_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l_la, l_ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out2["jvp"][0], w_jvp)

    # The shared-forward pullback equals the fresh gradient of sum(w * l).
    ref_leaves = jax.tree_util.tree_leaves(g_ref)
    scale = max(float(jnp.max(jnp.abs(r))) for r in ref_leaves)
    for got in (g_jvp, g_la):
        for r, g in zip(ref_leaves, jax.tree_util.tree_leaves(got)):
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4 * scale)


# ------------------------------------------------ per-patch and per-slice granularity
def _group_mean_numpy(u, k_h, k_w):
    b, h, w, c = u.shape
    return u.reshape(b, h // k_h, k_h, w // k_w, k_w, c).mean(axis=(2, 4))


@pytest.mark.parametrize("granularity,patch,k", [("patch", 2, (2, 2)), ("slice", 1, (8, 8))])
def test_group_granularity_matches_finite_differences_and_closed_form(
        conv_problem, granularity, patch, k):
    """u_g = -dL_val(theta'(eps))/d eps_g with eps_g on l_g = mean_{p in g} l_p."""
    model, params, x, y, xv, yv = conv_problem
    alpha = 0.5
    with jax.enable_x64(True):
        loss_map_fn = lambda p: jnp.abs(y - model.apply({"params": p}, x))
        val_loss_fn = lambda p: jnp.mean(jnp.abs(yv - model.apply({"params": p}, xv)))

        @jax.jit
        def forms(p):
            out = {}
            for m in METHODS:
                r = reweight(loss_map_fn, val_loss_fn, p, alpha=alpha, method=m,
                             granularity=granularity, patch_size=patch)
                out[m] = (r.scores, r.weights)
            return out, _naive_lookahead_u(loss_map_fn, val_loss_fn, p, alpha)

        out, u_pixel = forms(params)
        u_ref = _group_mean_numpy(np.asarray(u_pixel), *k)  # chain rule, pooled in numpy
        assert u_ref.shape == (2, 8 // k[0], 8 // k[1], 1)
        scale = float(np.max(np.abs(u_ref)))
        for m in METHODS:
            np.testing.assert_allclose(out[m][0], u_ref, atol=1e-10 * scale)

        # Central differences of the lookahead loss in one group's eps: the group's
        # pixels all get eps / |g| on their loss (sum_g eps_g * mean_p l_p).
        def lookahead_loss(eps_map):
            inner = jax.grad(lambda th: jnp.sum(eps_map * loss_map_fn(th)))(params)
            return val_loss_fn(_sub(params, inner, alpha))
        lookahead_loss = jax.jit(lookahead_loss)
        h = 1e-6
        groups = [np.unravel_index(int(np.argmax(u_ref)), u_ref.shape),
                  np.unravel_index(int(np.argmin(u_ref)), u_ref.shape)]
        for b, gi, gj, _ in groups:
            eps = np.zeros(y.shape)
            eps[b, gi * k[0]:(gi + 1) * k[0], gj * k[1]:(gj + 1) * k[1]] = h / (k[0] * k[1])
            u_fd = -(float(lookahead_loss(eps)) - float(lookahead_loss(-eps))) / (2 * h)
            for m in METHODS:
                np.testing.assert_allclose(out[m][0][b, gi, gj, 0], u_fd,
                                           atol=1e-6 * scale)

        # Pixel weights: the group weight spread evenly over its pixels, summing to 1.
        w_group = np.maximum(u_ref, 0) / np.maximum(u_ref, 0).sum()
        w_ref = np.repeat(np.repeat(w_group, k[0], axis=1), k[1], axis=2) / (k[0] * k[1])
        for m in METHODS:
            np.testing.assert_allclose(out[m][1], w_ref, atol=1e-10 * w_ref.max())
        loss_map = np.asarray(loss_map_fn(params))
        np.testing.assert_allclose(  # sum(w * l) = sum_g w_g l_g
            float(weighted_l1(out["jvp"][1], jnp.asarray(loss_map))),
            float((w_group * _group_mean_numpy(loss_map, *k)).sum()), rtol=1e-10)


def test_patch_of_one_is_pixel_and_bad_granularity_is_refused():
    with jax.enable_x64(True):
        params, x, y, xv, yv = _linear_problem()
        loss_map_fn, val_loss_fn = _linear_fns(x, y, xv, yv)
        w_pixel, _, _ = spatial_weights(loss_map_fn, val_loss_fn, params)
        w_patch, _, _ = spatial_weights(loss_map_fn, val_loss_fn, params,
                                        granularity="patch", patch_size=1)
        np.testing.assert_array_equal(w_pixel, w_patch)
    with pytest.raises(ConfigError, match="granularity"):
        spatial_weights(loss_map_fn, val_loss_fn, params, granularity="voxel")
    with pytest.raises(ConfigError, match="patch_size=3: must divide"):
        spatial_weights(loss_map_fn, val_loss_fn, params, granularity="patch",
                        patch_size=3)  # the maps are 4 x 3
