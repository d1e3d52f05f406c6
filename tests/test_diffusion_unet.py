"""Diffusion UNet and ControlNet: shapes, zero initialisation, the ControlNet's identity at
start, copying the UNet's weights, the time embedding and attention against float64 numpy,
and parameter counts against MONAI's constructor arithmetic."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.errors import ConfigError
from sct_jax.models.controlnet import (ControlNet, controlnet_params_from_unet,
                                       embed_conditioning)
from sct_jax.models import diffusion_blocks
from sct_jax.models.diffusion_blocks import AttentionBlock, timestep_embedding, torch_default_init
from sct_jax.models.diffusion_unet import DiffusionUNet

KEY = jax.random.key(0)
TINY = dict(channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1,
            num_head_channels=8, norm_num_groups=4)
LATENT = (2, 8, 8, 8, 3)        # (B, D, H, W, C); 3 levels need sizes divisible by 4
COND = (2, 16, 16, 16, 1)       # the MR at twice the latent size
COND_CHANNELS = (4, 8)          # one stride-2 stage: factor 2


def _n_params(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _random_like(tree, seed, scale=0.2, only=None):
    """numpy N(0, scale^2) draws in the shapes of ``tree`` (GroupNorm scales 1 + draw);
    ``only`` restricts the draws to top-level keys starting with it (the rest kept)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if only is not None and not path[0].key.startswith(only):
            return leaf
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(offset + scale * rng.normal(size=leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, tree)


def _cheap_init(fan_in):
    """Deterministic stand-in for :func:`torch_default_init` (same bound, no key).

    XLA:CPU compiles every parameter's random draw separately (about a second each on
    this loaded 2-core machine, a minute for these models); this one compiles in no
    time. The zero-initialised layers are the model's own either way.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        i = jnp.arange(math.prod(shape), dtype=jnp.float32)
        return (bound * jnp.sin(12.9898 * i + 78.233 + fan_in)).reshape(shape).astype(dtype)
    return init


@pytest.fixture(scope="module")
def models():
    unet = DiffusionUNet(out_channels=3, **TINY)
    controlnet = ControlNet(conditioning_embedding_num_channels=COND_CHANNELS, **TINY)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=LATENT), jnp.float32)
    cond = jnp.asarray(rng.normal(size=COND), jnp.float32)
    t = jnp.array([3, 700])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusion_blocks, "torch_default_init", _cheap_init)
        unet_params, cn_params = jax.jit(lambda x, t, cond: (
            unet.init(KEY, x, t)["params"],
            controlnet.init(jax.random.key(1), x, t, cond)["params"]))(x, t, cond)

    @jax.jit
    def plain_and_controlled(unet_params, cn_params, x, t, cond):
        down, mid = controlnet.apply({"params": cn_params}, x, t, cond)
        plain = unet.apply({"params": unet_params}, x, t)
        controlled = unet.apply({"params": unet_params}, x, t, down, mid)
        return plain, controlled, down, mid

    return dict(unet=unet, controlnet=controlnet, x=x, t=t, cond=cond,
                unet_params=unet_params, cn_params=cn_params, run=plain_and_controlled)


# ------------------------------------------------------------------ time embedding

@pytest.mark.parametrize("dim", [8, 9])
def test_time_embedding_matches_float64_formula(dim):
    t = np.array([0, 1, 17, 999])
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    args = t[:, None].astype(np.float64) * freqs[None]
    want = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((4, 1))] if dim % 2 else []),
                          axis=1)
    got = np.asarray(timestep_embedding(jnp.asarray(t), dim))
    assert got.shape == (4, dim)
    # float32 arguments up to 999 rad: ~1e-4 absolute error in cos/sin.
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_torch_default_init_is_uniform_within_one_over_sqrt_fan_in():
    fan_in = 3 ** 3 * 8
    w = np.asarray(jax.jit(lambda k: torch_default_init(fan_in)(k, (3, 3, 3, 8, 16)))(KEY))
    bound = 1 / math.sqrt(fan_in)
    assert w.shape == (3, 3, 3, 8, 16) and np.abs(w).max() <= bound
    # U(-b, b): mean 0, std b / sqrt(3); 3456 draws -> ~2% standard error on the std.
    assert abs(w.mean()) < 0.05 * bound
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.06
    assert np.abs(w).max() > 0.99 * bound


# ----------------------------------------------------------------------- attention

def _group_norm64(x, groups, eps, scale, bias):
    b, n, c = x.shape
    g = x.reshape(b, n, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, n, c) * scale + bias


def test_attention_block_matches_float64_numpy():
    block = AttentionBlock(num_head_channels=4, norm_num_groups=2)   # 2 heads of 4
    x = np.random.default_rng(2).normal(size=(2, 2, 3, 2, 8))
    params = _random_like(jax.eval_shape(block.init, KEY, jnp.zeros(x.shape))["params"], 3,
                          scale=0.5)
    got = np.asarray(jax.jit(block.apply)({"params": params}, jnp.asarray(x, jnp.float32)))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = _group_norm64(x.reshape(2, 12, 8), 2, 1e-6, p["norm"]["scale"], p["norm"]["bias"])
    q, k, v = (h @ p[f"to_{n}"]["kernel"] + p[f"to_{n}"]["bias"] for n in "qkv")
    heads = []
    for i in range(2):          # head i owns channels 4i..4i+3, as MONAI's reshape
        sl = slice(4 * i, 4 * i + 4)
        scores = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / np.sqrt(4)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v[..., sl])
    o = np.concatenate(heads, -1) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
    np.testing.assert_allclose(got, x + o.reshape(x.shape), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ UNet and ControlNet

def test_fresh_unet_outputs_zero_with_the_input_shape(models):
    m = models
    plain, controlled, down, mid = m["run"](m["unet_params"], m["cn_params"], m["x"], m["t"],
                                            m["cond"])
    assert plain.shape == LATENT
    assert not np.any(np.asarray(plain)) and not np.any(np.asarray(controlled))
    # One residual per UNet skip: conv_in, 3 res blocks, 2 downsamplings.
    assert [d.shape for d in down] == [(2, 8, 8, 8, 8)] * 2 + [(2, 4, 4, 4, 8),
                                       (2, 4, 4, 4, 16), (2, 2, 2, 2, 16), (2, 2, 2, 2, 16)]
    assert mid.shape == (2, 2, 2, 2, 16)


def test_unet_keeps_the_input_shape_in_2d():
    unet = DiffusionUNet(out_channels=2, **TINY)
    x = jax.ShapeDtypeStruct((2, 8, 12, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    out = jax.eval_shape(lambda x, t: unet.apply(unet.init(KEY, x, t), x, t), x, t)
    assert out.shape == (2, 8, 12, 2)


def test_fresh_controlnet_leaves_the_unet_unchanged_until_trained(models):
    m = models
    unet_params = _random_like(m["unet_params"], 5)          # a "trained" UNet
    plain, controlled, down, mid = m["run"](unet_params, m["cn_params"], m["x"], m["t"],
                                            m["cond"])
    assert plain.shape == LATENT and np.all(np.isfinite(np.asarray(plain)))
    assert np.std(np.asarray(plain)) > 1e-3
    np.testing.assert_array_equal(np.asarray(controlled), np.asarray(plain))

    # Train the zero convolutions a little: the control now changes the prediction.
    cn_params = _random_like(m["cn_params"], 6, only="controlnet_")
    plain2, controlled2, down2, mid2 = m["run"](unet_params, cn_params, m["x"], m["t"],
                                                m["cond"])
    np.testing.assert_array_equal(np.asarray(plain2), np.asarray(plain))
    assert np.max(np.abs(np.asarray(controlled2) - np.asarray(plain2))) > 1e-3
    assert all(np.any(np.asarray(d)) for d in down2) and np.any(np.asarray(mid2))


def test_controlnet_residuals_are_added_to_the_skips(models):
    """A ControlNet copied from the UNet with -identity output convs returns minus the
    UNet's own skips and middle output; added (as MONAI adds them) they cancel, so the
    decoder sees zeros only and the prediction no longer depends on the latent. A
    subtracted residual would double them instead."""
    m = models
    unet_params = _random_like(m["unet_params"], 9)
    # The fresh conditioning embedding ends in a zero conv: the copy sees the UNet's input.
    cn_params = controlnet_params_from_unet(unet_params, m["cn_params"])

    def minus_identity(path, leaf):
        if not path[0].key.startswith("controlnet_"):
            return leaf
        if path[-1].key == "bias":
            return jnp.zeros_like(leaf)
        return -jnp.eye(leaf.shape[-1], dtype=leaf.dtype).reshape(leaf.shape)

    cn_params = jax.tree_util.tree_map_with_path(minus_identity, cn_params)
    other_x = jnp.asarray(np.random.default_rng(2).normal(size=LATENT), jnp.float32)
    plain_a, controlled_a, down, mid = m["run"](unet_params, cn_params, m["x"], m["t"],
                                                m["cond"])
    plain_b, controlled_b, _, _ = m["run"](unet_params, cn_params, other_x, m["t"], m["cond"])
    assert np.abs(np.asarray(plain_a) - np.asarray(plain_b)).max() > 1e-2
    assert all(np.abs(np.asarray(d)).max() > 1e-2 for d in down)
    np.testing.assert_allclose(np.asarray(controlled_a), np.asarray(controlled_b), atol=1e-5)


def test_precomputed_conditioning_embedding_gives_the_same_residuals(models):
    m = models
    # Non-zero embedding and zero convs, so that the check sees the conditioning path.
    cn_params = _random_like(m["cn_params"], 7, only="c")
    _, _, down, mid = m["run"](m["unet_params"], cn_params, m["x"], m["t"], m["cond"])
    emb = jax.jit(embed_conditioning, static_argnums=0)(m["controlnet"], cn_params, m["cond"])
    assert emb.shape == (2, 8, 8, 8, 8)
    apply = jax.jit(m["controlnet"].apply, static_argnames="cond_is_embedded")
    cached = apply({"params": cn_params}, m["x"], m["t"], emb, cond_is_embedded=True)
    for a, b in zip(jax.tree.leaves((down, mid)), jax.tree.leaves(cached)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_controlnet_params_from_unet_copies_the_shared_submodules(models):
    m = models
    unet_params = _random_like(m["unet_params"], 8)
    cn_params = m["cn_params"]
    before = jax.tree.map(np.asarray, cn_params)
    merged = controlnet_params_from_unet(unet_params, cn_params)
    assert jax.tree.structure(merged) == jax.tree.structure(cn_params)
    shared = ["conv_in", "down_0", "down_1", "down_2", "middle", "time_embed"]
    assert sorted(k for k in merged if k in unet_params) == shared
    for key in shared:
        jax.tree.map(np.testing.assert_array_equal, merged[key], unet_params[key])
    for key in merged:
        if key not in shared:
            jax.tree.map(np.testing.assert_array_equal, merged[key], cn_params[key])
    jax.tree.map(np.testing.assert_array_equal, cn_params, before)   # input untouched
    wrapped = controlnet_params_from_unet({"params": unet_params}, {"params": cn_params})
    assert set(wrapped) == {"params"}

    other = DiffusionUNet(out_channels=3, **{**TINY, "channels": (8, 16, 24)})
    other_params = jax.eval_shape(other.init, KEY, m["x"], m["t"])["params"]
    with pytest.raises(ConfigError, match="differ"):
        controlnet_params_from_unet(other_params, cn_params)


# --------------------------------------------- parameter counts (MONAI's arithmetic)

def monai_unet_params(in_ch, out_ch, channels, attention_levels, num_res_blocks, nd=3,
                      resblock_updown=False, out_proj=True):
    """Parameters of MONAI's DiffusionModelUNet, walking its constructor's channel
    arithmetic (explicit up-block input channels, not the concatenations)."""
    conv = lambda k, i, o: k ** nd * i * o + o                       # noqa: E731
    linear = lambda i, o: i * o + o                                  # noqa: E731
    temb = 4 * channels[0]

    def res(i, o):
        return 2 * i + conv(3, i, o) + linear(temb, o) + 2 * o + conv(3, o, o) + (
            conv(1, i, o) if i != o else 0)

    def attn(c):
        return 2 * c + 3 * linear(c, c) + (linear(c, c) if out_proj else 0)

    nrb = [num_res_blocks] * len(channels) if isinstance(num_res_blocks, int) else num_res_blocks
    total = linear(channels[0], temb) + linear(temb, temb) + conv(3, in_ch, channels[0])
    out_c = channels[0]
    for i, c in enumerate(channels):
        in_c, out_c = out_c, c
        for j in range(nrb[i]):
            total += res(in_c if j == 0 else c, c) + (attn(c) if attention_levels[i] else 0)
        if i < len(channels) - 1:
            total += res(c, c) if resblock_updown else conv(3, c, c)
    total += 2 * res(channels[-1], channels[-1]) + attn(channels[-1])
    rev, rev_nrb, rev_attn = channels[::-1], nrb[::-1], attention_levels[::-1]
    out_c = rev[0]
    for i, c in enumerate(rev):
        prev, out_c = out_c, c
        in_c = rev[min(i + 1, len(channels) - 1)]
        n = rev_nrb[i] + 1
        for j in range(n):
            skip = in_c if j == n - 1 else c
            total += res((prev if j == 0 else c) + skip, c) + (attn(c) if rev_attn[i] else 0)
        if i < len(channels) - 1:
            total += res(c, c) if resblock_updown else conv(3, c, c)
    return total + 2 * channels[0] + conv(3, channels[0], out_ch)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(num_res_blocks=(2, 1, 3), attention_levels=(True, False, True)),
    dict(resblock_updown=True, attention_out_projection=False),
])
def test_unet_parameter_count_matches_monai(kwargs):
    cfg = {**TINY, **kwargs}
    unet = DiffusionUNet(out_channels=3, **cfg)
    params = jax.eval_shape(unet.init, KEY, jnp.zeros(LATENT), jnp.zeros(2))["params"]
    want = monai_unet_params(3, 3, cfg["channels"], cfg["attention_levels"],
                             cfg["num_res_blocks"],
                             resblock_updown=cfg.get("resblock_updown", False),
                             out_proj=cfg.get("attention_out_projection", True))
    assert _n_params(params) == want


def test_benchmark_size_shapes_and_counts():
    """The brain LDM: (32, 64, 64) channels, attention at 12^3, a 48^3 x 3 latent of a
    192^3 MR (two stride-2 stages in the conditioning embedding). Shapes only."""
    cfg = dict(channels=(32, 64, 64), attention_levels=(False, False, True),
               num_res_blocks=1, num_head_channels=32)
    unet = DiffusionUNet(out_channels=3, **cfg)
    controlnet = ControlNet(conditioning_embedding_num_channels=(16, 32, 96), **cfg)
    assert controlnet.downsampling_factor == 4
    x = jax.ShapeDtypeStruct((1, 48, 48, 48, 3), jnp.float32)
    mr = jax.ShapeDtypeStruct((1, 192, 192, 192, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)

    def forward(x, t, mr):
        cn_vars = controlnet.init(KEY, x, t, mr)
        unet_vars = unet.init(KEY, x, t)
        down, mid = controlnet.apply(cn_vars, x, t, mr)
        return unet.apply(unet_vars, x, t, down, mid), down, mid, unet_vars, cn_vars

    out, down, mid, unet_vars, cn_vars = jax.eval_shape(forward, x, t, mr)
    assert out.shape == (1, 48, 48, 48, 3)
    assert [d.shape[1:] for d in down] == [(48, 48, 48, 32)] * 2 + [
        (24, 24, 24, 32), (24, 24, 24, 64), (12, 12, 12, 64), (12, 12, 12, 64)]
    assert mid.shape == (1, 12, 12, 12, 64)
    assert _n_params(unet_vars) == monai_unet_params(3, 3, (32, 64, 64), (False, False, True), 1)
    # ControlNet = the UNet's encoder and middle + embedding + zero convs.
    shared = sum(_n_params(v) for k, v in unet_vars["params"].items()
                 if not k.startswith(("up_", "out_")))
    conv = lambda k, i, o: k ** 3 * i * o + o                        # noqa: E731
    embedding = (conv(3, 1, 16) + conv(3, 16, 16) + conv(3, 16, 32) + conv(3, 32, 32)
                 + conv(3, 32, 96) + conv(3, 96, 32))
    zero_convs = sum(conv(1, d.shape[-1], d.shape[-1]) for d in down) + conv(1, 64, 64)
    assert _n_params(cn_vars) == shared + embedding + zero_convs


# ------------------------------------------------------------------------- errors

def test_configuration_errors(models):
    m = models
    x, t = m["x"], m["t"]
    with pytest.raises(ConfigError, match="conditioning image must be"):
        jax.eval_shape(m["controlnet"].init, KEY, x, t, jnp.zeros((2, 32, 32, 32, 1)))
    with pytest.raises(ConfigError, match="conditioning_embedding_in_channels=1"):
        jax.eval_shape(m["controlnet"].init, KEY, x, t, jnp.zeros((2, 16, 16, 16, 2)))
    with pytest.raises(ConfigError, match="in_channels=3"):
        jax.eval_shape(m["unet"].init, KEY, jnp.zeros((2, 8, 8, 8, 4)), t)
    with pytest.raises(ConfigError, match="divisible by 4"):
        jax.eval_shape(m["unet"].init, KEY, jnp.zeros((1, 8, 8, 6, 3)), t[:1])
    with pytest.raises(ConfigError, match="multiple of model.norm_num_groups"):
        jax.eval_shape(DiffusionUNet(**{**TINY, "channels": (8, 16, 18)}).init, KEY, x, t)
    with pytest.raises(ConfigError, match="num_head_channels"):
        jax.eval_shape(DiffusionUNet(**{**TINY, "num_head_channels": 12}).init, KEY, x, t)
    with pytest.raises(ConfigError, match="attention_levels"):
        jax.eval_shape(DiffusionUNet(**{**TINY, "attention_levels": (True,)}).init, KEY, x, t)


def test_time_resblock_matches_float64_numpy():
    """GN-SiLU-[pool]-conv3, + Linear(SiLU(temb)), GN-SiLU-conv3, plus the (1x1) skip."""
    from test_autoencoder import _np_conv, _np_group_norm, _np_silu

    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    temb = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    blocks = {r: diffusion_blocks.ResBlock(8, norm_num_groups=2, resample=r)
              for r in ("none", "down")}
    params = {r: _random_like(jax.eval_shape(b.init, KEY, x, temb)["params"], 12, scale=0.3)
              for r, b in blocks.items()}
    out = jax.jit(lambda p: {r: b.apply({"params": p[r]}, x, temb)
                             for r, b in blocks.items()})(params)

    def pool(v):  # 2x2 average, (B, C, H, W)
        b, c, h, w = v.shape
        return v.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))

    for r in blocks:
        p = jax.device_get(params[r])
        xs = np.asarray(np.asarray(x), np.float64).transpose(0, 3, 1, 2)
        h = _np_silu(_np_group_norm(xs, p["norm1"], 2))
        if r == "down":
            xs, h = pool(xs), pool(h)
        h = _np_conv(h, p["conv1"])
        t = _np_silu(np.asarray(np.asarray(temb), np.float64)) @ np.asarray(p["time_emb_proj"]["kernel"], np.float64)
        h = h + (t + np.asarray(p["time_emb_proj"]["bias"], np.float64))[:, :, None, None]
        h = _np_conv(_np_silu(_np_group_norm(h, p["norm2"], 2)), p["conv2"])
        expected = (_np_conv(xs, p["skip"]) + h).transpose(0, 2, 3, 1)
        assert out[r].shape == expected.shape
        np.testing.assert_allclose(np.asarray(out[r]), expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max(), err_msg=r)
