"""The learned input calibration of the generators (``config.model.gen.calibration_bins``)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.models.calibration import IntensityCalibration, piecewise_linear
from sct_jax.models.resnet_generator import ResnetGenerator
from sct_jax.models.unet import UNetGenerator

REPO = Path(__file__).resolve().parents[1]


def test_piecewise_linear_matches_numpy_interp():
    """Against float64 ``np.interp`` on random knots, with values on the knots, between
    them and outside ``[-1, 1]`` (both clamp to the end knots)."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=17)
    knots = np.linspace(-1.0, 1.0, 17)
    x = np.concatenate([rng.uniform(-1.3, 1.3, 500), knots, [-1.0, 1.0, -5.0, 5.0]])
    got = piecewise_linear(jnp.asarray(x, jnp.float32), jnp.asarray(values, jnp.float32))
    np.testing.assert_allclose(got, np.interp(x, knots, values), atol=2e-6)


def test_calibration_starts_as_the_identity_and_its_gradient_reaches_the_touched_knots():
    bins = 8
    layer = IntensityCalibration(bins)
    x = jnp.asarray([[-0.45, -0.3, -0.26], [0.6, 0.61, 0.74]], jnp.float32)[..., None]
    params = layer.init(jax.random.key(0), x)
    np.testing.assert_allclose(layer.apply(params, x), x, atol=1e-7)
    grad = jax.grad(lambda p: jnp.sum(layer.apply(p, x) * jnp.arange(1.0, 7.0)[:, None]
                                      .reshape(2, 3, 1)))(params)["params"]["knots"]
    # Hand computation: knots at -1 + k/4; each value splits its weight between the two
    # knots of its segment, (1 - frac) to the lower one.
    expected = np.zeros(bins + 1)
    for weight, value in zip(range(1, 7), np.asarray(x).ravel()):
        t = (value + 1.0) * bins / 2
        k = int(np.floor(t))
        expected[k] += weight * (1 - (t - k))
        expected[k + 1] += weight * (t - k)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(expected) == 4  # knots 2, 3 (-0.5, -0.25) and 6, 7 (0.5, 0.75)


@pytest.mark.parametrize("generator, last_layer", [
    (UNetGenerator(ngf=4, num_downs=3, residual=True, dropout_rate=0.0, calibration_bins=16,
                   upsample="resize"), "up_conv_0"),
    (ResnetGenerator(ngf=4, n_blocks=1, residual=True, dropout_rate=0.0, calibration_bins=16),
     "conv_out"),
])
def test_a_residual_generator_corrects_the_calibrated_input(generator, last_layer):
    """With the last layer zeroed a residual generator returns its calibrated centre
    slice: set the knots to an affine map and the output is that map of the input."""
    image = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    params = generator.init(jax.random.key(1), image, train=False)["params"]
    params[last_layer] = jax.tree_util.tree_map(jnp.zeros_like, params[last_layer])
    knots = jnp.linspace(-1.0, 1.0, 17)
    params["calibration"] = {"knots": 0.5 * knots + 0.1}
    out = generator.apply({"params": params}, image, train=False)
    np.testing.assert_allclose(out, 0.5 * image[..., 1:2] + 0.1, atol=1e-6)
    # The network sees the calibrated image: calibrating x by an affine map gives what the
    # identity calibration gives on the mapped image.
    trained = generator.init(jax.random.key(1), image, train=False)["params"]
    affine = {**trained, "calibration": {"knots": 0.5 * knots + 0.1}}
    identity = {**trained, "calibration": {"knots": knots}}
    np.testing.assert_allclose(
        generator.apply({"params": affine}, image, train=False),
        generator.apply({"params": identity}, 0.5 * image + 0.1, train=False), atol=1e-5)


@pytest.mark.parametrize("config_name, method", [("pix2pix_pelvis.py:tiny", "pix2pix"),
                                                  ("pgan_pelvis.py:tiny", "pgan"),
                                                  ("cyclegan_pelvis.py:tiny", "cyclegan")])
@pytest.mark.parametrize("bins", [1, -4])
def test_bad_calibration_bins_is_a_config_error(config_name, method, bins):
    config = load_config_file(f"{REPO / 'configs' / config_name}")
    config.model.gen.calibration_bins = bins
    with pytest.raises(ConfigError, match=r"config.model.gen.calibration_bins="):
        methods.get_method(method).validate_config(config)


def test_runs_saved_before_the_calibration_existed_resume_and_keep_their_digest():
    from sct_jax.reproduce.ablate import config_digest
    from sct_jax.runs import lock

    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    assert config.model.gen.calibration_bins == 0  # an MR model is not calibrated
    saved = json.loads(config.to_json_best_effort())
    del saved["model"]["gen"]["calibration_bins"]
    assert lock.changed_resume_keys(saved, config) == []
    older = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    with older.unlocked():
        del older.model.gen["calibration_bins"]
    assert config_digest(older) == config_digest(config)
    config.model.gen.calibration_bins = 64
    assert lock.changed_resume_keys(saved, config) == ["model.gen.calibration_bins"]
    assert config_digest(older) != config_digest(config)
