"""REG-pGAN (pGAN + RegGAN registration network), seed 02's pelvis settings.

  python train.py --config configs/reg_pgan_pelvis.py --workdir runs/reg_pgan_pelvis
  python evaluate.py --config configs/reg_pgan_pelvis.py --workdir runs/reg_pgan_pelvis

G and R trained jointly on 20 L1(warp(fake), ct) + 1 adv + 10 smoothness, lr 1e-4 (as
RegGAN's reference). No perceptual term (RegGAN has none), so no VGG file is needed.
R has 6 levels at 320 x 192 (the reference's 7 would leave a width of 1 at the
bottleneck). Variants ``small`` and ``tiny`` as ``configs/pgan_pelvis.py``.
"""

from sct_jax.config_utils import load_sibling, parse_variants
pelvis_config = load_sibling(__file__, "_pelvis_gan").pelvis_config


def get_config(arg=None):
    variants = parse_variants(arg, {"small", "tiny"})
    c = pelvis_config("reg_pgan", variants)
    c.model.reg = dict(down_channels=(32, 64, 64, 64, 64, 64),
                       up_channels=(64, 64, 64, 64, 64, 32), n_bottleneck_blocks=3)
    c.loss.l1_weight = 20.0  # on the registered (warped) fake
    c.loss.adv_weight = 1.0
    c.loss.smooth_weight = 10.0
    c.loss.perceptual_weight = 0.0
    c.optim.lr = 1e-4
    if "small" in variants:  # 256 x 160: 6 levels leave 4 x 2 at the bottleneck
        c.model.reg.down_channels = (16, 32, 32, 32, 32, 32)
        c.model.reg.up_channels = (32, 32, 32, 32, 32, 16)
        c.model.reg.n_bottleneck_blocks = 1
    if "tiny" in variants:  # 32 x 32: 3 levels leave 4 x 4
        c.model.reg.down_channels = (4, 8, 8)
        c.model.reg.up_channels = (8, 8, 4)
        c.model.reg.n_bottleneck_blocks = 1
    return c
