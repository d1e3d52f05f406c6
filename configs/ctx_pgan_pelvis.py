"""CTX-pGAN (pGAN + contextual loss on VGG-19 relu3_2/relu4_2), seed 02's pelvis settings.

  python scripts/convert_vgg_weights.py --arch vgg16 --pth vgg16-397923af.pth --out weights/vgg16.npz
  python scripts/convert_vgg_weights.py --arch vgg19 --pth vgg19-dcbb9e9d.pth --out weights/vgg19.npz
  python train.py --config configs/ctx_pgan_pelvis.py --workdir runs/ctx_pgan_pelvis
  python evaluate.py --config configs/ctx_pgan_pelvis.py --workdir runs/ctx_pgan_pelvis

Contextual weight 30: not in seed 02; the seed authors' benchmark uses 30 next to L1 100
(see :mod:`sct_jax.methods.ctx_pgan`). Variants ``small`` and ``tiny`` as
``configs/pgan_pelvis.py``; the contextual term always needs VGG-19 weights
(``--config.model.vgg19_weights=PATH``), ``tiny`` included (tests write random ones).
"""

from sct_jax.config_utils import load_sibling, parse_variants
pelvis_config = load_sibling(__file__, "_pelvis_gan").pelvis_config


def get_config(arg=None):
    variants = parse_variants(arg, {"small", "tiny"})
    c = pelvis_config("ctx_pgan", variants)
    c.model.vgg19_weights = "weights/vgg19.npz"
    c.loss.contextual_weight = 30.0
    c.loss.contextual_layers = ("relu3_2", "relu4_2")
    c.loss.contextual_band_width = 0.5
    # The reference keeps at most 65 x 65 random positions per feature map.
    c.loss.contextual_max_positions = 65 ** 2
    c.loss.contextual_input_norm = "imagenet"
    return c
