"""pix2pix on axial pelvis slices (seed 02/03 settings: crop 320 x 192, batch 6).

  python train.py --config configs/pix2pix_pelvis.py --workdir runs/pix2pix_pelvis
  python evaluate.py --config configs/pix2pix_pelvis.py --workdir runs/pix2pix_pelvis

Variants: ``small`` (the CPU demo: trains to a useful sCT in well under 20 minutes on
2 cores), ``tiny`` (seconds; tests), ``cbct`` (CBCT input, SynthRAD Task 2; README "CBCT
to CT"). Real data: ``--config.data.root=/path/to/synthrad``.
"""

from sct_jax.config_utils import (accelerator_settings, base_config, parse_variants,
                                   tiny_run_settings)


def get_config(arg=None):
    variants = parse_variants(arg, {"small", "tiny"})
    c = base_config()
    c.method = "pix2pix"
    c.name = "pix2pix_pelvis"
    c.data.region = "pelvis"
    c.data.mode = "slices"
    c.data.crop = (320, 192)

    # Two departures from the reference, measured on the phantom's pelvis (small, one run
    # each, README "Quality options"): upsample="resize" (nearest x2 + 3x3 conv) in place
    # of transposed convolutions, MAE 53.4 vs 87.2 HU, SSIM 0.912 vs 0.800, no
    # checkerboard; and the L1 inside the body mask only (loss.body_mask; the sCT is air
    # outside it), 46.5 HU, better than the mask grown by 8 voxels (loss.body_mask_margin=8:
    # 52.2; seed 1: 50.7 vs 58.5). upsample="transpose" and body_mask=False give the
    # reference back.
    c.model = dict(conv_impl="auto",
                   gen=dict(ngf=64, num_downs=6, norm="instance", dropout=0.5,
                            upsample="resize", calibration_bins=0),
                   disc=dict(ndf=64, n_layers=3, norm="instance"))
    c.loss = dict(gan="vanilla", l1_weight=100.0, body_mask=True, body_mask_margin=0,
                  shift_tolerance=0)
    c.optim = dict(lr=2e-4, b1=0.5, b2=0.999, decay_start=0.5)
    c.train.batch_size = 6
    c.train.steps = 20000
    c.train.ckpt_every = 2000
    c.train.eval_every = c.train.image_every = 2000  # validation + images

    if "small" in variants:
        c.name = "pix2pix_pelvis_small"
        c.data.crop = (256, 160)
        c.model.gen.ngf = 16
        c.model.gen.num_downs = 5
        c.model.disc.ndf = 16
        c.train.batch_size = 4
        c.train.steps = 1500
        c.train.log_every = 50
        c.train.ckpt_every = 500
        c.train.eval_every = c.train.image_every = 250  # validation + images
    if "tiny" in variants:
        c.name = "pix2pix_pelvis_tiny"
        c.data.phantom.shape = (48, 32, 8)
        c.data.crop = (32, 32)
        c.model.gen.ngf = 4
        c.model.gen.num_downs = 3
        c.model.disc.ndf = 4
        c.model.disc.n_layers = 2
        c.train.batch_size = 2
        tiny_run_settings(c)
        c.eval.batch_size = 4
    if "cbct" in variants:
        # The phantom's pelvis CBCTs, small, one run each: L1 weight 1000 gives 55.8 HU
        # against 63.8 HU at 100 (the GAN term adds texture a CBCT's noise invites).
        # accelerator_settings adds the learned input calibration (49.0 HU) and the
        # shift-tolerant L1 (heads: 48.8 vs 57.6 HU, 3 seeds).
        c.loss.l1_weight = 1000.0
    return accelerator_settings(c, variants)
