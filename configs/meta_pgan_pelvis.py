"""meta-pGAN (seed 02's method): pGAN with a spatially reweighted L1 (learning-to-reweight).

  python train.py --config configs/meta_pgan_pelvis.py --workdir runs/meta_pgan_pelvis
  python evaluate.py --config configs/meta_pgan_pelvis.py --workdir runs/meta_pgan_pelvis
  python -m sct_jax.cli.ablate --config configs/meta_pgan_pelvis.py:small \\
      --sweep meta.method=lookahead,jvp --seeds 3 --workdir runs/ablate_meta

``meta.granularity``: ``slice`` (default), ``patch`` (``meta.patch_size`` squared)
or ``pixel`` (seed 02's literal per-pixel weights).

Seed 02: crop 320 x 192, batch 6, meta-validation batch 32 from the top 11% of training
cases by MR/CT mutual information, 100 epochs. Needs VGG-16 weights for the perceptual
term (``weights/vgg16.npz``, see ``configs/pgan_pelvis.py``) unless
``--config.loss.perceptual_weight=0``. Variants ``small`` and ``tiny`` (validation batch
2, no VGG) as ``configs/pgan_pelvis.py``.
"""

from sct_jax.config_utils import load_sibling, parse_variants
pelvis_config = load_sibling(__file__, "_pelvis_gan").pelvis_config


def get_config(arg=None):
    variants = parse_variants(arg, {"small", "tiny"})
    c = pelvis_config("meta_pgan", variants)
    c.data.mode = "slices_with_meta"  # train batch + meta-validation batch
    c.meta = dict(
        method="jvp",  # or "lookahead": the literal nested gradient, same weights
        alpha=c.optim.lr,  # virtual step = the real learning rate (only scales u)
        val_batch_size=32,
        val_fraction=0.11,  # top 11% of the training cases by mutual information
        val_exclusive=True,  # those cases are "allocated" to validation, not trained on
        # What one weight covers: "slice" (Ren et al.'s per-example form), "patch"
        # (k x k tiles, k = patch_size) or "pixel" (seed 02's literal form). Per pixel,
        # the weights act as a filter on the sign of the residual and starve bone of
        # L1 (README, seed-02 results); per slice they do not.
        granularity="slice",
        patch_size=16,
        diagnostics=True,  # D sign/layer shares and weight share per tissue (metrics)
    )
    # Weight maps of the first training slice (with its L1 error, MR and CT) go to
    # TensorBoard and workdir/images/ every this many steps.
    c.train.image_every = 5000
    if "small" in variants:
        c.meta.val_batch_size = 8
        c.train.image_every = 200
    if "tiny" in variants:
        c.meta.val_batch_size = 2
        c.train.image_every = 2
    return c
