"""pix2pix U-Net and PatchGAN: shapes, reference parameter counts, receptive field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.errors import ConfigError
from sct_jax.models.patchgan import PatchDiscriminator, patchgan_receptive_field
from sct_jax.models.unet import UNetGenerator, unet_dropout_levels

KEY = jax.random.key(0)


def _n_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_params(model, x_shape, **kwargs):
    """Parameter shapes only (jax.eval_shape: no compilation, no FLOPs)."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(KEY, x, **kwargs), x)["params"]


def _numpy_params(model, x, seed=0, **kwargs):
    """Parameters drawn with numpy in the shapes model.init gives (the reference's
    N(0, 0.02) convs and N(1, 0.02) norm scales), sparing the JAX samplers' compile time.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: model.init(KEY, x, **kwargs), x)

    def draw(path, leaf):
        mean = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(mean + 0.02 * rng.normal(size=leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def _output_shape(model, x_shape, **kwargs):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.eval_shape(lambda x: model.apply(model.init(KEY, x, **kwargs), x, **kwargs),
                          x).shape


# ------------------------------------------------- the reference's counts, by formula

def _torch_conv(c_in, c_out, bias, k=4):
    return c_in * c_out * k * k + (c_out if bias else 0)


def _torch_norm(c, norm):
    return 2 * c if norm == "batch" else 0  # BatchNorm2d(affine) weight + bias


def reference_unet_params(input_nc, output_nc, ngf=64, num_downs=8, norm="batch"):
    """Walks the reference UnetGenerator's block list (outer_nc, inner_nc, kind)."""
    use_bias = norm == "instance"
    blocks = ([(ngf * 8, ngf * 8, "innermost")] + [(ngf * 8, ngf * 8, "mid")] * (num_downs - 5)
              + [(ngf * 4, ngf * 8, "mid"), (ngf * 2, ngf * 4, "mid"), (ngf, ngf * 2, "mid"),
                 (output_nc, ngf, "outermost")])
    total = 0
    for outer, inner, kind in blocks:
        total += _torch_conv(input_nc if kind == "outermost" else outer, inner, use_bias)
        if kind == "outermost":
            total += _torch_conv(inner * 2, outer, True)
        elif kind == "innermost":
            total += _torch_conv(inner, outer, use_bias) + _torch_norm(outer, norm)
        else:
            total += (_torch_norm(inner, norm) + _torch_conv(inner * 2, outer, use_bias)
                      + _torch_norm(outer, norm))
    return total


def reference_patchgan_params(input_nc, ndf=64, n_layers=3, norm="batch"):
    use_bias = norm == "instance"
    total, mult = _torch_conv(input_nc, ndf, True), 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        total += _torch_conv(ndf * prev, ndf * mult, use_bias) + _torch_norm(ndf * mult, norm)
    return total + _torch_conv(ndf * mult, 1, True)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_unet_256_parameter_count_matches_reference(norm):
    model = UNetGenerator(out_channels=3, ngf=64, num_downs=8, norm=norm)
    count = _n_params(_abstract_params(model, (1, 256, 256, 3), train=False))
    assert count == reference_unet_params(3, 3, norm=norm)
    if norm == "batch":
        assert count == 54_413_955  # the reference prints "54.414 M"


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_patchgan_parameter_count_matches_reference(norm):
    model = PatchDiscriminator(ndf=64, n_layers=3, norm=norm)
    count = _n_params(_abstract_params(model, (1, 256, 256, 6)))
    assert count == reference_patchgan_params(6, norm=norm)
    if norm == "batch":
        assert count == 2_768_705  # the reference prints "2.769 M"


def test_counts_match_a_published_reference_log():
    # junyanz/pytorch-CycleGAN-and-pix2pix issue #1152 (unet_256, basic D, batch norm,
    # one-channel images): "[Network G] ... 54.408 M", "[Network D] ... 2.765 M".
    gen = _abstract_params(UNetGenerator(out_channels=1, norm="batch"), (1, 256, 256, 1),
                           train=False)
    disc = _abstract_params(PatchDiscriminator(norm="batch"), (1, 256, 256, 2))
    assert round(_n_params(gen) / 1e6, 3) == 54.408
    assert round(_n_params(disc) / 1e6, 3) == 2.765


def test_unet_dropout_levels_match_reference():
    # The reference's num_downs - 5 intermediate ngf*8 blocks.
    assert unet_dropout_levels(64, 8) == [4, 5, 6]
    assert unet_dropout_levels(64, 7) == [4, 5]
    assert unet_dropout_levels(64, 5) == []
    assert unet_dropout_levels(4, 3, max_mult=1) == [1]


