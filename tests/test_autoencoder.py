"""AutoencoderKL: shapes at full size (abstractly), the reference's parameter count, a
real tiny 3D forward/backward, the log-variance clamp, the KL term and attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.errors import ConfigError
from sct_jax.models.autoencoder import (AttentionBlock, AutoencoderKL, kl_loss,
                                        sample_latent, torch_default_init,
                                        upsample_nearest)

KEY = jax.random.key(0)
TINY = dict(channels=(8, 8, 16), norm_num_groups=4)
TINY_SHAPE = (1, 16, 16, 16, 1)


def _n_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ------------------------------------------- the reference's parameter count, by walk

def _conv(c_in, c_out, k, nd):
    return c_in * c_out * k ** nd + c_out


def _res(c_in, c_out, nd):
    return (2 * c_in + _conv(c_in, c_out, 3, nd) + 2 * c_out + _conv(c_out, c_out, 3, nd)
            + (_conv(c_in, c_out, 1, nd) if c_in != c_out else 0))


def _attn(c):
    return 2 * c + 4 * (c * c + c)  # GroupNorm + q, k, v, proj linears


def reference_autoencoderkl_params(in_ch, out_ch, channels, latent, n_res, attention, nd,
                                   enc_nonlocal=False, dec_nonlocal=False):
    """Walks MONAI's Encoder / Decoder block lists (GenerativeModels, MONAI core)."""
    total = 3 * _conv(latent, latent, 1, nd)  # quant_conv_mu, _log_sigma, post_quant_conv
    # Encoder.
    total += _conv(in_ch, channels[0], 3, nd)
    c_prev = channels[0]
    for i, c in enumerate(channels):
        for _ in range(n_res):
            total += _res(c_prev, c, nd) + (_attn(c) if attention[i] else 0)
            c_prev = c
        if i != len(channels) - 1:
            total += _conv(c, c, 3, nd)
    if enc_nonlocal:
        total += 2 * _res(c_prev, c_prev, nd) + _attn(c_prev)
    total += 2 * c_prev + _conv(c_prev, latent, 3, nd)
    # Decoder.
    rev, rev_attn = channels[::-1], attention[::-1]
    total += _conv(latent, rev[0], 3, nd)
    if dec_nonlocal:
        total += 2 * _res(rev[0], rev[0], nd) + _attn(rev[0])
    c_prev = rev[0]
    for i, c in enumerate(rev):
        for _ in range(n_res):
            total += _res(c_prev, c, nd) + (_attn(c) if rev_attn[i] else 0)
            c_prev = c
        if i != len(rev) - 1:
            total += _conv(c, c, 3, nd)
    return total + 2 * c_prev + _conv(c_prev, out_ch, 3, nd)


def _abstract_forward(model, x_shape):
    """(params, (recon, mu, sigma)) as shapes only: jax.eval_shape, no FLOPs."""
    def init_and_apply(x):
        params = model.init(KEY, x, KEY)
        return params, model.apply(params, x, KEY)
    return jax.eval_shape(init_and_apply, jax.ShapeDtypeStruct(x_shape, jnp.float32))


def test_full_size_brain_model_shapes_and_parameter_count():
    """(64, 128, 128) channels on a 192^3 brain volume: the 48^3 x 3 latent of seed 03."""
    model = AutoencoderKL(in_channels=1, out_channels=1, channels=(64, 128, 128),
                          latent_channels=3, num_res_blocks=2)
    params, (recon, mu, sigma) = _abstract_forward(model, (1, 192, 192, 192, 1))
    assert mu.shape == sigma.shape == (1, 48, 48, 48, 3)
    assert recon.shape == (1, 192, 192, 192, 1)
    assert model.downsampling_factor == 4
    assert _n_params(params) == reference_autoencoderkl_params(
        1, 1, (64, 128, 128), 3, 2, (False,) * 3, nd=3)


