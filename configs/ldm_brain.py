"""Brain latent diffusion model (seed 03): autoencoder -> diffusion UNet [-> ControlNet].

Two conditioning modes (``config.ldm.conditioning``):

- ``concat`` (the ``small`` default): the diffusion UNet sees the MR on the latent grid
  (space-to-depth, pooled or a jointly trained encoder: ``ldm.mr_encoding``)
  concatenated to the noisy latent; two chained runs, the diffusion stage is the sCT
  model::

    python train.py --config configs/ldm_brain.py:autoencoder,small \
        --workdir runs/ldm_brain_autoencoder_small
    python train.py --config configs/ldm_brain.py:diffusion,small \
        --workdir runs/ldm_brain_diffusion_small
    python evaluate.py --config configs/ldm_brain.py:diffusion,small \
        --workdir runs/ldm_brain_diffusion_small --samples 4   # mean sCT + std

- ``none`` (the full-size default, the seed's design): an unconditional UNet, then a
  ControlNet that steers it with the MR; three chained runs::

    python scripts/convert_vgg_weights.py --arch vgg16 --pth vgg16-397923af.pth --out weights/vgg16.npz
    python train.py --config configs/ldm_brain.py:autoencoder --workdir runs/ldm_brain_autoencoder
    python train.py --config configs/ldm_brain.py:diffusion --workdir runs/ldm_brain_diffusion
    python train.py --config configs/ldm_brain.py:controlnet --workdir runs/ldm_brain_controlnet
    python evaluate.py --config configs/ldm_brain.py:controlnet \
        --workdir runs/ldm_brain_controlnet --samples 8      # mean sCT + std (uncertainty)
    python -m sct_jax.bench.sampling --config configs/ldm_brain.py --steps 50 --batch 1

Both predict with v-prediction (``ldm.prediction_type``; ``epsilon`` and ``sample`` are
the alternatives) and standardise the latents per channel with a shift and scale
estimated over the training data (stored in the diffusion run's checkpoint). The ``flow``
word trains the UNet (and ControlNet) by rectified flow instead (``ldm.objective="flow"``:
the straight path from the latent to noise, velocity regression) and samples it with 30
Euler steps (``ldm.sampler`` ``euler`` | ``dpmpp_2m``; ``ldm.sample_steps``); its runs get
``_flow`` in their directory::

    python train.py --config configs/ldm_brain.py:diffusion,small,flow \
        --workdir runs/ldm_brain_diffusion_small_flow
    python evaluate.py --config configs/ldm_brain.py:diffusion,small,flow \
        --workdir runs/ldm_brain_diffusion_small_flow

Variant words (comma-separated): the stage, ``autoencoder`` | ``diffusion`` |
``controlnet`` (default: the last stage of the conditioning); the conditioning,
``concat`` | ``unconditional`` (default: ``concat`` for ``small``, else
``unconditional``; ``controlnet`` implies ``unconditional``); and a size, ``small``
(CPU: 64 x 80 x 64 phantom heads, 2x autoencoder with 8 latent channels, every
stage trained on 32^3 crops, sCT sampled in overlapping 32^3 windows; about an hour
of 2-core CPU per stage) or ``tiny`` (tests, seconds), e.g. ``configs/ldm_brain.py:diffusion,small``
or ``:controlnet,small`` (after ``:diffusion,small,unconditional``). The stages of one
size find each other through ``ldm.autoencoder_workdir`` / ``ldm.diffusion_workdir``,
which default to the ``runs/<name>`` directories the commands above use (a UNet of the
size's non-default conditioning gets the suffix ``_concat`` or ``_uncond``); point them
elsewhere with ``--config.ldm.diffusion_workdir=...``.

Full size (GPU): 192^3 CT patches -> 48^3 x 3 latents (autoencoder (64, 128, 128)),
UNet (64, 128, 128) with 2 res blocks and attention at 12^3. ``tiny`` and ``small`` set
the perceptual weight to 0 (no VGG file needed); the full config needs the VGG-16 file
(or ``--config.loss.perceptual_weight=0``).
"""

from ml_collections import config_dict

from sct_jax.config_utils import (accelerator_settings, base_config, parse_variants,
                                   tiny_run_settings)

SIZES = ("small", "tiny")
# Conditioning words: the diffusion UNet sees the MR on the latent grid ("concat", the
# ``small`` default: the diffusion stage is then the sCT model) or not ("unconditional",
# the full-size default: the ControlNet stage adds the MR).
CONDITIONING_WORDS = {"concat": "concat", "unconditional": "none"}

# The chained runs, in training order (each names the one before in config.ldm).
STAGES = ("autoencoder", "diffusion", "controlnet")

