"""Generator decoder upsampling (transpose | resize) and the body-masked L1."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.losses import pixel
from sct_jax.models.layers import UPSAMPLE_KINDS
from sct_jax.models.resnet_generator import ResnetGenerator
from sct_jax.models.unet import UNetGenerator

REPO = Path(__file__).resolve().parents[1]
GENERATOR_CONFIGS = ("pix2pix_pelvis.py:tiny", "pix2pix3d_pelvis.py:tiny", "pgan_pelvis.py:tiny",
                     "ctx_pgan_pelvis.py:tiny", "cyclegan_pelvis.py:tiny")


@pytest.mark.parametrize("name", GENERATOR_CONFIGS)
@pytest.mark.parametrize("kind", UPSAMPLE_KINDS)
def test_every_generator_config_keeps_its_output_shape(name, kind):
    """The method's own generator, shapes only (``jax.eval_shape``): no compilation."""
    from sct_jax.methods import _pgan_common, common, cyclegan, pix2pix

    config = load_config_file(f"{REPO / 'configs' / name}")
    config.model.gen.upsample = kind
    common.check_generator_options(config)
    size = tuple(config.data.patch if config.data.mode == "patches" else config.data.crop)
    channels = 2 * int(config.data.get("context", 0)) + 1
    x = jnp.zeros((1, *size, channels))
    gen = {"pix2pix": lambda: pix2pix.build_models(config)[0],
           "cyclegan": lambda: cyclegan.build_generator(config, 1)}.get(
               config.method, lambda: _pgan_common.build_generator(config))()
    assert gen.upsample == kind
    variables = jax.eval_shape(
        lambda: gen.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                         train=False))
    out = jax.eval_shape(lambda v: gen.apply(v, x, train=False), variables)
    assert out.shape == (1, *size, 1)
    kernel = variables["params"]["up_conv_1"]["kernel"]
    # transpose: k4 (U-Net) or k3 (ResNet) with C_in -> C_out; resize: always a 3^d conv.
    if kind == "resize":
        assert kernel.shape[:len(size)] == (3,) * len(size)


def test_resize_decoder_has_no_checkerboard_from_a_constant():
    """Odena et al.: a transposed convolution with kernel 4, stride 2 maps a constant
    input to a periodic output (each output voxel sums a different number of taps at
    the borders of every 2x2 cell only when kernels differ; with random kernels the
    cells differ); nearest x2 + conv maps a constant to a constant away from the edges."""
    from sct_jax.models.layers import upsample2x
    import flax.linen as nn

    class One(nn.Module):
        kind: str

        @nn.compact
        def __call__(self, x):
            return upsample2x(x, 1, kind=self.kind, name="up", kernel_size=4, padding=1)

    x = jnp.ones((1, 8, 8, 3))
    for kind, periodic in (("transpose", True), ("resize", False)):
        module = One(kind)
        params = module.init(jax.random.key(0), x)
        y = np.asarray(module.apply(params, x))[0, 2:-2, 2:-2, 0]
        cell_spread = np.ptp(y)
        assert (cell_spread > 1e-4) == periodic, (kind, cell_spread)


def test_unknown_upsample_is_a_config_error():
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    config.model.gen.upsample = "bilinear"
    with pytest.raises(ConfigError, match="model.gen.upsample='bilinear'"):
        methods.get_method("pix2pix").validate_config(config)
    config = load_config_file(f"{REPO / 'configs/pgan_pelvis.py'}:tiny")
    config.model.gen.upsample = "bilinear"
    with pytest.raises(ConfigError, match="model.gen.upsample"):
        methods.get_method("pgan").validate_config(config)


def test_masked_l1_is_the_mean_inside_the_mask_against_numpy():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 6, 5, 1)).astype(np.float32)
    target = rng.normal(size=(2, 6, 5, 1)).astype(np.float32)
    mask = (rng.random((2, 6, 5, 1)) > 0.4).astype(np.float32)
    expected = np.abs(pred.astype(np.float64) - target)[mask > 0].mean()
    assert float(pixel.masked_l1(pred, target, mask)) == pytest.approx(expected, rel=1e-6)
    # Nothing outside the mask moves the loss: its gradient there is zero.
    grad = np.asarray(jax.grad(lambda p: pixel.masked_l1(p, target, mask))(jnp.asarray(pred)))
    assert np.all(grad[mask == 0] == 0) and np.all(grad[mask > 0] != 0)
    # An empty mask: zero, not NaN.
    assert float(pixel.masked_l1(pred, target, np.zeros_like(mask))) == 0.0


