"""CycleGAN on unpaired axial pelvis slices (reference CycleGAN settings, crop 320 x 192).

  python train.py --config configs/cyclegan_pelvis.py --workdir runs/cyclegan_pelvis
  python evaluate.py --config configs/cyclegan_pelvis.py --workdir runs/cyclegan_pelvis

Trained from the unpaired sampler (each MR slice with a CT slice of another case);
evaluated like every other method on the paired test cases with the SynthRAD metrics.
Variants: ``small`` (the CPU demo, ~15 min on 2 cores), ``tiny`` (seconds; tests).
Real data: ``--config.data.root=/path/to/synthrad``.
"""

from sct_jax.config_utils import (accelerator_settings, base_config, parse_variants,
                                   tiny_run_settings)


def get_config(arg=None):
    variants = parse_variants(arg, {"small", "tiny"})
    c = base_config()
    c.method = "cyclegan"
    c.name = "cyclegan_pelvis"
    c.data.region = "pelvis"
    c.data.mode = "unpaired_slices"
    c.data.crop = (320, 192)  # the pelvis crop of the other methods; multiples of 4
    c.data.context = 0  # 1 MR channel: the cycle and identity losses need equal channels

    # resnet_9blocks without dropout (the reference's --no_dropout default), 70 x 70
    # PatchGANs with instance norm, pools of 50 past fakes.
    c.model = dict(conv_impl="auto",
                   gen=dict(ngf=64, n_blocks=9, norm="instance", dropout=0.0,
                            upsample="transpose", calibration_bins=0),
                   disc=dict(ndf=64, n_layers=3, norm="instance"),
                   pool_size=50)
    # lambda_A = lambda_B = 10 (cycle), lambda_identity = 0.5 (times the cycle weight).
    c.loss = dict(gan="lsgan", cycle_mr_weight=10.0, cycle_ct_weight=10.0,
                  identity_weight=0.5)
    # Adam 2e-4, beta1 0.5; constant for the first half, then linear decay to 0
    # (the reference's n_epochs = n_epochs_decay = 100).
    c.optim = dict(lr=2e-4, b1=0.5, b2=0.999, decay_start=0.5)
    c.train.batch_size = 1  # the reference's; larger batches work (the pools are per image)
    # Set it from your data: 200 epochs of the MR training slices at batch 1, e.g.
    # --config.train.steps=$((200 * n_slices)).
    c.train.steps = 200_000
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.eval_every = c.train.image_every = 5000  # validation + images

    if "small" in variants:
        c.name += "_small"
        c.data.crop = (256, 160)
        c.model.gen.ngf = 16
        c.model.gen.n_blocks = 3
        c.model.disc.ndf = 16
        c.train.batch_size = 2
        c.train.steps = 600
        c.train.log_every = 25
        c.train.ckpt_every = 200
        c.train.eval_every = c.train.image_every = 100  # validation + images
    if "tiny" in variants:
        c.name += "_tiny"
        c.data.phantom.shape = (48, 32, 8)
        c.data.crop = (32, 32)
        # XLA's own convolutions: at 32 x 32 the CPU lowering gains nothing and compiles
        # more slowly (measured on the tiny pGAN step).
        c.model.conv_impl = "xla"
        c.model.gen.ngf = 4
        c.model.gen.n_blocks = 1
        c.model.disc.ndf = 4
        c.model.pool_size = 4
        c.train.batch_size = 2
        tiny_run_settings(c)
        c.eval.batch_size = 4
    return accelerator_settings(c, variants)
