"""sct-evaluate (also ``python evaluate.py``): scores synthetic CTs with the SynthRAD2023 metrics (MAE, PSNR, SSIM, and more).

Predict the evaluation split of a trained run, then score it (sCT NIfTIs, metrics
CSV/JSON, a PNG panel per case)::

  python evaluate.py --workdir runs/pix2pix_pelvis_small   # the run's own config.json
  python evaluate.py --config configs/pix2pix_pelvis.py:small --workdir runs/pix2pix_pelvis_small
  python evaluate.py --config configs/ldm_brain.py:controlnet --workdir runs/ldm_brain_controlnet \
      --samples 8     # sampling methods: mean sCT scored, per-voxel std -> <id>/sct_std.nii.gz
  python evaluate.py --config configs/pgan_pelvis.py --workdir runs/pgan_pelvis \
      --samples 8 --qa  # GANs sample by test-time dropout; --qa: <id>/qa.json, qa.png
  python evaluate.py --workdir ... --checkpoint latest   # or best (default), or a step
  python evaluate.py --workdir runs/a --tta   # + each case flipped left-right, averaged
  python evaluate.py --workdir runs/a --ensemble runs/b,runs/c   # the mean of 3 runs

Score a folder of predictions (``PRED/<id>/sct.nii.gz``, ``PRED/<id>.nii.gz`` or
``PRED/<id>_sct.nii.gz``) against the cases of a SynthRAD-layout data root::

  python evaluate.py --pred runs/pix2pix/predictions --data data/synthrad \
      [--region pelvis] [--out results/pix2pix.json]

Writes the JSON summary (default ``PRED/metrics.json``), the per-case CSV and
``report.html`` (one self-contained page: the case table, and with ``--workdir`` first
the verdict against the no-model baselines, then each case's panel, the baselines, the
QA verdicts and the std maps of ``--samples``, ``--tta`` or ``--ensemble``) next to it,
and prints a table. Bad input ends the run with one ``error: ...`` line and exit status
2, before anything is written.

Exit status: 0 scored; 1 failed (disk full); 2 bad input (one line naming the file,
nothing written); 3 internal error (a bug: the traceback is printed).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sct_jax import runs
from sct_jax.errors import ConfigError
from sct_jax.evaluation import lpips_setup, report_html, scoring
from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.guard import guarded, parse_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the flags (once per process: ``evaluate.py`` and ``sct-evaluate`` share them)."""
    if "pred" in FLAGS:
        return
    flags.DEFINE_string("pred", None, "Folder of predicted sCT volumes to score.")
    flags.DEFINE_string("data", None, "SynthRAD-layout data root holding the reference "
                        "cases.")
    flags.DEFINE_string("out", None, "JSON summary path (default: PRED/metrics.json); the "
                        "per-case CSV is written next to it with the same stem.")
    flags.DEFINE_string("region", None, "Score only cases of this region (brain, pelvis).")
    config_flags.DEFINE_config_file("config", None, "The run's config (path.py[:variants]); "
                                    "default: the run's own config.json. Must match the run "
                                    "except for eval.*, train.* and mesh.*.",
                                    lock_config=False)
    flags.DEFINE_string("workdir", None, "Training run directory: predict its evaluation "
                        "split with the checkpoint --checkpoint names.")
    flags.DEFINE_string("checkpoint", "best", "With --workdir: which checkpoint predicts: "
                        "best (the lowest validation MAE; the latest when the run was never "
                        "validated), latest, or a step number.")
    flags.DEFINE_integer("samples", 1, "sCT samples per case (sampling methods, e.g. the "
                         "LDM): the mean is scored, the per-voxel std written as "
                         "<id>/sct_std.nii.gz. The GANs sample by test-time (Monte-Carlo) "
                         "dropout.")
    flags.DEFINE_boolean("tta", False, "With --workdir: test-time augmentation: also "
                         "predict each case flipped the ways training flipped it "
                         "(left-right), flip back and average; the per-voxel std across "
                         "the flips is written as <id>/sct_std.nii.gz.")
    flags.DEFINE_list("ensemble", [], "With --workdir: further run directories (the same "
                      "input and training grid, e.g. other seeds of the config), "
                      "comma-separated: the mean over all runs is scored, their per-voxel "
                      "std written as <id>/sct_std.nii.gz. Each predicts with its own "
                      "config.json and the --checkpoint choice.")
    flags.DEFINE_string("lpips_weights", None, "VGG-16 ImageNet weights (.npz from "
                        "scripts/convert_vgg_weights.py) for the LPIPS column; default: "
                        "the run's perceptual-loss weights or weights/vgg16.npz when "
                        "present, else the column is empty and the report says why.")
    flags.DEFINE_boolean("dose", False, "With --workdir: also score every case by dose: "
                         "photon and proton plans on the CT (a 25 mm target sphere at the "
                         "body's centre of mass), recomputed on the model's and the "
                         "baselines' sCTs (dose MAE, gamma, D98; DVH plots in the report). "
                         "Needs the [dose] extra.")
    flags.DEFINE_float("dose_rx", 2.0, "With --dose: the prescription in Gy.")
    flags.DEFINE_boolean("qa", False, "With --workdir: also run the reference-free fidelity "
                         "checks on every case (<id>/qa.json, qa.png; the sample spread with "
                         "--samples, cycle consistency for CycleGAN) and print a case x "
                         "check table.")


