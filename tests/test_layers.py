"""Layers against float64 numpy references and PyTorch's size formulas."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.errors import ConfigError
from sct_jax.models import layers


def _random_params(rng, kernel_shape):
    """Kernel and bias from numpy: apply() needs no JAX random ops (slow to compile)."""
    return {"kernel": rng.normal(size=kernel_shape).astype(np.float32),
            "bias": rng.normal(size=kernel_shape[-1:]).astype(np.float32)}


# ---------------------------------------------------------------- float64 references

def _np_conv(x, kernel, strides, pads):
    """Direct cross-correlation, (B, *S, Ci) x (*k, Ci, Co), explicit zero padding."""
    nd = x.ndim - 2
    x = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
    ks = kernel.shape[:nd]
    out_sizes = [(x.shape[1 + a] - ks[a]) // strides[a] + 1 for a in range(nd)]
    out = np.zeros((x.shape[0], *out_sizes, kernel.shape[-1]))
    for o in itertools.product(*map(range, out_sizes)):
        window = tuple(slice(o[a] * strides[a], o[a] * strides[a] + ks[a]) for a in range(nd))
        patch = x[(slice(None),) + window]  # (B, *k, Ci)
        out[(slice(None),) + o] = np.tensordot(patch, kernel, axes=nd + 1)
    return out


def _np_conv_transpose(x, kernel, strides, padding, output_padding):
    """PyTorch's ConvTransposeNd as a scatter: input i, tap t land on i*s - p + t.

    conv_lowering keeps the kernel unflipped (a PyTorch weight is ours flipped
    spatially), so tap t of the PyTorch weight is tap k-1-t of ``kernel``.
    """
    nd = x.ndim - 2
    ks = kernel.shape[:nd]
    torch_weight = kernel[tuple(slice(None, None, -1) for _ in range(nd))]
    sizes = [(x.shape[1 + a] - 1) * strides[a] - 2 * padding[a] + ks[a] + output_padding[a]
             for a in range(nd)]
    full = [(x.shape[1 + a] - 1) * strides[a] + ks[a] + output_padding[a] for a in range(nd)]
    out = np.zeros((x.shape[0], *full, kernel.shape[-1]))
    for i in itertools.product(*(range(s) for s in x.shape[1:-1])):
        for t in itertools.product(*map(range, ks)):
            pos = tuple(i[a] * strides[a] + t[a] for a in range(nd))
            out[(slice(None),) + pos] += x[(slice(None),) + i] @ torch_weight[t]
    crop = tuple(slice(padding[a], padding[a] + sizes[a]) for a in range(nd))
    return out[(slice(None),) + crop]


# ---------------------------------------------------------------- Conv

# (spatial input, kernel, stride, padding): odd/even sizes, strides 1 and 2, 1D-3D.
CONV_CASES = [
    ((9,), 3, 1, 1), ((10,), 4, 2, 1),
    ((7, 8), 3, 1, 1), ((7, 8), 4, 2, 1), ((6, 9), 3, 2, 0), ((8, 8), 7, 1, 3),
    ((5, 6, 7), 3, 1, 1), ((5, 6, 7), 4, 2, 1), ((4, 4, 4), 3, 2, "SAME"),
]


@pytest.mark.parametrize("spatial,k,s,p", CONV_CASES)
def test_conv_output_size_matches_pytorch(spatial, k, s, p):
    x = jax.ShapeDtypeStruct((2, *spatial, 3), jnp.float32)
    conv = layers.Conv(5, kernel_size=k, strides=s, padding=p)
    out = jax.eval_shape(lambda x: conv.apply(conv.init(jax.random.key(0), x), x), x)
    pad = (k - 1) // 2 if p == "SAME" else p
    expected = tuple((n + 2 * pad - k) // s + 1 for n in spatial)  # torch.nn.ConvNd
    assert out.shape == (2, *expected, 5)


@pytest.mark.parametrize("spatial,k,s,p", [((7, 8), 4, 2, 1), ((5, 4, 6), 3, 1, 1),
                                           ((9,), 3, 2, 0)])
def test_conv_values_match_numpy(spatial, k, s, p):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *spatial, 3)).astype(np.float32)
    params = _random_params(rng, (*(k,) * len(spatial), 3, 4))
    conv = layers.Conv(4, kernel_size=k, strides=s, padding=p)
    out = conv.apply({"params": params}, jnp.asarray(x))
    expected = _np_conv(x.astype(np.float64), params["kernel"].astype(np.float64),
                        (s,) * len(spatial), [(p, p)] * len(spatial)) + params["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_conv_init_shapes_and_default_init():
    conv = layers.Conv(64, kernel_size=4, use_bias=False)
    params = conv.init(jax.random.key(1), jnp.zeros((1, 8, 8, 32)))["params"]
    assert jax.tree.map(jnp.shape, params) == {"kernel": (4, 4, 32, 64)}
    convt = layers.ConvTranspose(6, kernel_size=(3, 2, 1))
    shapes = jax.eval_shape(convt.init, jax.random.key(0), jnp.zeros((1, 4, 4, 4, 5)))
    assert jax.tree.map(jnp.shape, shapes["params"]) == {"kernel": (3, 2, 1, 5, 6),
                                                         "bias": (6,)}
    # pix2pix init: N(0, 0.02); 4*4*32*64 = 32768 samples pin the std to ~1%.
    assert abs(float(jnp.std(params["kernel"])) - 0.02) < 0.001
    assert abs(float(jnp.mean(params["kernel"]))) < 0.001


def test_conv_padding_forms():
    assert layers.conv_padding("SAME", (3, 4)) == [(1, 1), (1, 2)]
    assert layers.conv_padding("valid", (3, 3)) == [(0, 0), (0, 0)]
    assert layers.conv_padding(2, (5, 5, 5)) == [(2, 2)] * 3
    assert layers.conv_padding([1, (0, 2)], (3, 3)) == [(1, 1), (0, 2)]
    with pytest.raises(ValueError):
        layers.conv_padding([1, 1, 1], (3, 3))


def test_conv_computes_in_requested_dtype():
    conv = layers.Conv(2, kernel_size=3, padding=1, dtype=jnp.bfloat16)
    x = jnp.ones((1, 4, 4, 1), jnp.float32)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert jax.eval_shape(conv.apply, variables, x).dtype == jnp.bfloat16


# ---------------------------------------------------------------- ConvTranspose

# (spatial input, kernel, stride, padding, output_padding)
CONVT_CASES = [
    ((5,), 4, 2, 1, 0), ((6,), 3, 2, 1, 1),
    ((4, 5), 4, 2, 1, 0), ((4, 5), 3, 2, 1, 1), ((7, 6), 3, 1, 1, 0), ((3, 3), 2, 2, 0, 0),
    ((3, 4, 5), 4, 2, 1, 0), ((3, 4, 5), 3, 2, 1, 1), ((3, 3, 3), 3, 1, 0, 0),
]


@pytest.mark.parametrize("spatial,k,s,p,op", CONVT_CASES)
def test_conv_transpose_output_size_matches_pytorch(spatial, k, s, p, op):
    x = jax.ShapeDtypeStruct((2, *spatial, 3), jnp.float32)
    convt = layers.ConvTranspose(5, kernel_size=k, strides=s, padding=p, output_padding=op)
    out = jax.eval_shape(lambda x: convt.apply(convt.init(jax.random.key(0), x), x), x)
    expected = tuple((n - 1) * s - 2 * p + k + op for n in spatial)  # ConvTransposeNd
    assert out.shape == (2, *expected, 5)


@pytest.mark.parametrize("spatial,k,s,p,op", [((4, 5), 4, 2, 1, 0), ((3,), 3, 2, 1, 1),
                                              ((2, 3, 2), 3, 2, 1, 1)])
def test_conv_transpose_values_match_numpy(spatial, k, s, p, op):
    rng = np.random.default_rng(1)
    nd = len(spatial)
    x = rng.normal(size=(2, *spatial, 3)).astype(np.float32)
    params = _random_params(rng, (*(k,) * nd, 3, 4))
    convt = layers.ConvTranspose(4, kernel_size=k, strides=s, padding=p, output_padding=op)
    out = convt.apply({"params": params}, jnp.asarray(x))
    expected = _np_conv_transpose(x.astype(np.float64), params["kernel"].astype(np.float64),
                                  (s,) * nd, (p,) * nd, (op,) * nd) + params["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- padding and norms

@pytest.mark.parametrize("shape,pad", [((2, 7, 3), 3), ((1, 5, 6, 2), 2),
                                       ((1, 4, 5, 6, 1), (1, 2, 3))])
def test_reflect_pad_matches_numpy(shape, pad):
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    nd = len(shape) - 2
    pads = (pad,) * nd if isinstance(pad, int) else pad
    expected = np.pad(x, [(0, 0)] + [(p, p) for p in pads] + [(0, 0)], mode="reflect")
    np.testing.assert_array_equal(np.asarray(layers.reflect_pad(jnp.asarray(x), pad)),
                                  expected)
    np.testing.assert_array_equal(np.asarray(layers.ReflectPad(pad).apply({}, x)), expected)


def test_reflect_pad_rejects_pad_not_smaller_than_size():
    with pytest.raises(ValueError):
        layers.reflect_pad(jnp.zeros((1, 3, 8, 1)), 3)


def test_dropout_drops_and_rescales():
    x = jnp.full((2, 10, 10, 10, 5), 3.0)
    dropout = layers.Dropout(0.5)
    assert dropout.apply({}, x, deterministic=True) is x
    y = np.asarray(dropout.apply({}, x, deterministic=False,
                                 rngs={"dropout": jax.random.key(0)}))
    assert y.shape == x.shape
    assert set(np.unique(y)) == {0.0, 6.0}  # kept values scaled by 1 / (1 - rate)
    assert abs((y == 0).mean() - 0.5) < 0.03  # 10,000 draws: std 0.005
    other = dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.array_equal(y, np.asarray(other))


def _np_normalise(x, axes, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)  # biased, as torch
    return (x - mean) / np.sqrt(var + eps)


@pytest.mark.parametrize("shape", [(2, 9, 3), (2, 6, 5, 3), (2, 4, 3, 5, 2)])
def test_instance_norm_matches_numpy(shape):
    # A large offset and scale per channel: a one-pass variance would lose digits.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=shape) * 3 + 50).astype(np.float32)
    out = layers.InstanceNorm().apply({}, jnp.asarray(x))
    np.testing.assert_allclose(out, _np_normalise(x, tuple(range(1, x.ndim - 1))),
                               rtol=1e-4, atol=1e-4)


def test_instance_norm_affine_params():
    x = jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)
    variables = jax.eval_shape(layers.InstanceNorm(use_affine=True).init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables["params"]) == {"scale": (3,), "bias": (3,)}
    assert jax.eval_shape(layers.InstanceNorm().init, jax.random.key(0), x) == {}


@pytest.mark.parametrize("shape", [(3, 5, 4, 2), (2, 3, 4, 3, 2)])
def test_batch_stats_norm_matches_numpy(shape):
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape).astype(np.float32) * 2 - 1
    params = {"scale": rng.normal(size=shape[-1:]).astype(np.float32),
              "bias": rng.normal(size=shape[-1:]).astype(np.float32)}
    out = layers.BatchStatsNorm().apply({"params": params}, jnp.asarray(x))
    expected = (_np_normalise(x, tuple(range(0, x.ndim - 1))) * params["scale"]
                + params["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_batch_stats_norm_init_is_a_pure_params_pytree():
    variables = layers.BatchStatsNorm().init(jax.random.key(0), jnp.zeros((2, 3, 3, 512)))
    assert set(variables) == {"params"}  # no running averages
    scale = np.asarray(variables["params"]["scale"])
    # The reference init: scale ~ N(1, 0.02) (512 samples pin the std to ~6%), bias 0.
    assert abs(scale.mean() - 1) < 0.005 and abs(scale.std() - 0.02) < 0.004
    np.testing.assert_array_equal(np.asarray(variables["params"]["bias"]), 0)


def test_make_norm_kinds():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 4, 3)), jnp.float32)
    assert isinstance(layers.make_norm("instance"), layers.InstanceNorm)
    assert isinstance(layers.make_norm("batch"), layers.BatchStatsNorm)
    assert layers.make_norm("none")(x) is x
    with pytest.raises(ConfigError, match="model.norm"):
        layers.make_norm("group")
    assert layers.conv_bias_before_norm("instance")
    assert not layers.conv_bias_before_norm("batch")
