"""Train an sCT model.

  python train.py                      # the CPU demo: phantom data, pix2pix `small`,
                                       # then evaluation (metrics + panels)
  python train.py --config configs/pix2pix_pelvis.py:tiny --workdir runs/tiny \
      [--config.train.steps=10 ...]

Everything but flag parsing lives in ``sct_jax`` (see ``sct_jax/cli/run.py``).

Exit status: 0 trained; 1 the run failed (diverged, disk full); 2 bad input or
configuration (one line `error: <file>: <problem>`, nothing written); 3 internal error.
"""

from absl import app, flags
from ml_collections import config_flags

from sct_jax.cli import run
from sct_jax.cli.guard import guarded, parse_flags
from sct_jax.config_utils import check_run_config

config_flags.DEFINE_config_file("config", None, "Experiment config: path/to/config.py[:variants].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs); resumed if it exists.")
flags.DEFINE_bool("evaluate", None, "Evaluate on the test split after training "
                  "(default: only for the no-argument demo).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        run.demo(workdir=FLAGS.workdir)
        return
    check_run_config(FLAGS.config, where=config_flags.get_config_filename(FLAGS["config"]))
    run.train_and_maybe_evaluate(FLAGS.config, FLAGS.workdir, evaluate=bool(FLAGS.evaluate))


if __name__ == "__main__":
    app.run(guarded(main), flags_parser=parse_flags)
