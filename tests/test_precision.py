"""Mixed precision and rematerialisation of every model.

bfloat16 (``config.model.dtype``): each model's output under ``dtype=bfloat16`` stays
within a stated relative L2 tolerance of its float32 output on the same float32
parameters; every convolution and matmul of the bf16 program takes bf16 operands; the
outputs (hence the losses) are float32. A tiny bf16 pix2pix run keeps float32
parameters and optimizer state and its L1 falls.

Rematerialisation (``config.model.remat``): the same gradients as without it, and fewer
bytes saved by the forward pass for the backward (``jax.vjp``'s residuals).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.methods import pix2pix
from sct_jax.models.autoencoder import AutoencoderKL
from sct_jax.models.controlnet import ControlNet
from sct_jax.models.diffusion_unet import DiffusionUNet
from sct_jax.models.layers import REMAT_CHOICES, check_remat, compute_dtype
from sct_jax.models.patchgan import PatchDiscriminator
from sct_jax.models.registration import RegistrationNet
from sct_jax.models.resnet_generator import ResnetGenerator
from sct_jax.models.unet import UNetGenerator
from sct_jax.models.vgg import VGGFeatures

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); a dozen layers of
# rounded activations and weights stay well within 3% of float32 in relative L2. The
# measured errors were 0.4-1.6% (printed by the test).
BF16_RTOL = 3e-2
UNET3D = dict(channels=(8, 8), attention_levels=(False, True), num_res_blocks=1,
              num_head_channels=None, norm_num_groups=4, conv_impl="xla")


def _random_params(abstract, seed: int):
    """numpy draws in the shapes of ``abstract``: kernels N(0, 1/fan_in) (so activations
    keep their scale), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2). The zero-
    initialised output convs of the diffusion models get weights as well."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
            return jnp.asarray(std * rng.normal(size=leaf.shape), jnp.float32)
        offset = 1.0 if name == "scale" else 0.0
        return jnp.asarray(offset + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def _flat(out) -> jax.Array:
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(out)])


def _cases():
    """name -> (module class, kwargs, inputs, apply method or None)."""
    rng = np.random.default_rng(0)

    def u(*shape):
        return jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)

    def ae_encode_decode(m, x):
        mu, sigma = m.encode(x)
        return m.decode(mu), mu, sigma
    t = jnp.asarray([3, 500])
    return {
        "unet": (UNetGenerator, dict(ngf=8, num_downs=3, dropout_rate=0.0, conv_impl="xla"),
                 (u(2, 16, 16, 1),), dict(train=False), None),
        "patchgan": (PatchDiscriminator, dict(ndf=8, n_layers=2, conv_impl="xla"),
                     (u(2, 16, 16, 2),), {}, None),
        "resnet": (ResnetGenerator, dict(ngf=8, n_blocks=2, dropout_rate=0.0, conv_impl="xla"),
                   (u(2, 16, 16, 3),), dict(train=False), None),
        "registration": (RegistrationNet, dict(down_channels=(8, 16), up_channels=(16, 8),
                                               n_bottleneck_blocks=1, output_init_std=0.1,
                                               conv_impl="xla"),
                         (u(2, 16, 16, 1), u(2, 16, 16, 1)), {}, None),
        "vgg": (VGGFeatures, dict(arch="vgg16", layers=("relu1_2", "relu2_2"), conv_impl="xla"),
                (u(2, 16, 16, 1),), {}, None),
        "autoencoder": (AutoencoderKL, dict(channels=(8, 8), num_res_blocks=1, norm_num_groups=4,
                                            attention_levels=(False, True), conv_impl="xla"),
                        (u(2, 8, 8, 8, 1),), {}, ae_encode_decode),
        "diffusion_unet": (DiffusionUNet, UNET3D, (u(2, 4, 4, 4, 3), t), {}, None),
        "controlnet": (ControlNet, dict(UNET3D, conditioning_embedding_num_channels=(4, 8)),
                       (u(2, 4, 4, 4, 3), t, u(2, 8, 8, 8, 1)), {}, None),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_close_to_float32_and_convs_in_bf16(name):
    cls, kwargs, inputs, call_kw, method = CASES[name]
    f32, bf16 = cls(**kwargs), cls(**kwargs, dtype=jnp.bfloat16)
    apply_kw = dict(call_kw, **({"method": method} if method else {}))
    abstract = jax.eval_shape(lambda: f32.init(jax.random.key(0), *inputs, **apply_kw))
    params = _random_params(abstract["params"], seed=1)

    def both(params):
        return (f32.apply({"params": params}, *inputs, **apply_kw),
                bf16.apply({"params": params}, *inputs, **apply_kw))
    ref, low = jax.jit(both)(params)

    # Every convolution and matmul of the bf16 program multiplies bf16 operands.
    hlo = jax.jit(lambda p: bf16.apply({"params": p}, *inputs, **apply_kw)).lower(params)
    ops = [line for line in hlo.as_text().splitlines()
           if re.search(r"stablehlo\.(convolution|dot_general)", line)]
    assert ops, "no convolution or matmul found"
    not_bf16 = [op for op in ops if not re.search(r"\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\)", op)]
    assert not not_bf16, not_bf16[:3]
    # ... and the outputs the losses see are float32.
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(low)) or name == "controlnet"
    ref, low = _flat(ref).astype(jnp.float32), _flat(low).astype(jnp.float32)
    assert bool(jnp.all(jnp.isfinite(low)))
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    print(f"{name}: relative L2 error bf16 vs float32 = {rel:.2e}")
    assert 0 < rel < BF16_RTOL


