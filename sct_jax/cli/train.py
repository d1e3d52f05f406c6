"""sct-train (also ``python train.py``): train an sCT model.

  sct-train                      # the CPU demo: phantom data, pix2pix `small`, then
                                 # evaluation (metrics + panels)
  sct-train --config configs/pix2pix_pelvis.py:tiny --workdir runs/tiny \\
      [--config.train.steps=10 ...]

At the end of training the model is exported to ``<workdir>/model`` (see
``sct-export-model``). Everything but flag parsing lives in :mod:`sct_jax.cli.run`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sct_jax.cli.guard import guarded

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags (once per process: ``train.py`` and ``sct-train`` share them)."""
    if "evaluate" in FLAGS:
        return
    config_flags.DEFINE_config_file("config", None, "Experiment config: "
                                    "path/to/config.py[:variants].", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); resumed if it "
                        "exists.")
    flags.DEFINE_bool("evaluate", None, "Evaluate on the test split after training "
                      "(default: only for the no-argument demo).")


def main(argv):
    from sct_jax.cli import run
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        run.demo(workdir=FLAGS.workdir)
        return
    run.train_and_maybe_evaluate(FLAGS.config, FLAGS.workdir, evaluate=bool(FLAGS.evaluate))


def run_main() -> None:
    """The ``sct-train`` console script (and ``python train.py``)."""
    define_flags()
    app.run(guarded(main))


if __name__ == "__main__":
    run_main()
