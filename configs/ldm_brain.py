"""Brain latent diffusion model (seed 03): autoencoder -> diffusion UNet -> ControlNet.

Three chained runs, then evaluation of the last (the MR steers the ControlNet; a latent
is sampled from noise with the frozen UNet and decoded)::

  python scripts/convert_vgg_weights.py --arch vgg16 --pth vgg16-397923af.pth --out weights/vgg16.npz
  python train.py --config configs/ldm_brain.py:autoencoder --workdir runs/ldm_brain_autoencoder
  python train.py --config configs/ldm_brain.py:diffusion --workdir runs/ldm_brain_diffusion
  python train.py --config configs/ldm_brain.py:controlnet --workdir runs/ldm_brain_controlnet
  python evaluate.py --config configs/ldm_brain.py:controlnet \
      --workdir runs/ldm_brain_controlnet --samples 8      # mean sCT + std (uncertainty)
  python -m sct_jax.bench.sampling --config configs/ldm_brain.py --steps 50 --batch 1

Variant words (comma-separated): the stage, ``autoencoder`` | ``diffusion`` |
``controlnet`` (default ``controlnet``), and a size, ``small`` (CPU: 64 x 80 x 64
phantom heads, 16 x 20 x 16 latents; each stage ~10-20 min on 2 cores, more when the
machine is shared) or ``tiny`` (tests, seconds), e.g.
``configs/ldm_brain.py:diffusion,small``. The stages of one size find each other through
``ldm.autoencoder_workdir`` / ``ldm.diffusion_workdir``, which default to the
``runs/<name>`` directories the commands above use; point them elsewhere with
``--config.ldm.diffusion_workdir=...``.

Full size (GPU): 192^3 CT patches -> 48^3 x 3 latents (autoencoder (64, 128, 128)),
UNet (64, 128, 128) with 2 res blocks and attention at 12^3. ``tiny`` and ``small`` set
the perceptual weight to 0 (no VGG file needed); the full config needs the VGG-16 file
(or ``--config.loss.perceptual_weight=0``).
"""

from sct_jax.config_utils import base_config, parse_variants, tiny_run_settings
from sct_jax.methods._ldm_common import STAGES

SIZES = ("small", "tiny")


def get_config(arg=None):
    variants = parse_variants(arg, set(STAGES) | set(SIZES))
    stages = [s for s in STAGES if s in variants]
    if len(stages) > 1:
        from sct_jax.errors import ConfigError
        raise ConfigError(f"configs/ldm_brain.py: choose one stage, got {stages}")
    stage = stages[0] if stages else "controlnet"
    size = next((s for s in SIZES if s in variants), "")
    suffix = f"_{size}" if size else ""

    c = base_config()
    c.method = f"ldm_{stage}"
    c.name = f"ldm_brain_{stage}{suffix}"
    c.data.region = "brain"
    c.data.mode = "patches"
    # The autoencoder is fully convolutional: it trains on smaller patches than the
    # diffusion stages, whose patch is the sampled (and predicted) window.
    c.data.patch = (96, 96, 96) if stage == "autoencoder" else (192, 192, 192)

    c.model = dict(
        conv_impl="auto",
        ae=dict(channels=(64, 128, 128), latent_channels=3, num_res_blocks=2,
                norm_num_groups=32, attention_levels=(False, False, False),
                nonlocal_attn=False),
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
        diffusion_workdir=f"runs/ldm_brain_diffusion{suffix}",
        adv_start=5000,  # autoencoder steps before the adversarial term switches on
        scale_batches=50,  # diffusion steps that estimate 1/std(z) before the UNet trains
        sample_latents=False,  # encode with the posterior mean (True: draw z)
        prediction_type="epsilon",
        schedule=dict(kind="scaled_linear", num_train_timesteps=1000,
                      beta_start=0.0015, beta_end=0.0195),
        sampler="ddim", sample_steps=50, eta=0.0, conditioning_scale=1.0,
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
        c.data.phantom.cases = 12
        c.data.phantom.shape = (64, 80, 64)
        # The whole head, one window per volume; the autoencoder trains on 32^3 crops.
        c.data.patch = (32, 32, 32) if stage == "autoencoder" else (64, 80, 64)
        c.model.ae.update(channels=(8, 16, 32), num_res_blocks=1, norm_num_groups=4)
        c.model.unet.update(channels=(16, 32, 32), num_res_blocks=1, num_head_channels=8,
                            norm_num_groups=8)
        c.model.controlnet.conditioning_embedding_num_channels = (8, 16, 32)
        c.model.disc.update(ndf=8, n_layers=2)
        c.loss.perceptual_weight = 0.0
        c.ldm.adv_start = 200
        c.ldm.scale_batches = 20
        c.ldm.sample_steps = 25
        c.train.batch_size = 1
        # 0.43, 1.1, 1.05 s/step on a 2-core AVX-512 CPU at load ~6.
        c.train.steps = {"autoencoder": 1500, "diffusion": 1500, "controlnet": 1000}[stage]
        c.train.ckpt_every = 250
        c.train.eval_every = 250 if stage == "controlnet" else 0
        c.train.image_every = 250
        c.train.log_every = 25
        c.optim.lr = {"autoencoder": 5e-4, "diffusion": 2.5e-4, "controlnet": 2.5e-4}[stage]
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
    return c