def test_compute_dtype_and_remat_names():
    assert compute_dtype("bfloat16") == jnp.bfloat16
    assert compute_dtype(None) == jnp.float32
    with pytest.raises(ConfigError, match="model.dtype"):
        compute_dtype("float16")
    assert set(REMAT_CHOICES) >= {"none", "blocks", "dots_saveable"}
    for policy in REMAT_CHOICES[2:]:
        assert callable(getattr(jax.checkpoint_policies, policy))
    with pytest.raises(ConfigError, match="model.remat"):
        check_remat("everything")


def test_bf16_variant_word_of_every_config():
    import glob
    for path in sorted(glob.glob("configs/[!_]*.py")):  # _*.py: shared settings
        tiny = load_config_file(f"{path}:tiny")
        low = load_config_file(f"{path}:tiny,bf16")
        assert (tiny.model.dtype, low.model.dtype) == ("float32", "bfloat16"), path
        assert tiny.model.remat == "none", path
        # Nothing else changes.
        low.model.dtype = "float32"
        assert low.to_dict() == tiny.to_dict(), path


def test_bf16_pix2pix_training_float32_state_and_falling_l1():
    config = load_config_file("configs/pix2pix_pelvis.py:tiny,bf16")
    config.optim.lr = 2e-3
    config.optim.decay_start = 1.0  # constant learning rate over the 30 steps
    config.train.steps = 30
    rng = np.random.default_rng(0)
    h, w = config.data.crop
    mr = rng.uniform(-1, 1, (2, h, w, 1)).astype(np.float32)
    batch = {"mr": jnp.asarray(mr), "ct": jnp.asarray(0.5 * mr),
             "mask": jnp.ones((2, h, w, 1), jnp.float32)}
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    key = jax.random.key_data(jax.random.key(0))
    state = jax.jit(functools.partial(pix2pix.create_state, config, batch_spec=spec))(key)
    step = jax.jit(functools.partial(pix2pix.train_step, config))

    def run(state, _):
        state, metrics = step(state, batch, key)
        return state, metrics["g_l1"]
    state, l1 = jax.lax.scan(run, state, None, length=30)
    l1 = np.asarray(l1)
    print("bf16 pix2pix L1 per step:", np.round(l1, 4))
    assert np.all(np.isfinite(l1))
    assert l1[-3:].mean() < 0.8 * l1[:3].mean()
    for name in ("gen", "disc"):
        for leaf in jax.tree.leaves((state[name].params, state[name].opt_state)):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32, name


