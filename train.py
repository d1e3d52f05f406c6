"""Train an sCT model.

  python train.py                      # the CPU demo: phantom data, pix2pix `small`,
                                       # then evaluation (metrics + panels)
  python train.py --config configs/pix2pix_pelvis.py:tiny --workdir runs/tiny \
      [--config.train.steps=10 ...]

The same as ``sct-train`` (:mod:`sct_jax.cli.train`); the logic lives in ``sct_jax``.
"""

from sct_jax.cli import train as _cli

if __name__ == "__main__":
    _cli.run_main()
