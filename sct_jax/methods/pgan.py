"""pGAN (Dar et al. 2019) for 2.5D pelvis MR -> CT (seed 02's baseline).

ResNet generator on three neighbouring MR slices ``(B, H, W, 3)`` -> one CT slice,
conditional PatchGAN (instance norm) on ``concat(MR, CT)``, LSGAN,
``G = adv + 100 L1 + 100 L1(VGG-16 relu2_2 features)`` over the whole batch, Adam 2e-4
(beta1 0.5), constant then linear decay. D is updated first; G's adversarial term sees
the updated D; the generator runs forward once per step (see :mod:`._pgan_common`).

State: ``{"gen", "disc"}`` plus a frozen ``"vgg16"`` when ``loss.perceptual_weight > 0``
(weights from ``config.model.vgg16_weights``; a missing file fails in ``create_state``).
Batch: ``mr (B, H, W, 2c+1)``, ``ct (B, H, W, 1)`` in [-1, 1], ``mask (B, H, W, 1)``.
"""

from __future__ import annotations

import jax

from sct_jax.methods import Method
from sct_jax.methods import _pgan_common as common
from sct_jax.methods.common import TrainState, step_rng



def validate_config(config) -> None:
    common.validate_pgan_config(config)


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict[str, TrainState]:
    """``{"gen", "disc"[, "vgg16"]}`` for batches like ``batch_spec``."""
    return common.create_gan_state(config, rng, batch_spec)


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """One D update then one G update; returns the new state and scalar metrics."""
    return common.gan_step(config, state, batch, step_rng(rng, state["gen"]))


METHOD = Method(
    name="pgan", create_state=create_state, train_step=train_step, predict=common.predict,
    samples=True, check_sampling=common.check_sampling, validate_config=validate_config,
    input_rule=common.input_rule, load_pretrained=common.load_vgg_weights,
    takes_prior=True)
