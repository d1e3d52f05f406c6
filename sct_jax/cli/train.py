"""sct-train (also ``python train.py``): train an sCT model.

  sct-train                      # the CPU demo: phantom data, pix2pix `small`, then
                                 # evaluation (metrics + panels)
  sct-train --config configs/pix2pix_pelvis.py:tiny --workdir runs/tiny \\
      [--config.train.steps=10 ...]

At the end of training the model is exported to ``<workdir>/model`` (see
``sct-export-model``). Everything but flag parsing lives in :mod:`sct_jax.experiment`.

Exit status: 0 trained; 1 the run failed (diverged, disk full); 2 bad input or
configuration (one line `error: <file>: <problem>`, nothing written); 3 internal error.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sct_jax import experiment
from sct_jax.config_utils import check_run_config
from sct_jax.guard import guarded, parse_flags

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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        experiment.demo(workdir=FLAGS.workdir)
        return
    check_run_config(FLAGS.config, where=config_flags.get_config_filename(FLAGS["config"]))
    experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir, evaluate=bool(FLAGS.evaluate))


def run_main() -> None:
    """The ``sct-train`` console script (and ``python train.py``)."""
    define_flags()
    app.run(guarded(main), flags_parser=parse_flags)


if __name__ == "__main__":
    run_main()
