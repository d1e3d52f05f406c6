"""Test-time augmentation and ensembles: many predictions of one MR, one mean sCT.

An sCT can be the mean of several *draws*, each an sCT in HU on the MR's grid:

- the members of an ensemble (models of one input kind and one training grid, e.g. the
  seeds of a config: :func:`check_members`);
- per member, the views of test-time augmentation (TTA, :func:`tta_views`): the input
  as is and flipped the ways training flipped it
  (:func:`sct_jax.data.datasets.augmentation_flips`: left-right today), each
  prediction flipped back (:func:`flipped`) before it is averaged;
- per view, the ``--samples`` draws of a sampling method.

The flip acts on the model's grid (after reorientation to the training axis codes),
where training flipped, not on the input's voxel order. :func:`mean_and_std` averages
the draws with Welford's running mean and sum of squared deviations (float64), so
memory is two volumes whatever the number of draws, and gives the per-voxel standard
deviation (``ddof=0``) across all of them: a disagreement map of members, views and
samples together. One draw has no spread: its std is ``None`` (not written; an
ensemble of one model without TTA or samples is that model's plain prediction,
bit for bit). :func:`sct_jax.inference.predict.predict_ensemble` runs the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from sct_jax import methods
from sct_jax.data import datasets, modality
from sct_jax.data.geometry import TrainingGeometry
from sct_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an ensemble, ready to predict.

    Attributes:
      config: the model's config.
      state: its restored state (parameters).
      geometry: its training geometry (``None``: the MR's own grid).
      jitted_predict: ``jax.jit(partial(method.predict, config))``, compiled once for
        every view and sample of every MR.
      name: how messages and reports name it (the ``-m`` path, a run directory).
    """

    config: Any
    state: Any
    geometry: TrainingGeometry | None
    jitted_predict: Callable
    name: str = ""


def make_member(config, state, geometry: TrainingGeometry | None, name: str = "") -> Member:
    """A :class:`Member` with its jitted ``predict``."""
    predict = jax.jit(functools.partial(methods.get_method(config.method).predict, config))
    return Member(config, state, geometry, predict, name)


def tta_views(config, tta: bool) -> tuple[tuple[int, ...], ...]:
    """The views one member predicts: the identity ``((),)``, or with ``tta`` every flip
    training showed the model (volume axes to flip, identity first)."""
    return datasets.augmentation_flips(config) if tta else ((),)


def draw_count(configs: Sequence, samples: int = 1, tta: bool = False) -> int:
    """How many sCTs the mean is taken over: members x views x samples."""
    return sum(len(tta_views(c, tta)) for c in configs) * int(samples)


def flipped(predict_volume: Callable[[np.ndarray], np.ndarray],
            axes: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """``predict_volume`` under a flip: ``x -> flip(predict_volume(flip(x)))``.

    Args:
      predict_volume: ``(X, Y, Z)`` normalised input -> ``(X, Y, Z)`` prediction.
      axes: the volume axes to flip; ``()``: ``predict_volume`` itself.
    """
    if not axes:
        return predict_volume

    def predict(volume: np.ndarray) -> np.ndarray:
        # Flipped back, so that every view's sCT lies on the same voxels before averaging.
        return np.flip(predict_volume(np.ascontiguousarray(np.flip(volume, axes))), axes)

    return predict


def mean_and_std(draws: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-voxel mean and standard deviation (``ddof=0``) of ``draws``, one at a time.

    Args:
      draws: ``(X, Y, Z)`` volumes of one shape (a generator: one is held at a time).

    Returns:
      ``(mean, std)`` float32; ``std`` is ``None`` for a single draw, whose mean is the
      draw itself exactly.

    Raises:
      ValueError: no draw.
    """
    # Welford's running mean and sum of squared deviations: memory is two volumes
    # whatever the number of draws (float64, so that many draws lose no precision).
    mean = m2 = None
    count = 0
    for draw in draws:
        draw = np.asarray(draw, np.float64)
        count += 1
        if mean is None:
            mean, m2 = draw.copy(), np.zeros_like(draw)
            continue
        delta = draw - mean
        mean += delta / count
        m2 += delta * (draw - mean)
    if mean is None:
        raise ValueError("mean_and_std: no draw")
    if count == 1:
        return mean.astype(np.float32), None
    return mean.astype(np.float32), np.sqrt(m2 / count).astype(np.float32)


def _describe(config, geometry: TrainingGeometry | None) -> str:
    kind = modality.spec(config).kind
    if geometry is None:
        return f"{kind} model, unknown training grid"
    return (f"{kind} model trained on {geometry.region or 'an unknown region'} "
            f"{''.join(geometry.axcodes)} {'x'.join(f'{s:g}' for s in geometry.spacing)} mm")


def check_members(members: Sequence[tuple[str, Any, TrainingGeometry | None]]) -> None:
    """Refuses an ensemble whose members could not average into one sCT.

    Every member must take the first's input (MR or CBCT: ``config.data.input``) and
    share its training grid (orientation, spacing, region): then one input check and
    one report record hold for all of them, and their sCTs describe the same anatomy.

    Args:
      members: ``(path, config, geometry)`` per member, the path as the user gave it
        (``-m PATH``); read before any parameters load.

    Raises:
      ConfigError: ``<path>: <problem>`` for the first member that is given twice (the
        same folder, links resolved) or does not match the first.
    """
    if not members:
        raise ConfigError("an ensemble needs at least one model")
    first_name, first_config, first_geometry = members[0]
    first_kind = modality.spec(first_config).kind
    seen = {os.path.realpath(first_name)}
    for name, config, geometry in members[1:]:
        if os.path.realpath(name) in seen:
            raise ConfigError(f"{name}: given twice (an ensemble's members are different "
                              "models)")
        seen.add(os.path.realpath(name))
        kind = modality.spec(config).kind
        if kind != first_kind:
            raise ConfigError(f"{name}: a {modality.LABEL[kind]} model (config.data.input="
                              f"{kind}), but {first_name} takes {modality.LABEL[first_kind]}: "
                              "an ensemble's members take the same input")
        same_grid = (geometry is None) == (first_geometry is None) and (
            geometry is None or (geometry.axcodes, geometry.spacing, geometry.region)
            == (first_geometry.axcodes, first_geometry.spacing, first_geometry.region))
        if not same_grid:
            raise ConfigError(f"{name}: a {_describe(config, geometry)}, but {first_name} is a "
                              f"{_describe(first_config, first_geometry)}: an ensemble's "
                              "members share the training grid")
