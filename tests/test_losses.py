"""GAN and pixel losses against float64 numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.errors import ConfigError
from sct_jax.losses import adversarial, pixel

RNG = np.random.default_rng(0)
REAL_LOGITS = (RNG.normal(size=(2, 6, 5, 1)) * 3).astype(np.float32)
FAKE_LOGITS = (RNG.normal(size=(2, 6, 5, 1)) * 3 - 1).astype(np.float32)


def np_bce(logits, label):
    """-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], mean, float64, textbook form."""
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return np.mean(-(label * np.log(p) + (1 - label) * np.log(1 - p)))


def np_mse(logits, label):
    return np.mean((logits.astype(np.float64) - label) ** 2)


NP_LOSS = {"vanilla": np_bce, "lsgan": np_mse}


@pytest.mark.parametrize("kind", ["vanilla", "lsgan"])
@pytest.mark.parametrize("real", [True, False])
def test_gan_loss_matches_numpy(kind, real):
    got = float(adversarial.gan_loss(jnp.asarray(REAL_LOGITS), real, kind))
    np.testing.assert_allclose(got, NP_LOSS[kind](REAL_LOGITS, float(real)), rtol=1e-5)


@pytest.mark.parametrize("kind", ["vanilla", "lsgan"])
def test_discriminator_and_generator_losses(kind):
    ref = NP_LOSS[kind]
    d = float(adversarial.discriminator_loss(jnp.asarray(REAL_LOGITS),
                                             jnp.asarray(FAKE_LOGITS), kind))
    np.testing.assert_allclose(
        d, 0.5 * (ref(REAL_LOGITS, 1.0) + ref(FAKE_LOGITS, 0.0)), rtol=1e-5)
    g = float(adversarial.generator_loss(jnp.asarray(FAKE_LOGITS), kind))
    np.testing.assert_allclose(g, ref(FAKE_LOGITS, 1.0), rtol=1e-5)


def test_vanilla_loss_is_stable_for_large_logits():
    logits = jnp.asarray([[-200.0, 200.0]])
    # log(1 + e^-200) underflows to 0; the fake-labelled +200 costs 200.
    np.testing.assert_allclose(float(adversarial.gan_loss(logits, False)), 100.0, rtol=1e-6)
    assert np.isfinite(float(adversarial.gan_loss(logits, True)))


def test_gan_loss_accumulates_bf16_in_float32():
    out = adversarial.gan_loss(jnp.asarray(REAL_LOGITS, jnp.bfloat16), True, "lsgan")
    assert out.dtype == jnp.float32


def test_unknown_gan_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="wgan"):
        adversarial.gan_loss(jnp.zeros((1, 2)), True, "wgan")


PRED = RNG.normal(size=(2, 8, 6, 1)).astype(np.float32)
TARGET = RNG.normal(size=(2, 8, 6, 1)).astype(np.float32)


def test_l1_map_and_mean():
    diff = np.abs(PRED.astype(np.float64) - TARGET)
    loss_map = np.asarray(pixel.l1_map(jnp.asarray(PRED), jnp.asarray(TARGET)))
    assert loss_map.shape == PRED.shape
    np.testing.assert_allclose(loss_map, diff, rtol=1e-6)
    np.testing.assert_allclose(float(pixel.l1(jnp.asarray(PRED), jnp.asarray(TARGET))),
                               diff.mean(), rtol=1e-6)


def test_weighted_l1_is_a_weighted_sum():
    weights = RNG.uniform(size=PRED.shape)
    weights /= weights.sum()
    diff = np.abs(PRED.astype(np.float64) - TARGET)
    got = float(pixel.l1(jnp.asarray(PRED), jnp.asarray(TARGET), jnp.asarray(weights)))
    np.testing.assert_allclose(got, np.sum(weights * diff), rtol=1e-5)
    # Uniform weights 1 / N give back the mean; per-sample weights broadcast.
    uniform = jnp.full(PRED.shape, 1.0 / PRED.size)
    np.testing.assert_allclose(float(pixel.l1(jnp.asarray(PRED), jnp.asarray(TARGET),
                                              uniform)), diff.mean(), rtol=1e-5)
    per_sample = np.array([1.0, 0.0]).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(
        float(pixel.l1(jnp.asarray(PRED), jnp.asarray(TARGET), jnp.asarray(per_sample))),
        diff[0].sum(), rtol=1e-5)


def test_l1_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        pixel.l1(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 5, 1)))
