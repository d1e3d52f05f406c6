"""The seed-02 pelvis set-up the four pGAN-family configs share (not an experiment: the
configs ``pgan_pelvis.py``, ``ctx_pgan_pelvis.py``, ``reg_pgan_pelvis.py`` and
``meta_pgan_pelvis.py`` load it with :func:`sct_jax.config_utils.load_sibling`)."""

from sct_jax.config_utils import accelerator_settings, base_config, tiny_run_settings


def pelvis_config(method: str, variants: set[str]):
    """The seed-02 pelvis set-up shared by the four pGAN configs.

    Seed 02: single axial slices (2.5D: 3 MR slices in) cropped to 320 x 192, batch 6,
    100 epochs, phantom MR/CT misalignment so the methods have something to handle.
    ``variants``: ``small`` (CPU, ~10-15 min) and/or ``tiny`` (seconds, tests).
    """
    c = base_config()
    c.method = method
    c.name = f"{method}_pelvis"
    c.data.region = "pelvis"
    c.data.mode = "slices"
    c.data.crop = (320, 192)
    c.data.context = 1  # 3 neighbouring MR slices -> 1 CT slice
    c.data.phantom.misalign = 4.0  # mm: seed 02 compares methods under misalignment
    # A well-registered minority (no motion) for the meta-validation set to find, and
    # enough cases that its top 11% of the 26 training cases are 3.
    c.data.phantom.aligned_fraction = 0.2
    c.data.phantom.cases = 32

    c.model = dict(conv_impl="auto",
                   gen=dict(ngf=64, n_blocks=9, norm="instance", dropout=0.5,
                            upsample="transpose", calibration_bins=0),
                   disc=dict(ndf=64, n_layers=3, norm="instance"),
                   vgg16_weights="weights/vgg16.npz")
    # pGAN: G = adv + 100 L1 + 100 perceptual L1 (VGG-16 relu2_2, fed [-1, 1] images
    # unnormalised as the reference does), LSGAN.
    c.loss = dict(gan="lsgan", adv_weight=1.0, l1_weight=100.0, perceptual_weight=100.0,
                  perceptual_layer="relu2_2", perceptual_input_norm="none",
                  body_mask=False, body_mask_margin=0)
    if method in ("pgan", "ctx_pgan"):
        # REG-pGAN registers the sCT to the CT and meta-pGAN reweights each pixel's
        # L1: neither takes the shift-tolerant L1 (methods/common.reconstruction_l1).
        c.loss.shift_tolerance = 0
    # Adam 2e-4, beta1 0.5; 50 constant + 50 decaying epochs.
    c.optim = dict(lr=2e-4, b1=0.5, b2=0.999, decay_start=0.5)
    c.train.batch_size = 6
    # 100 epochs of the SynthRAD2023 pelvis training split (~144 cases x ~120 slices
    # ~ 17,000 slices / 6 per batch ~ 2,900 steps per epoch). Set it from your data:
    # --config.train.steps=$((100 * n_slices / 6)).
    c.train.steps = 290_000
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.eval_every = c.train.image_every = 5000  # validation + images

    if "small" in variants:
        c.name += "_small"
        c.data.crop = (256, 160)
        c.model.gen.ngf = 16
        c.model.gen.n_blocks = 3
        c.model.disc.ndf = 16
        c.train.batch_size = 4
        c.train.steps = 1200
        c.train.log_every = 50
        c.train.ckpt_every = 400
        c.train.eval_every = c.train.image_every = 200  # validation + images
    if "tiny" in variants:
        c.name += "_tiny"
        c.data.phantom.shape = (48, 32, 8)
        c.data.crop = (32, 32)
        # XLA's own convolutions: at 32 x 32 the CPU lowering gains nothing, and its
        # larger programs compile about twice as slowly (measured on the tiny pGAN step).
        c.model.conv_impl = "xla"
        c.model.gen.ngf = 4
        c.model.gen.n_blocks = 1
        c.model.disc.ndf = 4
        c.loss.perceptual_weight = 0.0  # no VGG file needed; tests add random weights
        c.train.batch_size = 2
        tiny_run_settings(c)
        c.eval.batch_size = 4
        c.eval.panels = False
    return accelerator_settings(c, variants)
