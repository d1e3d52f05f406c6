"""What ``train.py`` and ``evaluate.py`` run: train, predict, score, draw.

``train_and_maybe_evaluate`` trains a config into a workdir (resuming if it holds a
checkpoint); ``evaluate_run`` predicts the evaluation split, writes sCT NIfTIs, scores
them with the SynthRAD2023 metrics next to a constant soft-tissue baseline, draws a
panel per case, and (``qa=True``) runs the reference-free QA checks on every case;
``demo`` is the no-argument CPU run of the README.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from sct_jax.data import synthrad
from sct_jax.data.io import atomic_write_text, load_volume
from sct_jax.errors import ConfigError
from sct_jax.evaluation import figures, metrics, qa_report, report_html, scoring
from sct_jax.inference import predict
from sct_jax.io_guard import refuse_overwrite
from sct_jax.training import data as train_data
from sct_jax.training import loop

log = logging.getLogger(__name__)

# The checkout holding configs/ (this file is sct_jax/cli/run.py).
REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = "configs/pix2pix_pelvis.py:small"
# The "no model" reference: every body voxel set to soft tissue (muscle-like HU).
SOFT_TISSUE_HU = 40.0


def default_workdir(config) -> Path:
    return Path("runs") / (config.name or config.method)


def train_and_maybe_evaluate(config, workdir: str | Path | None, evaluate: bool = False):
    workdir = Path(workdir) if workdir else default_workdir(config)
    result = loop.train(config, workdir)
    print(f"trained {config.name or config.method} to step {result.step} in {workdir} "
          f"(train_step compiled in {result.compile_s:.1f}s)")
    from sct_jax.export import model_files
    model_dir = model_files.export_model(workdir, workdir / "model")
    print(f"exported the model to {model_dir} (sct-predict -m {model_dir})")
    if evaluate:
        evaluate_run(config, workdir)
    return result


# Settings that may differ between training and evaluation without changing the model.
_EVAL_FREE_PREFIXES = ("eval.", "train.", "mesh.")


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def run_config(config, workdir: str | Path):
    """The config to evaluate ``workdir`` with.

    ``None``: the run's own ``config.json``. A given config must match it on every key
    that shapes the model or its data (``eval.*``, ``train.*`` and ``mesh.*`` may
    differ); otherwise one :class:`ConfigError` line names the differing keys.
    """
    from sct_jax.export.model import read_run_config

    workdir = Path(workdir)
    if config is None:
        return read_run_config(workdir)
    stored_path = workdir / "config.json"
    if not stored_path.is_file():
        return config  # no run here: loading the checkpoint reports it
    stored = _flatten(json.loads(stored_path.read_text()))
    given = _flatten(json.loads(config.to_json_best_effort()))
    differing = sorted(k for k in set(stored) | set(given)
                       if not k.startswith(_EVAL_FREE_PREFIXES)
                       and stored.get(k, "<absent>") != given.get(k, "<absent>"))
    if differing:
        shown = ", ".join(f"{k} (run: {stored.get(k, '<absent>')!r}, given: "
                          f"{given.get(k, '<absent>')!r})" for k in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ConfigError(f"{stored_path}: --config does not match the run: {shown}{more}; "
                          "leave --config out to use the run's own config")
    return config


def baseline_scores(cases: list[synthrad.Case]) -> dict[str, float]:
    """Mean SynthRAD metrics of a constant soft-tissue sCT on ``cases`` (a floor to beat)."""
    rows = []
    for case in cases:
        ct = load_volume(case.ct).data
        mask = synthrad.load_case(case).mask
        const = np.where(mask, SOFT_TISSUE_HU, -1000.0).astype(np.float32)
        rows.append(metrics.synthrad_metrics(ct, const, mask))
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def check_outputs(config, workdir: Path, data_root, out) -> None:
    """Refuses (exit 2, before any prediction) outputs that would land on an input:
    ``<workdir>/predictions/<id>/`` or ``--out`` inside a case folder or onto a file."""
    root = Path(data_root) if data_root else train_data.dataset_root(config)
    if not root.is_dir():
        return  # the phantom is generated later; a missing --data root is reported there
    # Every case of the root (a superset of the split, and no volume is read).
    cases = synthrad.discover_cases(root, region=config.data.region or None)
    inputs = [p for c in cases for p in (c.mr, c.ct, c.mask) if p is not None]
    pred_dir = workdir / "predictions"
    for case in cases:
        for name in ("sct.nii.gz", "sct_std.nii.gz"):
            refuse_overwrite(pred_dir / case.id / name, inputs, root, what="prediction")
    json_path, csv_path = scoring.output_paths(pred_dir, out)
    for path in (json_path, csv_path):
        refuse_overwrite(path, inputs, root, what="--out")


def evaluate_run(config, workdir: str | Path, data_root: str | Path | None = None,
                 out: str | Path | None = None, panels: bool | None = None,
                 samples: int = 1, qa: bool = False, checkpoint: int | str = "best"):
    """Predicts, scores and draws the evaluation cases of a trained run.

    Args:
      config: the run's config.
      workdir: the training run directory.
      data_root: score these cases instead of the config's evaluation split.
      out: JSON summary path (default ``workdir/predictions/metrics.json``).
      panels: draw a PNG per case (default ``config.eval.panels``).
      samples: sCT samples per case for sampling methods (the LDM; the GANs by
        test-time dropout): the mean is scored, the per-voxel standard deviation
        written as ``<id>/sct_std.nii.gz``.
      qa: then run the fidelity checks on every case
        (:func:`sct_jax.evaluation.qa_report.qa_predictions`): ``<id>/qa.json`` and
        ``<id>/qa.png``, and a case x check table.
      checkpoint: ``"best"`` (the lowest validation MAE; the latest when the run was
        never validated), ``"latest"`` or a step number.

    Returns:
      The :class:`scoring.ScoreReport`.
    """
    workdir = Path(workdir)
    check_outputs(config, workdir, data_root, out)
    t0 = time.perf_counter()
    step = loop.resolve_checkpoint(config, workdir, checkpoint)
    pred_dir, cases = predict.predict_split(config, workdir, data_root=data_root,
                                            samples=samples, checkpoint=step)
    print(f"predicted {len(cases)} case(s) with the step-{step} checkpoint ({checkpoint}) "
          f"in {time.perf_counter() - t0:.1f}s -> {pred_dir}")
    root = Path(data_root) if data_root else train_data.dataset_root(config)
    # Only this call's predictions: a file left by an earlier call is never scored.
    report = scoring.evaluate_folder(pred_dir, root, out=out,
                                     region=config.data.region or None,
                                     case_ids=[c.id for c in cases])
    json_path, _ = scoring.output_paths(pred_dir, out)
    with_ct = [c for c in cases if c.ct is not None]
    base = None
    if with_ct:
        base = baseline_scores(with_ct)
        atomic_write_text(json_path.with_name(json_path.stem + "_baseline.json"),
                          json.dumps({"baseline": f"constant {SOFT_TISSUE_HU:g} HU in the body",
                                      "mean": base}, indent=2))
        print(f"baseline (constant {SOFT_TISSUE_HU:g} HU soft tissue): MAE {base['mae']:.1f} HU, "
              f"PSNR {base['psnr']:.2f} dB, SSIM {base['ssim']:.4f}")
    panel_png, std_png = {}, {}
    if config.eval.panels if panels is None else panels:
        scores = {c.id: c.metrics for c in report.cases}
        for case in cases:
            data = synthrad.load_case(case)
            sct = load_volume(pred_dir / case.id / "sct.nii.gz").data
            m = scores.get(case.id)
            title = case.id + (f"  MAE {m['mae']:.1f} HU  PSNR {m['psnr']:.2f} dB  "
                               f"SSIM {m['ssim']:.3f}" if m else "")
            figures.save_case_panel(pred_dir / case.id / "panel.png", data.mr.data,
                                    data.ct.data if data.ct is not None else None, sct,
                                    data.mask, spacing=data.mr.spacing, title=title)
            panel_png[case.id] = (pred_dir / case.id / "panel.png").read_bytes()
        print(f"panels: {pred_dir}/<id>/panel.png")
    if samples > 1:
        for case in cases:
            std = load_volume(pred_dir / case.id / "sct_std.nii.gz").data
            std_png[case.id] = report_html.std_map_png(std, synthrad.load_case(case).mask)
    verdicts = None
    if qa:
        qa_reports = qa_report.qa_predictions(config, workdir, pred_dir, cases,
                                              samples=samples, checkpoint=step)
        verdicts = {case_id: r["status"] for case_id, r in qa_reports.items()}
    page = report_html.write(
        report_html.path_for(json_path), report, title=config.name or config.method,
        baseline=base, baseline_label=f"constant {SOFT_TISSUE_HU:g} HU in the body (baseline)",
        qa=verdicts, panels=panel_png, std_maps=std_png,
        notes=(f"{workdir}: step-{step} checkpoint ({checkpoint}); "
               f"{samples} sample(s) per case; data {root}",))
    print(f"report: {page}")
    return report


def demo(workdir: str | Path | None = None):
    """The README's first command: phantom data, pix2pix ``small``, then evaluation."""
    from sct_jax.config_utils import load_config_file

    config = load_config_file(str(REPO / DEMO_CONFIG))
    workdir = Path(workdir) if workdir else default_workdir(config)
    print(f"sct_jax demo: {DEMO_CONFIG} on the built-in phantom pelvis data "
          f"(cached under {train_data.cache_root(config)}), run directory {workdir}")
    t0 = time.perf_counter()
    train_and_maybe_evaluate(config, workdir, evaluate=True)
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min.\n"
          "Full configs (GPU/TPU recommended):\n"
          "  python train.py --config configs/pix2pix_pelvis.py --workdir runs/pix2pix_pelvis\n"
          "  python train.py --config configs/pix2pix3d_pelvis.py --workdir runs/pix2pix3d\n"
          "  python evaluate.py --config configs/pix2pix_pelvis.py --workdir runs/pix2pix_pelvis\n"
          "Your own SynthRAD2023 data: add --config.data.root=/path/to/synthrad")
