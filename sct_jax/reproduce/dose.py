"""``sct-reproduce ... --dose``: the seed tables' dose columns.

Every row of a seed table (each model run, each baseline, the floor) is an sCT per test
case; with ``--dose`` each of them is also scored by dose, exactly as ``evaluate.py
--dose`` scores one: per test case a photon and a proton plan are optimised on the
reference CT (the default target, a 25 mm sphere at the body's centre of mass; the
default beams of :mod:`sct_jax.dose.engine`) and cached in ``<out>/dose/<case id>/``
(the plan's fingerprint covers the CT, the masks and the settings), then recomputed on
the row's sCT with the same beams and weights. The columns are the mean over the test
cases of the dose MAE in the CT's >= 90 % region (% of Rx) and the gamma pass rate at
2 %/2 mm (10 % cut-off), per modality.

A :class:`CaseDose` travels with each test case's
:class:`~sct_jax.reproduce.baselines.Reference`, so every row is scored by the same code
path whether it comes from a run, a cache or a baseline.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from sct_jax.data.io import Volume
from sct_jax.dose import compare, engine
from sct_jax.errors import RunFailed

TARGET_RADIUS_MM = 25.0
# Row key -> (modality, compare_doses' metric).
DOSE_METRICS = {
    "dose_mae_photon": ("photon", "dose_mae_percent_rx"),
    "gamma_photon": ("photon", "gamma_pass_2pct_2mm"),
    "dose_mae_proton": ("proton", "dose_mae_percent_rx"),
    "gamma_proton": ("proton", "gamma_pass_2pct_2mm"),
}


class CaseDose:
    """One test case's plans (made on first use, then cached on disk) and the dose
    metrics of any sCT of it.

    Args:
      case_id: the case (its folder name under ``folder``).
      ct: the reference CT (HU) with its affine and header.
      body: ``(X, Y, Z)`` bool body mask of the reference.
      folder: where this case's plans and last recomputed doses live.
      rx: prescription in Gy.
    """

    def __init__(self, case_id: str, ct: Volume, body: np.ndarray, folder: Path,
                 rx: float = 2.0):
        self.case_id = case_id
        self.ct = ct
        self.body = np.asarray(body, bool)
        self.target = engine.default_target(self.body, ct.affine, TARGET_RADIUS_MM)
        self.folder = Path(folder)
        self.rx = float(rx)
        # modality -> why the engine failed on this case: not retried for every row.
        self.failed: dict[str, str] = {}

    def __call__(self, sct: np.ndarray) -> dict[str, float]:
        """The :data:`DOSE_METRICS` of ``sct`` (``(X, Y, Z)`` HU on the CT's grid); a
        modality the engine fails on is NaN for this and every later sCT (the reason
        printed once)."""
        out = {key: math.nan for key in DOSE_METRICS}
        for modality in engine.MODALITIES:
            if modality in self.failed:
                continue
            try:
                result = compare.run_modality(self.ct, {"sct": np.asarray(sct, np.float32)},
                                              self.body, self.target, {}, modality,
                                              self.rx, self.folder, figures=False)
            except RunFailed as err:  # the other modality is still worth having
                self.failed[modality] = str(err)
                print(f"[dose] {self.case_id} {modality} failed, its columns are n/a: {err}",
                      file=sys.stderr, flush=True)
                continue
            metrics = result["scts"]["sct"]
            for key, (mod, name) in DOSE_METRICS.items():
                if mod == modality:
                    out[key] = float(metrics[name])
        return out