def test_pix2pix_step_uses_the_body_masked_l1():
    """The step's g_l1 is the masked mean when loss.body_mask, the plain mean otherwise."""
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    method = methods.get_method("pix2pix")
    rng = np.random.default_rng(1)
    shape = (2, *config.data.crop, 1)
    batch = {"mr": rng.uniform(-1, 1, shape).astype(np.float32),
             "ct": rng.uniform(-1, 1, shape).astype(np.float32),
             "mask": np.zeros(shape, np.float32)}
    batch["mask"][:, 8:24, 8:24] = 1.0
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    results = {}
    for masked, margin in ((False, 0), (True, 0), (True, 2), (True, 8)):
        config.loss.body_mask, config.loss.body_mask_margin = masked, margin
        state = method.create_state(config, jax.random.key(0), spec)
        _, metrics = method.train_step(config, state, batch, jax.random.key(2))
        results[masked, margin] = float(metrics["g_l1"])
    # The same weights and dropout draw each time: the masked mean sees the mask's
    # quarter of the crop, the margin grows it, and grown by 8 it covers the 32 x 32 crop.
    assert results[True, 0] != pytest.approx(results[False, 0], rel=1e-3)
    assert results[True, 2] != pytest.approx(results[True, 0], rel=1e-3)
    assert results[True, 8] == pytest.approx(results[False, 0], rel=1e-6)


def test_grow_mask_is_a_box_dilation_against_scipy():
    from scipy import ndimage
    from sct_jax.methods.common import grow_mask
    rng = np.random.default_rng(4)
    for shape in ((2, 17, 13, 1), (1, 9, 11, 7, 1)):
        mask = (rng.random(shape) > 0.93).astype(np.float32)
        structure = np.ones((1,) + (5,) * (len(shape) - 2) + (1,))
        expected = ndimage.binary_dilation(mask > 0, structure=structure)
        np.testing.assert_array_equal(np.asarray(grow_mask(jnp.asarray(mask), 2)) > 0, expected)
    assert grow_mask(jnp.asarray(mask), 0) is not None


def test_methods_that_cannot_mask_their_l1_refuse_it():
    for name in ("reg_pgan_pelvis.py:tiny", "meta_pgan_pelvis.py:tiny"):
        config = load_config_file(f"{REPO / 'configs' / name}")
        config.loss.body_mask = True
        with pytest.raises(ConfigError, match="config.loss.body_mask=True"):
            methods.get_method(config.method).validate_config(config)


def test_prediction_of_a_body_masked_model_is_air_outside_the_mask():
    from sct_jax.data.io import Volume
    from sct_jax.inference import predict as predict_lib

    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    mr = Volume(np.random.default_rng(0).uniform(0, 100, (12, 10, 4)).astype(np.float32),
                np.eye(4))
    mask = np.zeros(mr.shape, np.uint8)
    mask[3:9, 2:8] = 1

    def stand_in(volume):  # a model that says 0.1 (about 390 HU) everywhere
        return np.full(volume.shape, 0.1, np.float32)

    config.loss.body_mask = False
    plain = predict_lib.predict_mr(stand_in, config, mr, mask)
    config.loss.body_mask, config.loss.body_mask_margin = True, 0
    masked = predict_lib.predict_mr(stand_in, config, mr, mask)
    np.testing.assert_array_equal(masked[mask > 0], plain[mask > 0])
    assert np.all(masked[mask == 0] == predict_lib.AIR_HU)
    assert np.all(plain[mask == 0] > 0)
    # With a margin the model's values stand one more voxel around the mask, in-plane
    # only for a slice model (mask rows 3..8, columns 2..7 -> 2..9, 1..8).
    config.loss.body_mask_margin = 1
    grown = predict_lib.predict_mr(stand_in, config, mr, mask)
    inside = np.zeros(mr.shape, bool)
    inside[2:10, 1:9] = True
    np.testing.assert_array_equal(grown[inside], plain[inside])
    assert np.all(grown[~inside] == predict_lib.AIR_HU)


def test_runs_saved_before_the_options_resume_and_keep_their_cache_digest():
    from sct_jax.reproduce.ablate import config_digest
    from sct_jax.runs import lock as run_dir

    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    # A config at the values runs had before the options existed.
    config.model.gen.upsample, config.loss.body_mask = "transpose", False
    saved = json.loads(config.to_json_best_effort())
    del saved["model"]["gen"]["upsample"], saved["loss"]["body_mask"]
    assert run_dir.changed_resume_keys(saved, config) == []
    digest = config_digest(config)
    older = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:tiny")
    with older.unlocked():
        del older.model.gen["upsample"], older.loss["body_mask"]
    assert config_digest(older) == digest
    config.model.gen.upsample = "resize"
    assert run_dir.changed_resume_keys(saved, config) == ["model.gen.upsample"]
    assert config_digest(config) != digest
    # A config without a generator (the LDM) is not asked for model.gen.upsample.
    ldm = load_config_file(f"{REPO / 'configs/ldm_brain.py'}:tiny")
    assert run_dir.changed_resume_keys(json.loads(ldm.to_json_best_effort()), ldm) == []
