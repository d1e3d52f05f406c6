"""CTX-pGAN: pGAN plus the contextual loss (Mechrez et al. 2018) on VGG-19 features.

``G = adv + 100 L1 + 100 perceptual + contextual_weight * sum_l CX_l(fake, ct)`` over
VGG-19 ``relu3_2`` and ``relu4_2`` (Mechrez's ``conv3_2``/``conv4_2``, which include the
ReLU). The contextual loss matches feature *sets*, so it tolerates the MR/CT
misalignment that the pixel L1 punishes. Seed 02 gives no weight: the default 30 is the
seed authors' own choice next to an L1 weight of 100 in their public benchmark
(Misalign-benchmark ``configs/model/proposed_A_to_B.yaml``: ``lambda_l1: 100``,
``lambda_style: 30`` with ``flag_ctx: True``).

State: pGAN's plus a frozen ``"vgg19"`` (weights from ``config.model.vgg19_weights``;
only the convs up to the deepest contextual layer are kept). Above
``loss.contextual_max_positions`` feature positions the same random positions of both
maps are kept (a key folded from the step's key).
"""

from __future__ import annotations

import jax

from sct_jax.errors import ConfigError
from sct_jax.losses import contextual
from sct_jax.methods import Method
from sct_jax.methods import _pgan_common as common
from sct_jax.methods.common import TrainState, step_rng
from sct_jax.models.layers import precision_kwargs



def validate_config(config) -> None:
    common.validate_pgan_config(config)
    if float(config.loss.contextual_weight) < 0:
        raise ConfigError(f"config.loss.contextual_weight={config.loss.contextual_weight}: "
                          "must be >= 0")
    if not tuple(config.loss.contextual_layers):
        raise ConfigError("config.loss.contextual_layers: give at least one VGG-19 layer")
    common.check_vgg_files(config, ("vgg19",) if float(config.loss.contextual_weight) > 0
                           else ())


def create_state(config, rng: jax.Array, batch_spec: dict) -> dict[str, TrainState]:
    """pGAN's ``{"gen", "disc"[, "vgg16"]}`` plus the frozen ``"vgg19"``."""
    state = common.create_gan_state(config, rng, batch_spec)
    if config.loss.contextual_weight > 0:
        state["vgg19"] = common.frozen_vgg_state("vgg19", tuple(config.loss.contextual_layers))
    return state


def train_step(config, state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
    """pGAN's step with the weighted contextual term added to G's objective."""
    w = config.loss
    ct = batch["ct"]

    def contextual_term(fake, key):
        if w.contextual_weight <= 0:
            return 0.0, {}
        cx = contextual.contextual_loss_vgg(
            state["vgg19"].params, fake, ct, key, layers=tuple(w.contextual_layers),
            arch="vgg19", band_width=w.contextual_band_width,
            max_positions=w.contextual_max_positions, input_norm=w.contextual_input_norm,
            conv_impl=config.model.conv_impl, dtype=precision_kwargs(config)["dtype"])
        return w.contextual_weight * cx, {"g_contextual": cx}

    return common.gan_step(config, state, batch, step_rng(rng, state["gen"]),
                           extra_terms=contextual_term)


METHOD = Method(
    name="ctx_pgan", create_state=create_state, train_step=train_step, predict=common.predict,
    samples=True, check_sampling=common.check_sampling, validate_config=validate_config,
    input_rule=common.input_rule, load_pretrained=common.load_vgg_weights,
    takes_prior=True)