def score_predictions() -> None:
    """The ``--pred DIR --data ROOT`` mode: score an existing prediction folder."""
    if not FLAGS.pred or not FLAGS.data:
        raise ConfigError("--pred and --data are both required to score predictions")
    if FLAGS.checkpoint != "best":
        raise ConfigError("--checkpoint needs --workdir (a training run)")
    if FLAGS.qa:
        raise ConfigError("--qa needs --config and --workdir (the run's checkpoint and "
                          "training split); use python -m sct_jax.cli.qa for single files")
    if FLAGS.tta or FLAGS.ensemble:
        raise ConfigError(f"{'--tta' if FLAGS.tta else '--ensemble'} needs --workdir (it "
                          "predicts); sct-predict --tta / -m A -m B predicts single files")
    if FLAGS.dose:
        raise ConfigError("--dose needs --workdir (the run's training split gives the "
                          "baselines); use sct-dose for single files")
    lpips_setup.check_weights(FLAGS.lpips_weights)
    lpips_net, lpips_note = lpips_setup.lpips_for(FLAGS.lpips_weights)
    report = scoring.evaluate_folder(FLAGS.pred, FLAGS.data, out=FLAGS.out,
                                     region=FLAGS.region, lpips_net=lpips_net,
                                     extra={"lpips_note": lpips_note})
    print(lpips_note)
    json_path, _ = scoring.output_paths(FLAGS.pred, FLAGS.out)
    page = report_html.write(report_html.path_for(json_path), report, title=str(FLAGS.pred),
                             notes=(f"predictions {FLAGS.pred} scored against {FLAGS.data}",
                                    lpips_note))
    print(f"report: {page}")


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is not None or FLAGS.workdir:
        if not FLAGS.workdir:
            raise ConfigError("--config needs --workdir (the training run to evaluate)")
        checkpoint = runs.parse_choice(FLAGS.checkpoint)
        config = runs.config_for(FLAGS.workdir, FLAGS.config)
        evaluate_run(config, FLAGS.workdir, data_root=FLAGS.data, out=FLAGS.out,
                     samples=FLAGS.samples, qa=FLAGS.qa, checkpoint=checkpoint,
                     lpips_weights=FLAGS.lpips_weights, dose=FLAGS.dose,
                     dose_rx=FLAGS.dose_rx, tta=FLAGS.tta, ensemble=FLAGS.ensemble)
        return
    score_predictions()


def run_main() -> None:
    """The ``sct-evaluate`` console script (and ``python evaluate.py``)."""
    define_flags()
    app.run(guarded(main), flags_parser=parse_flags)


if __name__ == "__main__":
    run_main()
