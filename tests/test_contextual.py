"""Contextual loss: a float64 numpy reference, its invariances, sampling, the VGG form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.losses.contextual import (contextual_loss, contextual_loss_vgg,
                                       contextual_similarity)
from sct_jax.models.vgg import load_vgg_params, vgg_conv_layout, vgg_features

# One compiled program per input shape instead of dozens of eagerly compiled ops.
cx_loss = jax.jit(contextual_loss)


def numpy_contextual_loss(x, y, h=0.5):
    """Mechrez et al. eqs. (1)-(5) in float64, one sample at a time."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    channels = x.shape[-1]
    mu = y.reshape(-1, channels).mean(axis=0)
    losses = []
    for xb, yb in zip(x, y):
        xs = xb.reshape(-1, channels) - mu
        ys = yb.reshape(-1, channels) - mu
        xs /= np.linalg.norm(xs, axis=1, keepdims=True)
        ys /= np.linalg.norm(ys, axis=1, keepdims=True)
        d = (1 - xs @ ys.T) / 2                          # [i generated, j target]
        d_rel = d / (d.min(axis=1, keepdims=True) + 1e-5)
        w = np.exp((1 - d_rel) / h)
        cx = w / w.sum(axis=1, keepdims=True)
        losses.append(-np.log(cx.max(axis=0).mean()))
    return np.mean(losses)


def _features(shape, seed, relu=True):
    f = np.random.default_rng(seed).normal(size=shape)
    return np.maximum(f, 0) if relu else f  # VGG features are post-ReLU


@pytest.mark.parametrize("relu", [True, False])
def test_matches_numpy_reference(relu):
    x = _features((2, 4, 5, 6), seed=0, relu=relu)
    y = _features((2, 4, 5, 6), seed=1, relu=relu)
    loss = cx_loss(jnp.float32(x), jnp.float32(y))
    np.testing.assert_allclose(float(loss), numpy_contextual_loss(x, y), rtol=1e-4)
    assert float(loss) > 0.1


def test_identical_inputs_give_zero_and_rows_are_normalised():
    x = jnp.float32(_features((2, 6, 5, 8), seed=2))
    # d_ii = 0 -> d~_ii = 0 while d~_ij = d_ij / 1e-5 is huge: CX_jj ~ 1, loss ~ 0.
    assert abs(float(cx_loss(x, x))) < 1e-5
    cx = jax.jit(contextual_similarity)(x.reshape(2, 30, 8), x.reshape(2, 30, 8))
    np.testing.assert_allclose(np.asarray(cx.sum(axis=2)), 1.0, rtol=1e-5)


def test_invariant_to_moving_generated_features_around():
    # Comparing sets of features: where a generated feature sits does not matter.
    x = _features((1, 4, 6, 5), seed=3)
    y = _features((1, 4, 6, 5), seed=4)
    perm = np.random.default_rng(5).permutation(24)
    x_moved = x.reshape(1, 24, 5)[:, perm].reshape(x.shape)
    np.testing.assert_allclose(float(cx_loss(jnp.float32(x_moved), jnp.float32(y))),
                               float(cx_loss(jnp.float32(x), jnp.float32(y))),
                               rtol=1e-5)


def test_sampling_path_at_pelvis_feature_size():
    # relu3_2 of a 320 x 192 slice is 80 x 48 = 3840 positions; sample 1024 of them.
    x = jnp.float32(_features((2, 80, 48, 8), seed=6))
    y = jnp.float32(_features((2, 80, 48, 8), seed=7))

    @jax.jit
    def loss_and_grad(x, y, key):
        return jax.value_and_grad(
            lambda x: contextual_loss(x, y, max_positions=1024, rng=key))(x)

    loss_a, grad = loss_and_grad(x, y, jax.random.key(0))
    loss_b, _ = loss_and_grad(x, y, jax.random.key(0))
    loss_c, _ = loss_and_grad(x, y, jax.random.key(1))
    same, _ = loss_and_grad(y, y, jax.random.key(0))
    assert np.isfinite(float(loss_a)) and float(loss_a) > 0.1
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0
    assert float(loss_a) == float(loss_b) != float(loss_c)
    # The same positions are kept in both maps: identical maps give ~0 (not exactly:
    # among 1024 sparse 8-channel vectors some directions nearly coincide).
    assert abs(float(same)) < 0.01 * float(loss_a)
    with pytest.raises(ValueError, match="needs an rng"):
        contextual_loss(x, y, max_positions=1024)


@pytest.fixture(scope="module")
def vgg19_params(tmp_path_factory):
    """Random VGG-19 weights in torchvision's format, read by the real loader."""
    rng = np.random.default_rng(0)
    state = {}
    for _, index, c_in, c_out in vgg_conv_layout("vgg19"):
        state[f"features.{index}.weight"] = np.float32(np.sqrt(2 / (9 * c_in))) * \
            rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32)
        state[f"features.{index}.bias"] = np.zeros(c_out, np.float32)
    path = tmp_path_factory.mktemp("vgg") / "vgg19.npz"
    np.savez(path, **state)
    return load_vgg_params(path, "vgg19")


def test_vgg_form_sums_layers(vgg19_params):
    rng = np.random.default_rng(8)
    real = jnp.float32(rng.uniform(-1, 1, (2, 16, 16, 1)))
    fake = jnp.float32(np.clip(np.asarray(real) + 0.3 * rng.normal(size=real.shape), -1, 1))
    # Forward only: the gradient of a VGG-19 costs ~10 s of compilation on this CPU;
    # the loss's own gradient is checked above, the convs' in test_layers.
    @jax.jit
    def loss_and_features(params, fake, real):
        features = vgg_features(params, jnp.concatenate([fake, real]), "vgg19",
                                ("relu3_2", "relu4_2"))
        return contextual_loss_vgg(params, fake, real), features

    loss, features = loss_and_features(vgg19_params, fake, real)
    expected = sum(numpy_contextual_loss(np.asarray(f[:2]), np.asarray(f[2:]))
                   for f in features.values())
    np.testing.assert_allclose(float(loss), expected, rtol=1e-3)
    assert abs(float(loss_and_features(vgg19_params, real, real)[0])) < 1e-4
