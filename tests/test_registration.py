"""RegGAN: the warp (shifts, border padding, scipy, finite differences), the flow
smoothness loss, and the registration network's shapes and initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from sct_jax.errors import ConfigError
from sct_jax.losses.smoothness import smoothness
from sct_jax.models.registration import RegistrationNet, warp

KEY = jax.random.key(0)
# One compiled program per shape instead of many eagerly compiled ops.
warp_jit = jax.jit(warp)
smoothness_jit = jax.jit(smoothness)


def _image(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_zero_flow_is_identity_and_constant_flow_shifts():
    image = _image((2, 9, 11, 3))
    np.testing.assert_array_equal(
        np.asarray(warp_jit(image, np.zeros((2, 9, 11, 2), np.float32))), image)
    # out[y, x] = image[y + 2, x - 3], exact where the source lies inside the image.
    flow = np.broadcast_to(np.float32([2, -3]), (2, 9, 11, 2))
    out = np.asarray(warp_jit(image, flow))
    np.testing.assert_array_equal(out[:, :-2, 3:], image[:, 2:, :-3])
    # Border padding: sources past the edge read the edge row / column.
    np.testing.assert_array_equal(out[:, -2:, 3:], np.repeat(image[:, -1:, :-3], 2, axis=1))
    np.testing.assert_array_equal(out[:, :-2, :3], np.repeat(image[:, 2:, :1], 3, axis=2))


def test_random_flow_matches_scipy_with_clamped_coordinates():
    image = _image((1, 7, 8, 1), seed=1)
    flow = 4 * _image((1, 7, 8, 2), seed=2)  # many sources outside the image
    rows, cols = np.meshgrid(np.arange(7), np.arange(8), indexing="ij")
    coords = np.stack([np.clip(rows + flow[0, ..., 0], 0, 6),
                       np.clip(cols + flow[0, ..., 1], 0, 7)]).astype(np.float64)
    expected = ndimage.map_coordinates(np.asarray(image[0, ..., 0], np.float64), coords, order=1)
    np.testing.assert_allclose(np.asarray(warp_jit(image, flow))[0, ..., 0], expected,
                               atol=1e-5)


def test_warp_3d_constant_shift():
    volume = _image((1, 5, 6, 7, 2), seed=3)
    flow = np.broadcast_to(np.float32([1, 0, -2]), (1, 5, 6, 7, 3))
    out = np.asarray(warp_jit(volume, flow))
    np.testing.assert_array_equal(out[:, :-1, :, 2:], volume[:, 1:, :, :-2])


def test_gradients_match_finite_differences():
    image = jnp.asarray(_image((2, 6, 7, 1), seed=4))
    weights = jnp.asarray(_image((2, 6, 7, 1), seed=5))
    rng = np.random.default_rng(6)
    # Fractional parts in [0.3, 0.7]: the warp is linear in the flow within a cell, so
    # a central difference of step 0.01 is exact up to float32 rounding.
    flow = jnp.float32(rng.integers(-2, 3, (2, 6, 7, 2)) + rng.uniform(0.3, 0.7,
                                                                        (2, 6, 7, 2)))
    direction = jnp.float32(rng.normal(size=flow.shape))

    @jax.jit
    def objective(image, flow):
        return jnp.sum(weights * warp(image, flow))

    grad_fn = jax.jit(jax.grad(objective, argnums=(0, 1)))
    grad_image, grad_flow = grad_fn(image, flow)
    eps = 0.01
    numeric = (objective(image, flow + eps * direction)
               - objective(image, flow - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(grad_flow * direction)), float(numeric),
                               rtol=1e-3, atol=1e-3)
    # Linear in the image: <grad, v> = objective(v).
    v = jnp.asarray(_image(image.shape, seed=7))
    np.testing.assert_allclose(float(jnp.sum(grad_image * v)), float(objective(v, flow)),
                               rtol=1e-4)
    # Clamped coordinates (sources far outside) carry no gradient, as grid_sample's.
    far = jnp.full(flow.shape, 50.0)
    _, grad_far = grad_fn(image, far)
    assert float(jnp.abs(grad_far).max()) == 0.0


def test_smoothness_closed_form_and_reference():
    # Linear ramp: u = a*y + b*x, v = c*y -> differences (a, c) along y, (b, 0) along x,
    # each averaged over the 2 components: ((a^2 + c^2) + b^2) / 2.
    a, b, c = 0.5, -1.5, 2.0
    y, x = np.meshgrid(np.arange(6.0), np.arange(9.0), indexing="ij")
    ramp = np.stack([a * y + b * x, c * y], axis=-1)[None].astype(np.float32)
    np.testing.assert_allclose(float(smoothness_jit(ramp)), (a * a + c * c + b * b) / 2,
                               rtol=1e-6)
    # The reference's smooothing_loss on an NCHW field, in numpy.
    field = _image((2, 5, 7, 2), seed=8)
    nchw = np.asarray(field, np.float64).transpose(0, 3, 1, 2)
    dy = np.abs(nchw[:, :, 1:, :] - nchw[:, :, :-1, :])
    dx = np.abs(nchw[:, :, :, 1:] - nchw[:, :, :, :-1])
    np.testing.assert_allclose(float(smoothness_jit(field)), np.mean(dx * dx) + np.mean(dy * dy),
                               rtol=1e-5)
    assert float(smoothness_jit(np.ones((1, 4, 4, 2), np.float32))) == 0.0


TINY_REG = dict(down_channels=(4, 8), up_channels=(8, 4), n_bottleneck_blocks=1)


def test_registration_net_shapes_and_level_check():
    def out_shape(model, shape):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.eval_shape(lambda a: model.init_with_output(KEY, a, a)[0], x).shape
    # Odd sizes: floor pooling, the decoder resizes to each skip's size.
    assert out_shape(RegistrationNet(**TINY_REG), (2, 18, 14, 1)) == (2, 18, 14, 2)
    assert out_shape(RegistrationNet(**TINY_REG), (1, 8, 8, 12, 1)) == (1, 8, 8, 12, 3)
    # The reference's 7 levels fit 256 x 256 but not 320 x 192 (192 / 2^7 < 2).
    assert out_shape(RegistrationNet(), (1, 256, 256, 1)) == (1, 256, 256, 2)
    with pytest.raises(ConfigError, match="fewer levels"):
        out_shape(RegistrationNet(), (1, 320, 192, 1))
    six_levels = RegistrationNet(down_channels=(32, 64, 64, 64, 64, 64),
                                 up_channels=(64, 64, 64, 64, 64, 32))
    assert out_shape(six_levels, (1, 320, 192, 1)) == (1, 320, 192, 2)
    with pytest.raises(ConfigError, match="same length"):
        out_shape(RegistrationNet(down_channels=(4, 8), up_channels=(4,)), (1, 16, 16, 1))


def test_registration_net_init_and_near_identity_start():
    model = RegistrationNet(**TINY_REG)
    fake = jnp.asarray(_image((2, 16, 12, 1), seed=9))
    real = jnp.asarray(_image((2, 16, 12, 1), seed=10))

    # Only the leaves we inspect: XLA drops the other initialisers, whose samplers cost
    # ~0.6 s of compilation each on this CPU.
    def inspected(key):
        params = model.init(key, fake, real)["params"]
        return params["flow"]["kernel"], params["flow"]["bias"], params["down_conv_1"]["kernel"]
    out_kernel, out_bias, down_kernel = jax.device_get(jax.jit(inspected)(KEY))
    assert out_kernel.shape == (3, 3, 4, 2)
    assert 0.5e-5 < out_kernel.std() < 2e-5 and not np.any(out_bias)
    # Kaiming-normal (fan-in, LeakyReLU 0.2) on the encoder convs.
    expected_std = np.sqrt(2 / 1.04 / (9 * 4))
    assert abs(down_kernel.std() / expected_std - 1) < 0.15

    # With that output layer the field starts ~0 and the warp as the identity (other
    # weights drawn with numpy at the same Kaiming scale, sparing their compilation).
    rng = np.random.default_rng(11)
    shapes = jax.eval_shape(lambda: model.init(KEY, fake, real))["params"]

    def draw(path, leaf):
        if path[0].key == "flow" and path[-1].key == "kernel":
            return jnp.asarray(out_kernel)
        if path[-1].key == "bias":
            return jnp.zeros(leaf.shape, jnp.float32)
        std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
        return jnp.float32(std * rng.normal(size=leaf.shape))
    params = jax.tree_util.tree_map_with_path(draw, shapes)
    flow, warped = jax.jit(lambda p, f, r: (lambda fl: (fl, warp(f, fl)))(
        model.apply({"params": p}, f, r)))(params, fake, real)
    assert flow.shape == (2, 16, 12, 2) and np.all(np.isfinite(np.asarray(flow)))
    assert 0 < float(jnp.abs(flow).max()) < 1e-2
    np.testing.assert_allclose(np.asarray(warped), np.asarray(fake), atol=1e-2)