# ------------------------------------------------- shapes and errors

@pytest.mark.parametrize("x_shape,num_downs", [((2, 64, 64, 2), 3), ((1, 32, 48, 3), 4),
                                               ((1, 32, 32, 32, 1), 5),
                                               ((1, 320, 192, 1), 6)])
def test_unet_output_shape(x_shape, num_downs):
    model = UNetGenerator(out_channels=1, ngf=4, num_downs=num_downs)
    assert _output_shape(model, x_shape, train=False) == (*x_shape[:-1], 1)


@pytest.mark.parametrize("x_shape,num_downs", [((1, 36, 48, 1), 3), ((1, 320, 192, 1), 7),
                                               ((1, 32, 32, 24, 1), 4)])
def test_unet_rejects_indivisible_sizes(x_shape, num_downs):
    model = UNetGenerator(ngf=4, num_downs=num_downs)
    with pytest.raises(ConfigError, match=rf"model.num_downs={num_downs}.*{x_shape[1:-1]}"):
        _output_shape(model, x_shape, train=False)


def test_unknown_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="model.norm"):
        _output_shape(PatchDiscriminator(ndf=4, norm="layer"), (1, 32, 32, 2))


def _torch_conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("x_shape", [(2, 64, 64, 2), (1, 40, 56, 2), (1, 32, 32, 32, 2)])
def test_patchgan_output_shape(x_shape):
    expected = list(x_shape[1:-1])
    for stride in (2, 2, 2, 1, 1):
        expected = [_torch_conv_out(n, 4, stride, 1) for n in expected]
    assert _output_shape(PatchDiscriminator(ndf=4), x_shape) == (x_shape[0], *expected, 1)


# ------------------------------------------------- behaviour

def test_patchgan_receptive_field_is_70():
    assert patchgan_receptive_field(3) == 70
    # No norm: instance/batch statistics couple all pixels and would hide the window.
    model = PatchDiscriminator(ndf=2, n_layers=3, norm="none")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 96, 96, 1)), jnp.float32)
    params = _numpy_params(model, x)
    o = 5  # logit (5, 5) of the 10 x 10 grid sees input rows/cols 8*o - 23 .. 8*o + 46

    @jax.jit
    def grad_of_one_logit(x):
        return jax.grad(lambda x: model.apply(params, x)[0, o, o, 0])(x)

    support = np.abs(np.asarray(grad_of_one_logit(x))[0, ..., 0]) > 0
    rows, cols = np.nonzero(support)
    lo, hi = 8 * o - 23, 8 * o + 46
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (lo, hi, lo, hi)
    assert hi - lo + 1 == 70
    assert support[lo:hi + 1, lo:hi + 1].all()


@pytest.fixture(scope="module")
def tiny_unet():
    """ngf 4, 3 levels, max_mult 1 so that level 1 has dropout; 2D, batch 2."""
    model = UNetGenerator(out_channels=1, ngf=4, num_downs=3, max_mult=1, norm="instance")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 2)), jnp.float32)
    return model, _numpy_params(model, x, train=False), x


def test_dropout_only_in_training(tiny_unet):
    model, params, x = tiny_unet
    apply = jax.jit(model.apply, static_argnames="train")
    evaluated = np.asarray(apply(params, x, train=False))
    assert np.isfinite(evaluated).all()  # the values: test_unet_forward_matches_numpy_reference
    np.testing.assert_array_equal(evaluated, np.asarray(apply(params, x, train=False)))
    train_a = np.asarray(apply(params, x, train=True, rngs={"dropout": jax.random.key(1)}))
    train_b = np.asarray(apply(params, x, train=True, rngs={"dropout": jax.random.key(2)}))
    assert not np.allclose(train_a, evaluated)
    assert not np.allclose(train_a, train_b)
    # Without dropout, train=True is deterministic and equals the evaluation output.
    no_dropout = model.clone(dropout_rate=0.0)
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda p, x: no_dropout.apply(p, x, train=True))(params, x)),
        evaluated, rtol=1e-6, atol=1e-6)


