"""The no-model references every evaluation is scored against.

A model has learned something from the MR only when it beats what needs no deep
network at all. Three baselines, each an sCT of the test case's grid with air
(-1000 HU) outside the body mask:

* **constant** (:func:`constant_sct`): every body voxel soft tissue (40 HU).
* **intensity lookup** (:class:`IntensityLookup`): HU as a piecewise-constant function
  of the normalised MR intensity, the simplest model that uses the MR. The MR is
  normalised as the models see it (per patient, percentiles inside the body mask to
  [-1, 1], :func:`sct_jax.data.preprocess.mr_to_unit` with ``data.mr_percentiles``);
  [-1, 1] is cut into :data:`LOOKUP_BINS` equal bins and each bin holds the mean HU of
  the training voxels (inside the training body masks) that fall into it. A bin no
  training voxel reached takes the linear interpolation of its nearest filled
  neighbours (the end value beyond the last one).
* **mean training CT** (:func:`mean_ct_on_boxes`): each training CT's body bounding box
  (air outside its body) resampled (linear, :func:`scipy.ndimage.zoom`) to the size of
  the test case's body bounding box, averaged, and placed on that box: a model that
  ignores the MR but knows the average anatomy. For data on one grid (heads in an atlas
  space) this is the plain voxel-wise mean.

With a CBCT input (SynthRAD Task 2, :mod:`sct_jax.data.modality`) a fourth:

* **the CBCT itself** (:func:`cbct_as_sct`): the CBCT's own HU (clipped to the CT's
  range, air outside the body) scored as the sCT: what doing nothing gives. Its offset,
  cupping, scatter and truncation are what a CBCT model has to remove.

And the **perfect-model floor** where the data provide it: the phantom's noise-free CT
in the MR's frame (``ct_ideal``, :func:`ideal_prediction`), what a model that recovers
the anatomy exactly would score (CT noise and, on misaligned cases, the misalignment).

The numeric cores work on arrays; :func:`fit_from_cases` fits both fitted baselines in
one pass over the training cases, one case in memory at a time, at most
:data:`MAX_TRAINING_CASES` of them. :func:`verdict` compares a model's means with the
best baseline's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from sct_jax.data import modality, synthrad
from sct_jax.data.io import VOLUME_SUFFIXES, load_volume
# The body-box helpers are shared with the mean-CT prior input (sct_jax.data.prior).
from sct_jax.data.prior import body_box, body_in_box, box_shape, place_in_body, resample_to  # noqa: F401
from sct_jax.errors import DataError

# The constant baseline: every body voxel soft tissue (muscle-like HU).
SOFT_TISSUE_HU = 40.0
AIR_HU = -1000.0
LOOKUP_BINS = 64
# Training cases read by the fitted baselines: enough for a stable mean, bounded time.
MAX_TRAINING_CASES = 32

# name -> the row label every report uses.
LABELS = {
    "constant": f"constant {SOFT_TISSUE_HU:g} HU in the body",
    "lookup": "intensity lookup (MR -> HU)",
    "mean_ct": "mean training CT",
    "cbct": "the CBCT itself (uncorrected HU)",
    "perfect": "perfect model (floor)",
}


def labels_for(input_kind: str = "mr") -> dict[str, str]:
    """:data:`LABELS` with the lookup named after its input (``MR`` or ``CBCT``)."""
    return {**LABELS, "lookup": f"intensity lookup ({modality.LABEL[input_kind]} -> HU)"}


# Lower is better for these; higher for the rest of the verdict's metrics.
VERDICT_METRICS = {"mae": ("MAE", "HU", "{:.1f}", min), "ssim": ("SSIM", "", "{:.4f}", max)}


def constant_sct(mask: np.ndarray, hu: float = SOFT_TISSUE_HU) -> np.ndarray:
    """``(X, Y, Z)`` float32: ``hu`` inside the body mask, air outside."""
    return np.where(np.asarray(mask, bool), np.float32(hu), np.float32(AIR_HU))


# -- intensity lookup --------------------------------------------------------------


def lookup_bins(unit_mr: np.ndarray, bins: int = LOOKUP_BINS) -> np.ndarray:
    """Bin index ``floor((u + 1) / 2 * bins)`` of normalised MR values ``u`` in [-1, 1]
    (1 falls into the last bin; values beyond are clipped to the end bins)."""
    index = np.floor((np.asarray(unit_mr, np.float64) + 1.0) * (bins / 2.0))
    return np.clip(index, 0, bins - 1).astype(np.intp)


@dataclasses.dataclass(frozen=True)
class IntensityLookup:
    """HU per bin of the normalised MR.

    Attributes:
      hu: ``(bins,)`` float64, the HU of each bin (empty bins filled).
      counts: ``(bins,)`` the training voxels each bin was fitted on (0: filled).
    """

    hu: np.ndarray
    counts: np.ndarray

    def predict(self, unit_mr: np.ndarray, body: np.ndarray) -> np.ndarray:
        """``(X, Y, Z)`` float32 sCT: the bin's HU inside ``body``, air outside."""
        values = self.hu[lookup_bins(unit_mr, self.hu.size)].astype(np.float32)
        return np.where(np.asarray(body, bool), values, np.float32(AIR_HU))


