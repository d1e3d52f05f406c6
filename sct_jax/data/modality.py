"""The model's input modality: an MR (SynthRAD Task 1) or a cone-beam CT (Task 2).

``config.data.input`` picks it (``"mr"``, the default, or ``"cbct"``) and everything that
reads an input volume asks this module how: which file a case folder holds it in
(``mr`` / ``cbct``), under which task folder (``Task1`` / ``Task2``), and how it is
normalised to the models' ``[-1, 1]``:

- MR intensities have no units: each MR is normalised by its own robust percentiles
  inside the body (``data.mr_percentiles``).
- A CBCT is in HU, but unreliable ones (scatter, cupping, a scanner-specific offset and
  scale): it is mapped by a fixed HU window (``data.cbct_window``, default the CT's), so
  the model sees the HU the scanner wrote and learns the correction. Per-image
  percentiles would erase the offset the model has to learn, and with it the units.
  A CBCT is checked for HU units like a CT (:mod:`sct_jax.data.hu`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sct_jax.data import preprocess
from sct_jax.errors import ConfigError

INPUTS = ("mr", "cbct")
TASK = {"mr": 1, "cbct": 2}
LABEL = {"mr": "MR", "cbct": "CBCT"}
DEFAULT_CBCT_WINDOW = (preprocess.HU_MIN, preprocess.HU_MAX)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How an input volume becomes model units.

    Attributes:
      kind: ``"mr"`` or ``"cbct"``.
      percentiles: MR: the ``(low, high)`` percentiles inside the body mapped to -1, 1.
      window: CBCT: the ``(low, high)`` HU mapped to -1, 1 (values beyond clipped).
    """

    kind: str = "mr"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = DEFAULT_CBCT_WINDOW

    @property
    def task(self) -> int:
        """The SynthRAD task of this input (1: MR -> CT, 2: CBCT -> CT)."""
        return TASK[self.kind]

    @property
    def stem(self) -> str:
        """The input's file name in a case folder (``mr`` or ``cbct``)."""
        return self.kind

    @property
    def label(self) -> str:
        """``MR`` or ``CBCT``, for messages, reports and figures."""
        return LABEL[self.kind]

    def to_unit(self, volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """``(X, Y, Z)`` input -> float32 ``[-1, 1]`` of the same shape.

        Args:
          volume: the MR (scanner units) or CBCT (HU).
          mask: ``(X, Y, Z)`` bool body mask (the MR percentiles are taken inside it);
            ``None``: the whole volume.
        """
        if self.kind == "mr":
            lo, hi = self.percentiles
            return preprocess.mr_to_unit(volume, mask, lo_pct=lo, hi_pct=hi)
        lo, hi = self.window
        x = np.clip(np.asarray(volume, np.float64), lo, hi)
        return ((x - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)

    def key(self) -> str:
        """What the normalisation depends on (prepared-data cache keys)."""
        if self.kind == "mr":
            return repr(tuple(float(p) for p in self.percentiles))
        return f"cbct{tuple(float(w) for w in self.window)!r}"

    def describe(self) -> str:
        """One sentence for model cards: how the input is normalised."""
        if self.kind == "mr":
            lo, hi = self.percentiles
            return (f"MR, percentiles {lo:g} and {hi:g} inside the body mask mapped to -1 "
                    "and 1 (clipped beyond)")
        lo, hi = self.window
        return f"CBCT in HU, the fixed window [{lo:g}, {hi:g}] HU mapped to [-1, 1] (clipped)"


def input_kind(config) -> str:
    """``config.data.input`` (``"mr"`` when the config predates the key)."""
    return str(config.data.get("input", "mr"))


def spec(config) -> InputSpec:
    """The config's :class:`InputSpec`.

    Raises:
      ConfigError: an unknown ``data.input``, bad MR percentiles or a bad CBCT window.
    """
    kind = input_kind(config)
    if kind not in INPUTS:
        raise ConfigError(f"config.data.input={kind!r}: expected one of {', '.join(INPUTS)}")
    lo, hi = (float(p) for p in config.data.mr_percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        raise ConfigError(f"config.data.mr_percentiles={(lo, hi)}: need 0 <= low < high "
                          "<= 100")
    window = tuple(float(w) for w in config.data.get("cbct_window", DEFAULT_CBCT_WINDOW))
    if len(window) != 2 or not (np.all(np.isfinite(window)) and window[0] < window[1]):
        raise ConfigError(f"config.data.cbct_window={window}: need two finite HU values, "
                          "low < high")
    return InputSpec(kind, (lo, hi), window)