def test_unet_3d_batch_norm_forward():
    model = UNetGenerator(out_channels=1, ngf=2, num_downs=2, norm="batch")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 4, 1)), jnp.float32)
    params = _numpy_params(model, x, train=False)
    assert set(params) == {"params"}  # batch statistics: no batch_stats collection
    apply = jax.jit(lambda p, x: model.apply(p, x, train=False))
    y = np.asarray(apply(params, x))
    assert y.shape == (2, 8, 8, 4, 1)
    assert np.isfinite(y).all() and y.std() > 0
    # Batch statistics (also at test time, as the reference): sample 0's output depends
    # on sample 1, which an instance norm or running statistics would not do.
    other = x.at[1].set(3.0 * x[1] + 1.0)
    y_other = np.asarray(apply(params, other))
    assert np.abs(y_other[0] - y[0]).max() > 1e-4


# ------------------------------------------- independent float64 numpy (torch semantics)

def _torch_layout(params):
    """Our kernels ``(k, k, I, O)`` -> torch Conv2d ``(O, I, k, k)`` and ConvTranspose2d
    ``(I, O, k, k)`` (spatially flipped), float64, biases 0 where absent."""
    conv = {n: np.asarray(p["kernel"], np.float64).transpose(3, 2, 0, 1) for n, p in params.items()}
    conv_t = {n: np.asarray(p["kernel"], np.float64)[::-1, ::-1].transpose(2, 3, 0, 1)
              for n, p in params.items()}
    bias = {n: np.asarray(p["bias"], np.float64) if "bias" in p else np.zeros(p["kernel"].shape[-1])
            for n, p in params.items()}
    return conv, conv_t, bias


def _leaky(v):
    return np.where(v > 0, v, 0.2 * v)


def numpy_unet(params, x_nhwc, num_downs):
    """The reference UnetGenerator (instance norm, eval mode) written as its recursion:
    ``block_i(x) = concat(lrelu(x), up_i(block_{i+1}(down_i(lrelu(x)))))``."""
    from test_resnet_generator import _conv, _conv_transpose, _instance_norm
    conv, conv_t, bias = _torch_layout(params)

    def block(i, x):  # x: the input of level i (already LeakyReLU'd for i > 0)
        h = _conv(x, conv[f"down_conv_{i}"], bias[f"down_conv_{i}"], 2, 1)
        if i == num_downs - 1:      # innermost: down (no norm) then up
            inner = h
        else:
            if i > 0:
                h = _instance_norm(h)
            inner = block(i + 1, _leaky(h))
        up = _conv_transpose(np.maximum(inner, 0), conv_t[f"up_conv_{i}"],
                             bias[f"up_conv_{i}"], 2, 1, 0)
        if i == 0:
            return np.tanh(up)
        return np.concatenate([x, _instance_norm(up)], axis=1)

    return block(0, np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)


def numpy_patchgan(params, x_nhwc, n_layers):
    from test_resnet_generator import _conv, _instance_norm
    conv, _, bias = _torch_layout(params)
    h = _leaky(_conv(np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2), conv["conv_0"], bias["conv_0"],
                     2, 1))
    for n in range(1, n_layers + 1):
        stride = 2 if n < n_layers else 1
        h = _leaky(_instance_norm(_conv(h, conv[f"conv_{n}"], bias[f"conv_{n}"], stride, 1)))
    return _conv(h, conv["logits"], bias["logits"], 1, 1).transpose(0, 2, 3, 1)


def _large_params(model, x, seed, **kwargs):
    """N(0, 0.3^2) weights and biases: every layer (and bias) visibly shapes the output."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: model.init(KEY, x, **kwargs), x)
    return jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.normal(size=leaf.shape),
                                                 jnp.float32), abstract)


def test_unet_forward_matches_numpy_reference(tiny_unet):
    model, _, x = tiny_unet
    params = _large_params(model, x, 3, train=False)
    apply = jax.jit(model.apply, static_argnames="train")  # the program of the test above
    out = np.asarray(apply(params, x, train=False))
    expected = numpy_unet(jax.device_get(params["params"]), np.asarray(x), model.num_downs)
    assert out.shape == expected.shape == (2, 16, 16, 1)
    assert expected.std() > 0.1
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=2e-5)


def test_patchgan_forward_matches_numpy_reference():
    model = PatchDiscriminator(ndf=4, n_layers=2, norm="instance")
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 2)), jnp.float32)
    params = _large_params(model, x, 5)
    out = np.asarray(jax.jit(model.apply)(params, x))
    expected = numpy_patchgan(jax.device_get(params["params"]), np.asarray(x), 2)
    assert out.shape == expected.shape == (2, 2, 2, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