def get_config(arg=None):
    from sct_jax.errors import ConfigError
    variants = parse_variants(arg, set(STAGES) | set(SIZES) | set(CONDITIONING_WORDS)
                              | {"flow"})
    stages = [s for s in STAGES if s in variants]
    if len(stages) > 1:
        raise ConfigError(f"configs/ldm_brain.py: choose one stage, got {stages}")
    size = next((s for s in SIZES if s in variants), "")
    suffix = f"_{size}" if size else ""
    words = [w for w in CONDITIONING_WORDS if w in variants]
    if len(words) > 1:
        raise ConfigError(f"configs/ldm_brain.py: choose one conditioning, got {words}")
    default_conditioning = "concat" if size == "small" else "none"
    if "controlnet" in stages:
        if words == ["concat"]:
            raise ConfigError("configs/ldm_brain.py: the controlnet stage steers an "
                              "unconditional UNet; 'concat' has no controlnet stage")
        conditioning = "none"
    else:
        conditioning = CONDITIONING_WORDS[words[0]] if words else default_conditioning
    # The last stage of the chosen conditioning is the sCT model (the default stage).
    stage = stages[0] if stages else ("diffusion" if conditioning == "concat" else "controlnet")
    # A UNet of the size's other conditioning gets its own run directory.
    cond_suffix = "" if conditioning == default_conditioning else (
        "_concat" if conditioning == "concat" else "_uncond")
    # A flow-matching UNet (and the ControlNet on it) is another model: its own runs.
    cond_suffix += "_flow" if "flow" in variants else ""

    c = base_config()
    c.method = f"ldm_{stage}"
    c.name = f"ldm_brain_{stage}{suffix}" + (cond_suffix if stage == "diffusion" else "")
    if stage == "controlnet" and "flow" in variants:
        c.name += "_flow"
    c.data.region = "brain"
    c.data.mode = "patches"
    # The autoencoder is fully convolutional: it trains on smaller patches than the
    # diffusion stages, whose patch is the sampled (and predicted) window.
    c.data.patch = (96, 96, 96) if stage == "autoencoder" else (192, 192, 192)

    c.model = dict(
        conv_impl="auto",
        ae=dict(channels=(64, 128, 128), latent_channels=3, num_res_blocks=2,
                norm_num_groups=32, attention_levels=(False, False, False),
                nonlocal_attn=False,
                # None: PyTorch's default init (the reference); `small` starts it low.
                init_log_variance=config_dict.placeholder(float)),
        unet=dict(channels=(64, 128, 128), attention_levels=(False, False, True),
                  num_res_blocks=2, num_head_channels=32, norm_num_groups=32),
        # 2^(len - 1) must equal the autoencoder's factor: the MR is 4x the latent.
        controlnet=dict(conditioning_embedding_num_channels=(16, 32, 96)),
        disc=dict(ndf=32, n_layers=3, norm="instance"),
        vgg16_weights="weights/vgg16.npz",
    )
    # MONAI GenerativeModels' 3D autoencoder tutorial weights.
    c.loss = dict(l1_weight=1.0, perceptual_weight=1e-3, perceptual_layer="relu2_2",
                  perceptual_slices=4, kl_weight=1e-6, adv_weight=0.01)
    c.ldm = dict(
        autoencoder_workdir=f"runs/ldm_brain_autoencoder{suffix}",
        diffusion_workdir=f"runs/ldm_brain_diffusion{suffix}{cond_suffix}",
        adv_start=5000,  # autoencoder steps before the adversarial term switches on
        scale_batches=50,  # diffusion steps that estimate 1/std(z) before the UNet trains
        sample_latents=False,  # encode with the posterior mean (True: draw z)
        # v-prediction (Salimans & Ho): the x0 estimate stays useful at high noise, where
        # epsilon-prediction's is not (its x0 weight is the SNR, < 0.1 on half the steps).
        prediction_type="v_prediction",
        conditioning=conditioning,
        # "concat": how the MR reaches the latent grid (space_to_depth | pool | encoder).
        mr_encoding="space_to_depth",
        mr_encoder=dict(channels=(16, 32, 96), out_channels=16),  # mr_encoding="encoder"
        train_crop=(),  # diffusion/controlnet train crops (image voxels); () = the patch
        schedule=dict(kind="scaled_linear", num_train_timesteps=1000,
                      beta_start=0.0015, beta_end=0.0195),
        sampler="ddim", sample_steps=50, eta=0.0, conditioning_scale=1.0,
        # "flow" (the flow word): rectified flow on the standardised latents, velocity
        # regression at logit-normal times (Esser et al. 2024), Euler sampling.
        objective="diffusion", flow_time_sampling="logit_normal", flow_shift=1.0,
    )
    lr = {"autoencoder": 1e-4, "diffusion": 1e-4, "controlnet": 1e-4}[stage]
    c.optim = dict(lr=lr, b1=0.9, b2=0.999, decay_start=1.0)  # constant learning rate
    c.optim_disc = dict(lr=5e-4, b1=0.9, b2=0.999, decay_start=1.0)
    c.train.batch_size = 2 if stage == "autoencoder" else 1
    c.train.steps = {"autoencoder": 20000, "diffusion": 50000, "controlnet": 20000}[stage]
    c.train.ckpt_every = 2000
    # Only the ControlNet stage predicts sCT (validation: one DDIM sample per case);
    # the other stages draw their own images (reconstruction, unconditional sample).
    c.train.eval_every = 2000 if stage == "controlnet" else 0
    c.train.image_every = 2000
    c.eval.batch_size = 1
    c.eval.overlap = 0.25

    if size == "small":
        c.data.phantom.cases = 20  # 16 training heads, 2 validation, 2 test
        c.data.phantom.shape = (64, 80, 64)
        # Every stage trains on 32^3 crops of the heads (cheaper per step, more varied),
        # and the sCT is sampled in overlapping 32^3 windows, blended: sampling the
        # whole head at once with a UNet trained on crops shifts its GroupNorm
        # statistics (measured: 328 vs 282 HU MAE for the same checkpoint).
        c.data.patch = (32, 32, 32)
        # 2x per axis and 8 latent channels (32 x 40 x 32 x 8 latents), the posterior
        # started at sigma = exp(-4) with a weak KL and no adversarial term: what an
        # autoencoder reaches in the budget decides the LDM's ceiling. Measured on the
        # 2 held-out heads (body MAE of the CT decoded from its own latent, 2000 steps):
        # 4x/3 channels (the seed's) 200-228 HU; 2x/4 channels 130-167 HU at the
        # reference's init and KL (sigma stayed ~1: half the latent is noise, the decoder
        # blurs); 2x/4 with the low start 118-146; 2x/8 with it 96-124; 2x/8, 4000 steps
        # annealed over the second half (this config): 87 / 121 HU on the test heads,
        # 81 / 108 decoded in the sampling's 32^3 windows (README).
        c.model.ae.update(channels=(16, 32), latent_channels=8, num_res_blocks=1,
                          norm_num_groups=4, attention_levels=(False, False),
                          init_log_variance=-8.0)
        c.loss.kl_weight = 1e-8
        c.loss.adv_weight = 0.0  # it made the reconstruction oscillate (README)
        c.model.unet.update(channels=(16, 32, 32), attention_levels=(False, False, False),
                            num_res_blocks=1, num_head_channels=8, norm_num_groups=8)
        c.model.controlnet.conditioning_embedding_num_channels = (8, 32)
        c.ldm.mr_encoder = dict(channels=(8, 16), out_channels=8)
        c.model.disc.update(ndf=8, n_layers=2)
        c.loss.perceptual_weight = 0.0
        c.ldm.adv_start = 200
        c.ldm.scale_batches = 20
        c.ldm.sample_steps = 25
        c.train.batch_size = 1 if stage == "autoencoder" else 2
        c.train.steps = {"autoencoder": 4000, "diffusion": 4000, "controlnet": 1500}[stage]
        c.train.ckpt_every = 250
        c.train.eval_every = 250 if stage == "controlnet" else 0
        c.train.image_every = 250
        c.train.log_every = 25
        c.optim.lr = {"autoencoder": 1e-3, "diffusion": 5e-4, "controlnet": 2.5e-4}[stage]
        # Linear decay to 0 over the second half: at a constant 1e-3 the autoencoder's
        # reconstruction jumped (mid-run 111 -> 204 HU) and ended wherever the noise left
        # it; annealing settles both stages (README, seed 03).
        c.optim.decay_start = 0.5
    if size == "tiny":
        c.data.phantom.shape = (32, 32, 32)
        c.data.patch = (32, 32, 32)
        c.model.conv_impl = "xla"  # compiles faster than "cpu_fast"; speed is moot here
        c.model.ae.update(channels=(8, 8), num_res_blocks=1, norm_num_groups=4,
                          attention_levels=(False, False))
        c.model.unet.update(channels=(8, 8), attention_levels=(False, True), num_res_blocks=1,
                            num_head_channels=None, norm_num_groups=4)
        c.model.controlnet.conditioning_embedding_num_channels = (8, 8)
        c.model.disc.update(ndf=4, n_layers=1)
        c.loss.perceptual_weight = 0.0
        c.loss.perceptual_slices = 1
        c.ldm.adv_start = 1  # step 0 without, step 1 with the adversarial term
        c.ldm.scale_batches = 1  # step 0 estimates the scale, step 1 trains the UNet
        c.ldm.sample_steps = 3
        c.train.batch_size = 1
        tiny_run_settings(c)
        c.eval.panels = False
    if "flow" in variants:
        c.ldm.objective = "flow"
        c.ldm.sampler = "euler"
        c.ldm.sample_steps = 3 if size == "tiny" else 30
    return accelerator_settings(c, variants)