class LookupFit:
    """Accumulates per-bin HU sums and counts over training pairs."""

    def __init__(self, bins: int = LOOKUP_BINS):
        self.sums = np.zeros(bins, np.float64)
        self.counts = np.zeros(bins, np.int64)

    def add(self, unit_mr: np.ndarray, ct: np.ndarray, mask: np.ndarray) -> None:
        mask = np.asarray(mask, bool)
        index = lookup_bins(np.asarray(unit_mr)[mask], self.sums.size)
        self.sums += np.bincount(index, weights=np.asarray(ct, np.float64)[mask],
                                 minlength=self.sums.size)
        self.counts += np.bincount(index, minlength=self.sums.size)

    def result(self) -> IntensityLookup:
        filled = self.counts > 0
        if not filled.any():
            raise DataError("intensity lookup: no training voxel inside a body mask")
        centres = np.arange(self.sums.size, dtype=np.float64)
        means = self.sums[filled] / self.counts[filled]
        hu = np.interp(centres, centres[filled], means)
        return IntensityLookup(hu=hu, counts=self.counts.copy())


def fit_intensity_lookup(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                         bins: int = LOOKUP_BINS) -> IntensityLookup:
    """Fits the lookup on ``(unit_mr, ct, mask)`` training triples (MR already
    normalised to [-1, 1], CT in HU, body mask), read one at a time."""
    fit = LookupFit(bins)
    for unit_mr, ct, mask in pairs:
        fit.add(unit_mr, ct, mask)
    return fit.result()


# -- mean training CT --------------------------------------------------------------


class MeanCtFit:
    """Accumulates the training CTs' body boxes resampled to each target box shape."""

    def __init__(self, box_shapes: Sequence[Sequence[int]]):
        self.shapes = [tuple(int(n) for n in s) for s in box_shapes]
        self.sums = [np.zeros(s, np.float64) for s in self.shapes]
        self.n = 0

    def add(self, ct: np.ndarray, mask: np.ndarray) -> None:
        body = body_in_box(ct, mask)
        for total, shape in zip(self.sums, self.shapes):
            total += resample_to(body, shape)
        self.n += 1

    def result(self) -> list[np.ndarray]:
        if self.n == 0:
            raise DataError("mean training CT: no training case")
        return [(total / self.n).astype(np.float32) for total in self.sums]