def test_2d_model_with_attention_shapes_and_parameter_count():
    model = AutoencoderKL(in_channels=2, out_channels=1, channels=(8, 16), latent_channels=4,
                          num_res_blocks=1, norm_num_groups=4, attention_levels=(False, True),
                          with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True)
    params, (recon, mu, _) = _abstract_forward(model, (3, 12, 20, 2))
    assert mu.shape == (3, 6, 10, 4) and recon.shape == (3, 12, 20, 1)
    assert _n_params(params) == reference_autoencoderkl_params(
        2, 1, (8, 16), 4, 1, (False, True), nd=2, enc_nonlocal=True, dec_nonlocal=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        _abstract_forward(AutoencoderKL(channels=(8, 12), norm_num_groups=8,
                                        attention_levels=(False, False)), (1, 8, 8, 1))
    with pytest.raises(ConfigError, match="divisible by 4"):
        _abstract_forward(AutoencoderKL(**TINY), (1, 16, 16, 18, 1))
    with pytest.raises(ConfigError, match="attention_levels"):
        _abstract_forward(AutoencoderKL(**TINY, attention_levels=(False,)), TINY_SHAPE)


# --------------------------------------------------------- a real tiny 3D model

def _loss(model, params, x, rng):
    recon, mu, sigma = model.apply(params, x, rng)
    return jnp.mean(jnp.abs(recon - x)) + 1e-6 * kl_loss(mu, sigma), (recon, mu, sigma)


def _numpy_params(model, x, seed=0):
    """PyTorch-default-like parameters drawn with numpy in the shapes model.init gives
    (U(+-1/sqrt(fan_in)) weights and biases, GroupNorm scale 1 and bias 0), sparing the
    compilation of init; torch_default_init itself is tested below."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: model.init(KEY, x, KEY), x)

    def draw(path, leaf):
        names = [getattr(k, "key", "") for k in path]
        if any("norm" in n for n in names):
            return jnp.full(leaf.shape, 1.0 if names[-1] == "scale" else 0.0, jnp.float32)
        kernel_shape = _leaf_at(abstract, path[:-1])["kernel"].shape
        bound = 1 / math.sqrt(math.prod(kernel_shape[:-1]))
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def _leaf_at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its parameters, an input, and ONE jitted value-and-grad function
    (returning the forward outputs too) that every test below reuses: one compilation.

    One ResBlock per level and XLA's native convolution keep that compilation near
    10 s on a loaded 2-core CPU (the cpu_fast lowering, tested in test_conv_lowering,
    takes three times as long to compile the same graph).
    """
    model = AutoencoderKL(**TINY, num_res_blocks=1, conv_impl="xla")
    x = jnp.asarray(np.random.default_rng(0).normal(size=TINY_SHAPE), jnp.float32)
    params = _numpy_params(model, x)
    step = jax.jit(jax.value_and_grad(lambda p, x, r: _loss(model, p, x, r), has_aux=True))
    return model, params, x, step


def test_tiny_forward_shapes_gradients_and_determinism(tiny):
    model, params, x, step = tiny
    (loss, (recon, mu, sigma)), grads = step(params, x, jax.random.key(1))
    assert recon.shape == TINY_SHAPE and mu.shape == sigma.shape == (1, 4, 4, 4, 3)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # Every parameter is used: each leaf gets a gradient somewhere.
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)

    # Same key, same draw; another key, another z (so another reconstruction).
    (_, (recon_again, _, _)), _ = step(params, x, jax.random.key(1))
    (_, (recon_other, mu_other, _)), _ = step(params, x, jax.random.key(2))
    np.testing.assert_array_equal(recon_again, recon)
    np.testing.assert_array_equal(mu_other, mu)
    assert not np.allclose(recon_other, recon)


def test_torch_default_init_bounds():
    init = torch_default_init(fan_in=27)
    w = np.asarray(init(KEY, (3, 3, 3, 4, 64)))
    bound = 1 / math.sqrt(27)
    assert w.shape == (3, 3, 3, 4, 64) and np.abs(w).max() <= bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b) has std b/sqrt(3)


def test_reparameterisation_draw():
    mu = jnp.arange(24.0).reshape(1, 2, 2, 2, 3)
    sigma = jnp.full_like(mu, 0.5)
    eps = jax.random.normal(jax.random.key(7), (24,))
    np.testing.assert_allclose(sample_latent(mu, sigma, jax.random.key(7)),
                               mu + 0.5 * eps.reshape(mu.shape), rtol=1e-6)


