"""pGAN on 2.5D axial pelvis slices, seed 02's settings (crop 320 x 192, batch 6, 100 epochs).

  python scripts/convert_vgg_weights.py --arch vgg16 --pth vgg16-397923af.pth --out weights/vgg16.npz
  python train.py --config configs/pgan_pelvis.py --workdir runs/pgan_pelvis
  python evaluate.py --config configs/pgan_pelvis.py --workdir runs/pgan_pelvis

Variants: ``small`` (CPU: ngf 16, 3 residual blocks, 256 x 160, ~10-15 min on 2 cores),
``tiny`` (seconds; tests; no perceptual term so no VGG file). Without VGG weights:
``--config.loss.perceptual_weight=0``. Real data: ``--config.data.root=/path/to/synthrad``.
"""

from sct_jax.config_utils import load_sibling, parse_variants
pelvis_config = load_sibling(__file__, "_pelvis_gan").pelvis_config


def get_config(arg=None):
    return pelvis_config("pgan", parse_variants(arg, {"small", "tiny"}))
