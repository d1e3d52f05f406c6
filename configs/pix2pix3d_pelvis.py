"""pix2pix in 3D on pelvis patches (seed 03: batch 1, lr 1e-3, L1 weight 100).

  python train.py --config configs/pix2pix3d_pelvis.py --workdir runs/pix2pix3d_pelvis
  python evaluate.py --config configs/pix2pix3d_pelvis.py --workdir runs/pix2pix3d_pelvis

Volumes are predicted by overlapping sliding windows of the patch size, blended.
Variants: ``small`` (CPU), ``tiny`` (tests).
"""

from sct_jax.config_utils import (accelerator_settings, base_config, parse_variants,
                                   tiny_run_settings)


def get_config(arg=None):
    variants = parse_variants(arg, {"small", "tiny"})
    c = base_config()
    c.method = "pix2pix"
    c.name = "pix2pix3d_pelvis"
    c.data.region = "pelvis"
    c.data.mode = "patches"
    c.data.patch = (128, 128, 32)

    c.model = dict(conv_impl="auto",
                   gen=dict(ngf=32, num_downs=5, norm="instance", dropout=0.5,
                            upsample="transpose", calibration_bins=0),
                   disc=dict(ndf=32, n_layers=3, norm="instance"))
    c.loss = dict(gan="vanilla", l1_weight=100.0, body_mask=False, body_mask_margin=0,
                  shift_tolerance=0)
    c.optim = dict(lr=1e-3, b1=0.5, b2=0.999, decay_start=0.5)
    c.train.batch_size = 1
    c.train.steps = 20000
    c.train.ckpt_every = 2000
    c.train.eval_every = c.train.image_every = 2000  # validation + images
    c.eval.batch_size = 2

    if "small" in variants:
        c.name = "pix2pix3d_pelvis_small"
        c.data.patch = (64, 64, 32)
        c.model.gen.ngf = 8
        c.model.gen.num_downs = 4
        c.model.disc.ndf = 8
        c.train.steps = 1000
        c.train.ckpt_every = 500
        c.train.eval_every = c.train.image_every = 250  # validation + images
    if "tiny" in variants:
        c.name = "pix2pix3d_pelvis_tiny"
        c.data.phantom.shape = (48, 32, 16)
        c.data.patch = (16, 16, 8)
        c.model.gen.ngf = 4
        c.model.gen.num_downs = 3
        c.model.disc.ndf = 4
        c.model.disc.n_layers = 1
        tiny_run_settings(c)
    return accelerator_settings(c, variants)