# ------------------------------------------------------------------ rematerialisation

REMAT_CASES = {
    # The residual blocks' dropout must draw the same mask when recomputed.
    "resnet": (ResnetGenerator, dict(ngf=4, n_blocks=2, dropout_rate=0.5, conv_impl="xla"),
               lambda u: (u(2, 16, 16, 3),), dict(train=True)),
    "registration": (RegistrationNet, dict(down_channels=(4, 8), up_channels=(8, 4),
                                           n_bottleneck_blocks=1, output_init_std=0.1,
                                           conv_impl="xla"),
                     lambda u: (u(2, 16, 16, 1), u(2, 16, 16, 1)), {}),
    "autoencoder": (AutoencoderKL, dict(channels=(8, 8), num_res_blocks=1, norm_num_groups=4,
                                        attention_levels=(False, True), conv_impl="xla"),
                    lambda u: (u(1, 8, 8, 8, 1), jax.random.key(3)), {}),
    "diffusion_unet": (DiffusionUNet, UNET3D, lambda u: (u(2, 4, 4, 4, 3), jnp.asarray([3, 500])),
                       {}),
    "controlnet": (ControlNet, dict(UNET3D, conditioning_embedding_num_channels=(4, 8)),
                   lambda u: (u(2, 4, 4, 4, 3), jnp.asarray([3, 500]), u(2, 8, 8, 8, 1)), {}),
}


def _remat_setup(name, remat):
    cls, kwargs, make_inputs, call_kw = REMAT_CASES[name]
    rng = np.random.default_rng(0)
    inputs = make_inputs(lambda *s: jnp.asarray(rng.uniform(-1, 1, s), jnp.float32))
    model = cls(**kwargs, remat=remat)
    rngs = {"dropout": jax.random.key(7)}
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **call_kw))
    params = _random_params(abstract["params"], seed=2)

    def loss(params):
        out = model.apply({"params": params}, *inputs, rngs=rngs, **call_kw)
        return sum(jnp.mean(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(out))
    return loss, params


def _residual_bytes(loss, params) -> int:
    """Bytes the forward pass keeps for the backward: the leaves of ``jax.vjp``'s
    closure (no compilation; XLA:CPU then re-fuses recomputation, so its
    ``memory_analysis`` shows no difference; see ``sct-bench remat_memory``)."""
    residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(math.prod(r.shape) * r.dtype.itemsize for r in jax.tree.leaves(residuals))


@pytest.mark.parametrize("name", sorted(REMAT_CASES))
def test_remat_saves_fewer_residuals(name):
    sizes = {remat: _residual_bytes(*_remat_setup(name, remat))
             for remat in ("none", "blocks", "dots_saveable")}
    print(name, sizes)
    assert sizes["blocks"] < sizes["none"]
    assert sizes["blocks"] <= sizes["dots_saveable"] < sizes["none"]


@pytest.mark.parametrize("name", ["resnet", "diffusion_unet"])
def test_remat_same_gradients(name):
    settings = ("none", "blocks", "dots_saveable")
    setups = [_remat_setup(name, remat) for remat in settings]
    params = setups[0][1]
    grads = jax.jit(lambda p: [jax.grad(loss)(p) for loss, _ in setups])(params)
    flat = [jax.tree.leaves(g) for g in grads]
    assert any(float(jnp.abs(g).max()) > 0 for g in flat[0])
    for other in flat[1:]:
        for a, b in zip(flat[0], other):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_pix2pix_refuses_remat():
    config = load_config_file("configs/pix2pix_pelvis.py:tiny")
    config.model.remat = "blocks"
    with pytest.raises(ConfigError, match="model.remat"):
        pix2pix.validate_config(config)