def mean_ct_on_boxes(pairs: Iterable[tuple[np.ndarray, np.ndarray]],
                     box_shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The mean of the training CTs' body boxes, resampled to each of ``box_shapes``.

    Args:
      pairs: ``(ct, mask)`` training CTs (HU) and body masks, read one at a time.
      box_shapes: the body bounding-box shapes of the test cases.

    Returns:
      One float32 array of each shape in ``box_shapes``.
    """
    fit = MeanCtFit(box_shapes)
    for ct, mask in pairs:
        fit.add(ct, mask)
    return fit.result()


# -- from cases --------------------------------------------------------------------


def find_volume(case_dir, stem):
    for suffix in VOLUME_SUFFIXES:
        path = case_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def cbct_as_sct(cbct: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The CBCT as its own sCT: its HU clipped to the CT's range, air outside the body.

    Args:
      cbct: ``(X, Y, Z)`` CBCT in HU.
      mask: ``(X, Y, Z)`` bool body mask.
    """
    hu = np.clip(np.asarray(cbct, np.float32), -1024.0, 3071.0)
    return np.where(np.asarray(mask, bool), hu, np.float32(AIR_HU)).astype(np.float32)


def ideal_prediction(case: synthrad.Case) -> np.ndarray | None:
    """A phantom case's noise-free CT in the MR's frame (``ct_ideal``), or None."""
    path = find_volume(case.dir, "ct_ideal")
    return None if path is None else load_volume(path).data.astype(np.float32)


def unit_mr(config, data: synthrad.CaseData) -> np.ndarray:
    """The case's input (MR, or CBCT) normalised as the models see it
    (:mod:`sct_jax.data.modality`: MR percentiles inside its body mask, or the CBCT's
    fixed HU window), float32 in [-1, 1]."""
    return modality.spec(config).to_unit(data.mr.data, data.mask)


def training_cases(cases: Sequence[synthrad.Case],
                   max_cases: int = MAX_TRAINING_CASES) -> list[synthrad.Case]:
    """The training cases the fitted baselines read: those with a CT, the first
    ``max_cases``."""
    return [c for c in cases if c.ct is not None][:max_cases]


@dataclasses.dataclass(frozen=True)
class FittedBaselines:
    """The fitted baselines of a set of test boxes.

    Attributes:
      lookup: the intensity lookup.
      mean_boxes: the mean training CT on each test box (order of the boxes given).
      n_training: the training cases they were fitted on.
    """

    lookup: IntensityLookup
    mean_boxes: list[np.ndarray]
    n_training: int


def fit_from_cases(config, train_cases: Sequence[synthrad.Case],
                   box_shapes: Sequence[Sequence[int]],
                   max_cases: int = MAX_TRAINING_CASES) -> FittedBaselines:
    """Fits the intensity lookup and the mean training CT in one pass over the
    training cases (one loaded at a time).

    Args:
      config: the run's config (``data.mr_percentiles``).
      train_cases: the training split; the first ``max_cases`` with a CT are read.
      box_shapes: the test cases' body bounding-box shapes (:func:`box_shape`).

    Raises:
      DataError: no training case with a CT, or a case that does not load.
    """
    cases = training_cases(train_cases, max_cases)
    if not cases:
        raise DataError("no training case with a CT to fit the baselines on")
    lookup, mean = LookupFit(), MeanCtFit(box_shapes)
    for case in cases:
        data = synthrad.load_case(case)
        lookup.add(unit_mr(config, data), data.ct.data, data.mask)
        mean.add(data.ct.data, data.mask)
    return FittedBaselines(lookup.result(), mean.result(), len(cases))


def case_predictions(config, test_cases: Sequence[synthrad.Case],
                     train_cases: Sequence[synthrad.Case] | None,
                     max_cases: int = MAX_TRAINING_CASES,
                     ) -> Iterator[tuple[synthrad.Case, synthrad.CaseData, dict[str, np.ndarray]]]:
    """Every baseline's sCT of each test case, one case at a time.

    Args:
      config: the run's config.
      test_cases: the cases to predict (each needs an MR and a mask or a body in the MR).
      train_cases: the training split for the fitted baselines; ``None`` or empty:
        only the constant (and the floor).
      max_cases: training cases read at most.

    Yields:
      ``(case, data, {name: sct})`` with names of :data:`LABELS`: ``constant`` always,
      ``lookup`` and ``mean_ct`` when fitted, ``cbct`` for a CBCT case, ``perfect``
      when the case has a ``ct_ideal``.
    """
    fitted = None
    if train_cases:
        shapes = [box_shape(synthrad.load_case(c).mask) for c in test_cases]
        fitted = fit_from_cases(config, train_cases, shapes, max_cases)
    for k, case in enumerate(test_cases):
        data = synthrad.load_case(case)
        preds = {"constant": constant_sct(data.mask)}
        if fitted is not None:
            preds["lookup"] = fitted.lookup.predict(unit_mr(config, data), data.mask)
            preds["mean_ct"] = place_in_body(fitted.mean_boxes[k], data.mask)
        if case.input == "cbct":
            preds["cbct"] = cbct_as_sct(data.mr.data, data.mask)
        ideal = ideal_prediction(case)
        if ideal is not None and ideal.shape == data.mask.shape:
            preds["perfect"] = ideal
        yield case, data, preds


# -- verdict -----------------------------------------------------------------------


def _fmt(metric: str, value: float) -> str:
    name, unit, number, _ = VERDICT_METRICS[metric]
    text = number.format(value) if math.isfinite(value) else str(value)
    return f"{text} {unit}".rstrip()


def verdict(model: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]],
            labels: Mapping[str, str] | None = None) -> dict:
    """Whether the model beats the best baseline in MAE and in SSIM.

    Args:
      model: the model's mean metrics (``mae``, ``ssim``).
      baselines: baseline name -> its mean metrics over the same cases (the
        ``perfect`` floor, if present, is not a baseline and is ignored).
      labels: name -> label for the text (default :data:`LABELS`).

    Returns:
      ``{"line", "warnings", "beats_best_baseline": {metric: bool},
      "best_baseline": {metric: {"name", "label", "value"}}, "model": {metric: value}}``.
      A NaN model value, or a tie, does not beat.
    """
    labels = dict(LABELS, **(labels or {}))
    candidates = {n: b for n, b in baselines.items() if n != "perfect"}
    if not candidates:
        raise ValueError("verdict: no baseline")
    beats, best, parts, warnings = {}, {}, [], []
    for metric, (title, _, _, better) in VERDICT_METRICS.items():
        scored = {n: float(b[metric]) for n, b in candidates.items()
                  if not math.isnan(float(b[metric]))}
        value = float(model[metric])
        if not scored:
            beats[metric] = None
            parts.append(f"{title}: no baseline score")
            continue
        name = better(scored, key=scored.get)
        ref = scored[name]
        won = not math.isnan(value) and better(value, ref) == value and value != ref
        beats[metric] = won
        best[metric] = {"name": name, "label": labels[name], "value": ref}
        numbers = f"model {_fmt(metric, value)} vs {labels[name]} {_fmt(metric, ref)}"
        if won:
            parts.append(f"{title} beats the best baseline ({numbers})")
        else:
            parts.append(f"{title} does NOT beat the best baseline ({numbers})")
            warnings.append(f"WARNING: the model does not beat the {labels[name]} in "
                            f"{title}: model {_fmt(metric, value)}, {labels[name]} "
                            f"{_fmt(metric, ref)}")
    return {"line": "verdict: " + "; ".join(parts), "warnings": warnings,
            "beats_best_baseline": beats, "best_baseline": best,
            "model": {m: float(model[m]) for m in VERDICT_METRICS}}
