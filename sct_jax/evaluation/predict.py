"""Predict the evaluation split of a trained run, write sCT NIfTIs, score and draw them.

``predict_split(config, workdir)`` restores the latest checkpoint, predicts every case
of ``config.eval.split`` (2D models slice by slice, 3D models by sliding windows),
writes ``<out>/<id>/sct.nii.gz`` in HU on the MR's grid (affine and header), and
returns the prediction folder; ``evaluate.py`` then scores it with the SynthRAD2023
metrics and draws a panel per case.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import numpy as np

from sct_jax import methods
from sct_jax.data import preprocess, synthrad
from sct_jax.data.io import save_like
from sct_jax.evaluation import inference
from sct_jax.training import data as train_data
from sct_jax.training import loop

log = logging.getLogger(__name__)


def make_volume_predictor(config, state):
    """``(X, Y, Z)`` normalised MR -> ``(X, Y, Z)`` prediction in [-1, 1]."""
    method = methods.get_method(config.method)
    predict = jax.jit(functools.partial(method.predict, config))

    def call(batch: np.ndarray) -> np.ndarray:
        return np.asarray(predict(state, batch))

    if config.data.mode == "patches":
        return functools.partial(inference.predict_volume_3d, call,
                                 patch=tuple(config.data.patch), overlap=config.eval.overlap,
                                 batch_size=config.eval.batch_size)
    return functools.partial(inference.predict_volume_2d, call, crop=tuple(config.data.crop),
                             context=config.data.context, batch_size=config.eval.batch_size)


def eval_cases(config, data_root: str | Path | None = None) -> list[synthrad.Case]:
    """The cases of ``config.eval.split`` (all cases of ``data_root`` when it is given)."""
    if data_root:
        cases = synthrad.discover_cases(Path(data_root), region=config.data.region or None)
        synthrad.validate_cases(cases)
    else:
        cases = train_data.case_splits(config)[config.eval.split]
    if config.eval.max_cases:
        cases = cases[:config.eval.max_cases]
    return cases


def predict_case(predict_volume, config, case_data: synthrad.CaseData) -> np.ndarray:
    """One case's sCT in HU, ``(X, Y, Z)`` float32 on the MR's grid."""
    lo, hi = config.data.mr_percentiles
    mr = preprocess.mr_to_unit(case_data.mr.data, case_data.mask, lo_pct=lo, hi_pct=hi)
    unit = predict_volume(np.asarray(mr, np.float32))
    return np.asarray(preprocess.unit_to_ct(unit), np.float32)


def predict_split(config, workdir: str | Path, data_root: str | Path | None = None,
                  out_dir: str | Path | None = None) -> tuple[Path, list[synthrad.Case]]:
    """Predicts the evaluation cases and writes their sCT NIfTIs.

    Args:
      config: the run's config.
      workdir: the training run directory (checkpoints, batch_spec.json).
      data_root: score these cases instead of the config's evaluation split.
      out_dir: where to write ``<id>/sct.nii.gz`` (default ``workdir/predictions``).

    Returns:
      ``(out_dir, cases)``.
    """
    workdir = Path(workdir)
    out_dir = Path(out_dir) if out_dir else workdir / "predictions"
    cases = eval_cases(config, data_root)
    step, state = loop.load_state(config, workdir)
    log.info("predicting %d cases with the step-%d checkpoint", len(cases), step)
    predict_volume = make_volume_predictor(config, state)
    for case in cases:
        case_data = synthrad.load_case(case)
        sct = predict_case(predict_volume, config, case_data)
        save_like(out_dir / case.id / "sct.nii.gz", sct, case_data.mr)
    return out_dir, cases
