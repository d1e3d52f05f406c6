"""pGAN ResNet generator: reference parameter count, a float64 numpy forward, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.errors import ConfigError
from sct_jax.models.resnet_generator import ResnetGenerator

KEY = jax.random.key(0)
TINY = dict(ngf=2, n_blocks=1)
X_SHAPE = (2, 8, 12, 3)  # 2.5D input: three MR slices as channels


def _abstract_params(model, x_shape):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(KEY, x, train=False), x)["params"]


def _n_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def reference_resnet_params(input_nc, output_nc, ngf=64, n_blocks=9):
    """The reference ResnetGenerator with InstanceNorm (bias on every conv, no affine)."""
    def conv(c_in, c_out, k):
        return c_in * c_out * k * k + c_out
    total = conv(input_nc, ngf, 7) + conv(ngf, 2 * ngf, 3) + conv(2 * ngf, 4 * ngf, 3)
    total += n_blocks * 2 * conv(4 * ngf, 4 * ngf, 3)
    total += conv(4 * ngf, 2 * ngf, 3) + conv(2 * ngf, ngf, 3)  # ConvTranspose2d
    return total + conv(ngf, output_nc, 7)


def test_parameter_count_matches_reference():
    # CycleGAN's resnet_9blocks 3 -> 3 is the well-known 11.378 M parameters.
    assert _n_params(_abstract_params(ResnetGenerator(out_channels=3), (1, 64, 64, 3))) \
        == 11_378_179 == reference_resnet_params(3, 3)
    # pGAN: 3 MR slices -> 1 CT slice.
    assert _n_params(_abstract_params(ResnetGenerator(), (1, 64, 64, 3))) \
        == reference_resnet_params(3, 1)


def test_shapes_2d_3d_and_size_checks():
    def out_shape(model, shape):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.eval_shape(
            lambda x: model.init_with_output(KEY, x, train=False)[0], x).shape
    model = ResnetGenerator(**TINY)
    assert out_shape(model, (2, 320, 192, 3)) == (2, 320, 192, 1)
    assert out_shape(model, (1, 8, 12, 16, 2)) == (1, 8, 12, 16, 1)  # 3D patches
    with pytest.raises(ConfigError, match="multiple of 4"):
        out_shape(model, (1, 10, 12, 3))
    with pytest.raises(ConfigError, match="at least 8"):
        out_shape(model, (1, 4, 12, 3))


# ------------------------------------------- independent float64 numpy (torch semantics)

def _conv(x, w, b, stride=1, pad=0):
    """torch.nn.functional.conv2d: x (B, I, H, W), w (O, I, k, k), zero padding."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    h_out = (x.shape[2] - k) // stride + 1
    w_out = (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], h_out, w_out))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * h_out:stride, j:j + stride * w_out:stride]
            out += np.einsum("bihw,oi->bohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def _conv_transpose(x, w, b, stride, pad, output_pad):
    """torch conv_transpose2d: x (B, I, H, W), w (I, O, k, k)."""
    k = w.shape[-1]
    bsz, _, h, wd = x.shape
    full = np.zeros((bsz, w.shape[1], (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(k):
        for j in range(k):
            full[:, :, i:i + stride * h:stride, j:j + stride * wd:stride] += np.einsum(
                "bihw,io->bohw", x, w[:, :, i, j])
    h_out = (h - 1) * stride - 2 * pad + k + output_pad
    w_out = (wd - 1) * stride - 2 * pad + k + output_pad
    return full[:, :, pad:pad + h_out, pad:pad + w_out] + b[None, :, None, None]


def _instance_norm(x):
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


def _reflect(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")


def numpy_resnet_generator(params, x_nhwc, n_blocks):
    """The reference forward in eval mode (dropout off), from our params."""
    def w(name):  # ours (k, k, I, O) -> torch Conv2d (O, I, k, k)
        return np.asarray(params[name]["kernel"], np.float64).transpose(3, 2, 0, 1)

    def wt(name):  # ours -> torch ConvTranspose2d (I, O, k, k): spatially flipped
        return np.asarray(params[name]["kernel"], np.float64)[::-1, ::-1].transpose(2, 3, 0, 1)

    def b(name):
        return np.asarray(params[name]["bias"], np.float64)

    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    h = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
    h = relu(_instance_norm(_conv(_reflect(h, 3), w("conv_in"), b("conv_in"))))
    for i in range(2):
        h = relu(_instance_norm(_conv(h, w(f"down_conv_{i}"), b(f"down_conv_{i}"), 2, 1)))
    for n in range(n_blocks):
        blk = params[f"block_{n}"]
        r = _conv(_reflect(h, 1), np.asarray(blk["conv_0"]["kernel"], np.float64).transpose(3, 2, 0, 1),
                  np.asarray(blk["conv_0"]["bias"], np.float64))
        r = relu(_instance_norm(r))
        r = _conv(_reflect(r, 1), np.asarray(blk["conv_1"]["kernel"], np.float64).transpose(3, 2, 0, 1),
                  np.asarray(blk["conv_1"]["bias"], np.float64))
        h = h + _instance_norm(r)
    for i in range(2):
        h = relu(_instance_norm(_conv_transpose(h, wt(f"up_conv_{i}"), b(f"up_conv_{i}"),
                                                2, 1, 1)))
    h = np.tanh(_conv(_reflect(h, 3), w("conv_out"), b("conv_out")))
    return h.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny():
    """Tiny generator, numpy-drawn params (larger than N(0, 0.02) so that every layer
    matters, biases non-zero), an input, and one jitted apply for every test."""
    model = ResnetGenerator(**TINY)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape),
                                                   jnp.float32),
                          _abstract_params(model, X_SHAPE))
    x = jnp.asarray(rng.uniform(-1, 1, size=X_SHAPE), jnp.float32)

    no_dropout = ResnetGenerator(dropout_rate=0.0, **TINY)  # CycleGAN's setting

    @jax.jit
    def apply(params, x, dropout_key):
        return (model.apply({"params": params}, x, train=False),
                model.apply({"params": params}, x, train=True,
                            rngs={"dropout": dropout_key}),
                no_dropout.apply({"params": params}, x, train=True))
    return params, x, apply


def test_forward_matches_numpy_reference(tiny):
    params, x, apply = tiny
    out, _, _ = apply(params, x, jax.random.key(1))
    expected = numpy_resnet_generator(jax.device_get(params), np.asarray(x), n_blocks=1)
    assert out.shape == (2, 8, 12, 1)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_dropout_only_in_training(tiny):
    params, x, apply = tiny
    eval_a, train_a, no_dropout = apply(params, x, jax.random.key(1))
    eval_b, train_b, _ = apply(params, x, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    assert not np.allclose(np.asarray(train_a), np.asarray(eval_a), atol=1e-3)
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b), atol=1e-3)
    # With dropout_rate=0 (CycleGAN), training mode equals evaluation mode.
    np.testing.assert_allclose(np.asarray(no_dropout), np.asarray(eval_a), atol=1e-6)
