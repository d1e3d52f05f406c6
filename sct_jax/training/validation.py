"""Validation while training: whole validation volumes through the evaluation path.

Every ``config.train.eval_every`` steps (0: never, and always at the last step when on)
the loop hands the current state to :meth:`Validator.evaluate`, which predicts every
case of the validation split (the first ``config.train.eval_cases`` of it; 0: all) as
``evaluate.py`` does (:func:`sct_jax.inference.predict.predict_case`: onto the training
grid, per-patient MR normalisation, slice-by-slice or sliding-window inference, back to
HU on the MR's grid)
and scores it with :func:`sct_jax.metrics.synthrad_metrics`. The case means
are logged as ``val/mae``, ``val/psnr``, ``val/ssim``, ``val/dice_bone``,
``val/mae_bone`` and ``val/me`` (JSON lines and TensorBoard), the pass's wall time as
``val/seconds``; the checkpoint of that step is saved with ``val_mae`` so that orbax
keeps the best one (see :mod:`sct_jax.runs.checkpoint`).

Every ``config.train.image_every`` steps :meth:`Validator.images` draws one fixed
validation slice (the first case's axial slice at the centre of its body): ``val/mr``,
``val/ct``, ``val/sct`` and ``val/abs_error_hu``, with fixed display windows so that
panels of different steps compare.

The validation volumes are loaded once, when training starts (before anything is
written), and kept in memory: keep the split small or cap it with
``config.train.eval_cases``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import numpy as np

from sct_jax import methods
from sct_jax import metrics as metrics_lib
from sct_jax.data import datasets, synthrad
from sct_jax.data import geometry as geometry_lib
from sct_jax.errors import ConfigError
from sct_jax.inference import predict as predict_lib

log = logging.getLogger(__name__)

# The case means logged (names of synthrad_metrics), as val/<name>.
LOGGED = ("mae", "psnr", "ssim", "dice_bone", "mae_bone", "me")
# Display windows of the image summaries: (lo, hi) mapped to black..white.
CT_WINDOW_HU = (-1000.0, 1500.0)
ERROR_WINDOW_HU = (0.0, 500.0)


def is_due(every: int, step: int, total: int) -> bool:
    """Whether an every-N-steps action runs at ``step`` (0: never; always at the last)."""
    return every > 0 and (step % every == 0 or step == total)


def validation_cases(config) -> list[synthrad.Case]:
    """The cases validated: the ``val`` split, its first ``config.train.eval_cases``."""
    cases = [c for c in datasets.case_splits(config)["val"] if c.ct is not None]
    limit = int(config.train.eval_cases)
    return cases[:limit] if limit > 0 else cases


class Validator:
    """Predicts and scores the validation volumes of a run with a state in memory.

    Args:
      config: the run's config.
      cases: the validation cases (with CT).
      geometry: the run's training geometry (``None``: read from the config's data, as
        evaluation does for a run without a record).

    Raises:
      ConfigError: no validation case, or a method that does not predict sCT.
      DataError: a validation case that cannot be loaded.
    """

    def __init__(self, config, cases: list[synthrad.Case], geometry: Any = None):
        if not cases:
            raise ConfigError(
                f"config.train.eval_every={config.train.eval_every}: the validation split "
                f"is empty (config.data.split={tuple(config.data.split)}); give it cases "
                "or set config.train.eval_every=0 and config.train.image_every=0")
        self.config = config
        self.method = methods.get_method(config.method)
        self.cases = list(cases)
        self.data = [synthrad.load_case(c) for c in self.cases]
        self.geometry = geometry if geometry is not None else geometry_lib.from_config(config)
        # One compilation of the method's predict for every pass and every case.
        self._predict = jax.jit(functools.partial(self.method.predict, config))
        mask = self.data[0].mask
        zs = np.flatnonzero(mask.any(axis=(0, 1)))
        self.slice_index = int(zs[len(zs) // 2]) if zs.size else mask.shape[2] // 2

    def predict(self, state: Any, index: int) -> np.ndarray:
        """Case ``index``'s sCT in HU, ``(X, Y, Z)`` float32 on its MR's grid."""
        volume = predict_lib.make_volume_predictor(self.config, state,
                                                   jitted_predict=self._predict)
        return predict_lib.predict_case(volume, self.config, self.data[index], self.geometry)

    def evaluate(self, state: Any) -> tuple[dict[str, float], np.ndarray]:
        """One validation pass.

        Returns:
          ``({"val/<metric>": case mean, ..., "val/seconds": wall time}, sCT of the
          first case)``; the sCT lets an image summary of the same step skip a
          prediction.
        """
        t0 = time.perf_counter()
        rows, first = [], None
        for i, case_data in enumerate(self.data):
            sct = self.predict(state, i)
            if first is None:
                first = sct
            rows.append(metrics_lib.synthrad_metrics(case_data.ct.data, sct, case_data.mask))
        out = {}
        for name in LOGGED:
            values = np.array([r[name] for r in rows], np.float64)
            values = values[~np.isnan(values)]  # a tissue class absent from a case
            if values.size:
                out[f"val/{name}"] = float(values.mean())
        out["val/seconds"] = time.perf_counter() - t0
        return out, first

    def images(self, state: Any, sct: np.ndarray | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
        """The fixed validation slice: MR, CT, sCT and |sCT - CT| (HU) in the body.

        Args:
          state: the current state.
          sct: the first case's sCT when already predicted at this step.

        Returns:
          ``({name: (rows, cols) float32}, {name: display window})``; rows run
          anterior to posterior as in the evaluation panels.
        """
        data = self.data[0]
        if sct is None:
            sct = self.predict(state, 0)
        z = self.slice_index

        def cut(plane):  # (X, Y) -> rows along Y, upside down as the panels show it
            return np.ascontiguousarray(np.asarray(plane, np.float32).T[::-1])

        mr, ct = data.mr.data, data.ct.data
        lo, hi = np.percentile(mr[data.mask], [0.5, 99.5])
        error = np.abs(sct[:, :, z] - ct[:, :, z]) * data.mask[:, :, z]
        images = {"val/mr": cut(mr[:, :, z]), "val/ct": cut(ct[:, :, z]),
                  "val/sct": cut(sct[:, :, z]), "val/abs_error_hu": cut(error)}
        ranges = {"val/mr": (float(lo), float(hi)), "val/ct": CT_WINDOW_HU,
                  "val/sct": CT_WINDOW_HU, "val/abs_error_hu": ERROR_WINDOW_HU}
        return images, ranges


def build(config, geometry: Any = None) -> Validator | None:
    """The run's :class:`Validator`; None when neither validation nor images need one.

    Args:
      config: the run's config.
      geometry: the run's training geometry (see :class:`Validator`).

    Raises:
      ConfigError: ``config.train.eval_every`` set for a method that predicts no sCT,
        or an empty validation split.
    """
    eval_every = int(config.train.eval_every)
    image_every = int(config.train.image_every)
    if eval_every <= 0 and image_every <= 0:
        return None
    if methods.get_method(config.method).not_an_sct_model(config):
        if eval_every > 0:
            raise ConfigError(f"config.train.eval_every={eval_every}: config.method="
                              f"{config.method!r} does not predict sCT; set it to 0")
        return None  # the method's own image summaries only
    return Validator(config, validation_cases(config), geometry)


def announce(step: int, values: dict[str, float], n_cases: int, echo=print) -> None:
    """One line per validation pass: the numbers and what the pass cost."""
    parts = [f"MAE {values['val/mae']:.1f} HU" if "val/mae" in values else "",
             f"PSNR {values['val/psnr']:.2f} dB" if "val/psnr" in values else "",
             f"SSIM {values['val/ssim']:.3f}" if "val/ssim" in values else ""]
    echo(f"step {step}: validation {', '.join(p for p in parts if p)} "
         f"({n_cases} case{'s' if n_cases != 1 else ''}, {values['val/seconds']:.1f} s)")


def checkpoint_metrics(values: dict[str, float]) -> dict[str, float] | None:
    """What ranks the step's checkpoint: ``{"val_mae"}``, or None when not finite."""
    mae = values.get("val/mae")
    if mae is None or not np.isfinite(mae):
        return None
    return {"val_mae": float(mae)}