@pytest.mark.parametrize("bias,log_var", [(1e4, 20.0), (-1e4, -30.0)])
def test_log_variance_is_clamped(tiny, bias, log_var):
    model, params, x, step = tiny
    forced = jax.tree_util.tree_map_with_path(
        lambda path, p: (jnp.full_like(p, bias) if "quant_conv_log_sigma" in str(path)
                         and "bias" in str(path) else p), params)
    (_, (_, _, sigma)), grads = step(forced, x, jax.random.key(1))
    np.testing.assert_allclose(sigma, math.exp(log_var / 2), rtol=1e-5)
    # Clamped: no gradient flows back into the log-sigma head.
    g = grads["params"]["quant_conv_log_sigma"]
    assert float(jnp.max(jnp.abs(g["bias"]))) == 0.0


def test_kl_loss_matches_numpy_formula():
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(3, 4, 5, 2))
    sigma = np.exp(rng.normal(size=(3, 4, 5, 2)) * 0.5)
    per_sample = 0.5 * np.sum(mu ** 2 + sigma ** 2 - np.log(sigma ** 2) - 1, axis=(1, 2, 3))
    np.testing.assert_allclose(kl_loss(jnp.asarray(mu, jnp.float32),
                                       jnp.asarray(sigma, jnp.float32)),
                               per_sample.mean(), rtol=1e-5)
    assert float(kl_loss(jnp.zeros((2, 3, 3)), jnp.ones((2, 3, 3)))) == 0.0


# ------------------------------------------------------------- building blocks

def test_upsample_nearest_repeats_each_voxel():
    x = jnp.arange(8.0).reshape(1, 2, 2, 2, 1)
    ref = np.asarray(x)[0, ..., 0].repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(upsample_nearest(x)[0, ..., 0], ref)


def test_attention_block_matches_numpy():
    """GroupNorm -> single-head softmax(q k^T / sqrt(C)) v -> projection, + input."""
    c, groups, eps = 8, 2, 1e-6
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 5, c)), jnp.float32)
    block = AttentionBlock(norm_num_groups=groups, norm_eps=eps)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, jnp.float32),
                          jax.eval_shape(block.init, KEY, x)["params"])
    got = jax.jit(block.apply)({"params": params}, x)

    xn = np.asarray(x, np.float64).reshape(2, 15, groups, c // groups)
    xn = (xn - xn.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
        xn.var(axis=(1, 3), keepdims=True) + eps)
    h = (xn.reshape(2, 15, c) * np.asarray(params["norm"]["scale"])
         + np.asarray(params["norm"]["bias"]))

    def dense(name, v):
        return v @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"])
    q, k, v = dense("to_q", h), dense("to_k", h), dense("to_v", h)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(c)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    ref = np.asarray(x, np.float64) + dense("proj_attn", weights @ v).reshape(x.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------- encoder and decoder against float64 numpy (2D)

def _np_conv(x, p, stride=1, pad=None):
    """``x (B, C, H, W)``, our kernel ``(k, k, I, O)``; "same" padding unless ``pad`` =
    ``((top, bottom), (left, right))``."""
    from test_resnet_generator import _conv
    w = np.asarray(p["kernel"], np.float64).transpose(3, 2, 0, 1)
    k = w.shape[-1]
    pad = ((k // 2,) * 2,) * 2 if pad is None else pad
    x = np.pad(x, ((0, 0), (0, 0)) + tuple(pad))
    return _conv(x, w, np.asarray(p["bias"], np.float64), stride, 0)


def _np_group_norm(x, p, groups, eps=1e-6):
    b, c, h, w = x.shape
    g = x.reshape(b, groups, c // groups, h, w)
    g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(
        g.var(axis=(2, 3, 4), keepdims=True) + eps)
    return (g.reshape(x.shape) * np.asarray(p["scale"], np.float64)[None, :, None, None]
            + np.asarray(p["bias"], np.float64)[None, :, None, None])


def _np_silu(x):
    return x / (1 + np.exp(-x))


def _np_res(x, p, groups):
    h = _np_conv(_np_silu(_np_group_norm(x, p["norm1"], groups)), p["conv1"])
    h = _np_conv(_np_silu(_np_group_norm(h, p["norm2"], groups)), p["conv2"])
    return (_np_conv(x, p["nin_shortcut"]) if "nin_shortcut" in p else x) + h


def numpy_encoder(p, x_nhwc, levels, groups):
    """MONAI's Encoder, one ResBlock per level, no attention."""
    h = _np_conv(np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2), p["conv_in"])
    for i in range(levels):
        h = _np_res(h, p[f"down_{i}_res_0"], groups)
        if i != levels - 1:  # asymmetric (0, 1) zero pad, stride-2 conv3
            h = _np_conv(h, p[f"down_{i}_downsample"], 2, ((0, 1), (0, 1)))
    h = _np_conv(_np_group_norm(h, p["norm_out"], groups), p["conv_out"])
    return h.transpose(0, 2, 3, 1)


def numpy_decoder(p, z_nhwc, levels, groups):
    h = _np_conv(np.asarray(z_nhwc, np.float64).transpose(0, 3, 1, 2), p["conv_in"])
    for level in reversed(range(levels)):
        h = _np_res(h, p[f"up_{level}_res_0"], groups)
        if level != 0:  # nearest x2 then conv3
            h = _np_conv(h.repeat(2, axis=2).repeat(2, axis=3), p[f"up_{level}_upsample"])
    h = _np_conv(_np_group_norm(h, p["norm_out"], groups), p["conv_out"])
    return h.transpose(0, 2, 3, 1)


def test_encoder_and_decoder_match_numpy_reference():
    from sct_jax.models.autoencoder import Decoder, Encoder
    kw = dict(channels=(4, 8), latent_channels=2, num_res_blocks=(1, 1), norm_num_groups=2,
              attention_levels=(False, False))
    encoder, decoder = Encoder(**kw), Decoder(out_channels=1, **kw)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 4, 4, 2)), jnp.float32)

    def draw(path, leaf):  # N(0, 0.3^2); GroupNorm scales around 1
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(offset + 0.3 * rng.normal(size=leaf.shape), jnp.float32)

    params = [jax.tree_util.tree_map_with_path(draw, jax.eval_shape(m.init, KEY, v)["params"])
              for m, v in ((encoder, x), (decoder, z))]
    latent, image = jax.jit(lambda pe, pd: (encoder.apply({"params": pe}, x),
                                            decoder.apply({"params": pd}, z)))(*params)
    enc_ref = numpy_encoder(jax.device_get(params[0]), np.asarray(x), 2, 2)
    dec_ref = numpy_decoder(jax.device_get(params[1]), np.asarray(z), 2, 2)
    assert latent.shape == enc_ref.shape == (2, 4, 4, 2)
    assert image.shape == dec_ref.shape == (2, 8, 8, 1)
    for out, ref in ((latent, enc_ref), (image, dec_ref)):
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())


def test_init_log_variance_sets_the_log_sigma_bias_through_the_config():
    """``model.ae.init_log_variance`` reaches the log-variance conv's bias (and only it):
    the ``small`` config starts the posterior at sigma ~ exp(-4), not ~1."""
    from sct_jax.config_utils import load_config_file
    from sct_jax.methods import _ldm_common as common

    config = load_config_file("configs/ldm_brain.py:autoencoder,small")
    assert config.model.ae.init_log_variance == -8.0
    shape = jax.ShapeDtypeStruct((1, 8, 8, 8, 1), jnp.float32)
    params = common.build_autoencoder(config).init(KEY, jnp.zeros(shape.shape), KEY)["params"]
    np.testing.assert_array_equal(params["quant_conv_log_sigma"]["bias"], -8.0)
    # The reference's init (None): PyTorch's U(-b, b) bias, the other convs unchanged.
    config.model.ae.init_log_variance = None
    ref = common.build_autoencoder(config).init(KEY, jnp.zeros(shape.shape), KEY)["params"]
    bound = 1 / math.sqrt(config.model.ae.latent_channels)
    assert np.abs(np.asarray(ref["quant_conv_log_sigma"]["bias"])).max() <= bound
    np.testing.assert_array_equal(ref["quant_conv_mu"]["bias"], params["quant_conv_mu"]["bias"])
