"""Predict the evaluation split of a trained run, write sCT NIfTIs, score and draw them.

``predict_split(config, workdir)`` restores the best checkpoint (the lowest validation
MAE; the latest when the run was never validated; ``checkpoint=`` picks another),
predicts every case of ``config.eval.split`` (2D models slice by slice over the whole
field of view, 3D models by sliding windows),
brings each MR onto the training grid and back (:mod:`sct_jax.inference.geometry`),
writes ``<out>/<id>/sct.nii.gz`` in HU on the MR's grid (affine and header), and
returns the prediction folder; ``evaluate.py`` then scores it with the SynthRAD2023
metrics and draws a panel per case.

Sampling methods (whose ``predict`` takes an ``rng``: the latent diffusion model, and
the GANs by Monte-Carlo dropout, i.e. dropout left on at test time) can draw
``samples=K`` sCTs per case: ``sct.nii.gz`` is then their voxel-wise mean and
``sct_std.nii.gz`` their voxel-wise standard deviation (``ddof=0``) in HU (an
uncertainty map). Sample ``k`` uses the key :func:`sample_rng` ``(config, k)``. A method
may define ``check_sampling(config)``, raising ``ConfigError`` when this config cannot
sample (a GAN trained without dropout).

Test-time augmentation (``tta=True``: the case also predicted flipped the ways training
flipped it, flipped back) and ensembles (``ensemble_dirs``: further runs of the same
input and training grid) average more draws the same way; ``sct_std.nii.gz`` is then
the spread across members, views and samples (:mod:`sct_jax.inference.ensemble`).
"""

from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path
from typing import Iterator, Sequence

import jax
import nibabel as nib
import numpy as np
from scipy import ndimage

from sct_jax import methods, runs
from sct_jax.data import datasets, modality, preprocess, prior as prior_lib, synthrad
from sct_jax.data.geometry import TrainingGeometry
from sct_jax.data.io import Volume, save_like
from sct_jax.errors import ConfigError, DataError
from sct_jax.inference import ensemble
from sct_jax.inference import geometry as geometry_lib
from sct_jax.inference import windows as inference
from sct_jax.methods.common import body_mask_margin, body_masked_loss

log = logging.getLogger(__name__)

# The sCT outside the body mask of a model trained inside it only (config.loss.body_mask).
AIR_HU = -1000.0


def check_samples(config, samples: int) -> None:
    """Raises ``ConfigError`` unless ``config`` can draw ``samples`` sCTs per case.

    ``samples`` must be 1, or more for a method whose ``predict`` takes an ``rng`` and
    whose ``check_sampling(config)`` (when it has one) passes.
    """
    method = methods.get_method(config.method)
    samples = int(samples)
    if samples < 1 or (samples > 1 and not method.samples):
        raise ConfigError(f"--samples {samples}: must be 1, or more for a sampling method "
                          f"(config.method={config.method!r} "
                          f"{'samples' if method.samples else 'does not sample'})")
    if samples > 1:
        try:
            method.check_sampling(config)
        except ConfigError as err:
            raise ConfigError(f"--samples {samples}: {err}") from None


def sample_rng(config, k: int) -> jax.Array:
    """The base key of sample ``k`` of a sampling method: ``fold_in(key(seed), k)``."""
    return jax.random.fold_in(jax.random.key_data(jax.random.key(config.seed)), k)


def make_volume_predictor(config, state, rng=None, jitted_predict=None):
    """``(X, Y, Z)`` normalised MR -> ``(X, Y, Z)`` prediction in [-1, 1].

    Args:
      config: the run's config.
      state: the restored train state.
      rng: for sampling methods, the sample's base key; window batch ``i`` is predicted
        with ``fold_in(rng, i)``. ``None``: the method's default key.
      jitted_predict: ``jax.jit(partial(method.predict, config))`` to reuse (one
        compilation for several samples); built when ``None``.
    """
    method = methods.get_method(config.method)
    predict = jitted_predict or jax.jit(functools.partial(method.predict, config))
    if rng is not None and not method.samples:
        raise ConfigError(f"config.method={config.method!r} does not sample: its predict "
                          "takes no rng")
    batch_index = itertools.count()

    def call(batch: np.ndarray) -> np.ndarray:
        if rng is None:
            return np.asarray(predict(state, batch))
        return np.asarray(predict(state, batch, rng=jax.random.fold_in(rng, next(batch_index))))

    if config.data.mode == "patches":
        return functools.partial(inference.predict_volume_3d, call,
                                 patch=tuple(config.data.patch), overlap=config.eval.overlap,
                                 batch_size=config.eval.batch_size)
    stride, min_size = method.input_rule(config)
    return functools.partial(inference.predict_volume_2d, call, tile=slice_tile(config),
                             context=config.data.context, batch_size=config.eval.batch_size,
                             overlap=config.eval.overlap, stride=stride, min_size=min_size)


def slice_tile(config) -> tuple[int, int]:
    """The 2D inference window: ``config.eval.tile`` or, when unset, the training crop.

    A 0 entry means the whole slice along that axis (padded to the network's stride).
    """
    tile = tuple(config.eval.tile or ())
    if not tile:
        return tuple(int(c) for c in config.data.crop)
    stride, _ = methods.get_method(config.method).input_rule(config)
    bad = [t for t in tile if int(t) < 0 or int(t) % stride]
    if len(tile) != 2 or bad:
        raise ConfigError(f"config.eval.tile={tile}: expected two sizes, each 0 (whole "
                          f"slice) or a positive multiple of the network stride {stride}")
    return tuple(int(t) for t in tile)


def check_settings(config) -> None:
    """Start-up checks of the inference settings (``config.eval``), so that a bad value
    fails before data is prepared or anything compiles, not at the first validation
    pass or the export after a whole training.

    Raises:
      ConfigError: one line naming the key.
    """
    if int(config.eval.batch_size) < 1:
        raise ConfigError(f"config.eval.batch_size={config.eval.batch_size}: must be >= 1")
    if not 0.0 <= float(config.eval.overlap) < 1.0:
        raise ConfigError(f"config.eval.overlap={config.eval.overlap}: must be in [0, 1)")
    if config.data.mode != "patches":
        slice_tile(config)


def eval_cases(config, data_root: str | Path | None = None) -> list[synthrad.Case]:
    """The cases of ``config.eval.split`` (all cases of ``data_root`` when it is given)."""
    if data_root:
        cases = datasets.discover(config, Path(data_root))
        synthrad.validate_cases(cases)
    else:
        cases = datasets.case_splits(config)[config.eval.split]
    if config.eval.max_cases:
        cases = cases[:config.eval.max_cases]
    return cases


def predict_mr(predict_volume, config, mr: Volume, mask: np.ndarray | None = None,
               geometry: TrainingGeometry | None = None) -> np.ndarray:
    """One MR's sCT in HU, ``(X, Y, Z)`` float32 on the MR's own voxel grid.

    The MR is brought onto the training grid (:mod:`sct_jax.inference.geometry`:
    reoriented to the training axis codes, resampled when its spacing differs),
    normalised by its percentiles inside the body mask, predicted, mapped to HU and
    back onto the input grid. A model trained with a body-masked L1
    (``config.loss.body_mask``) has its sCT set to air (:data:`AIR_HU`) outside the mask
    grown as in training (:func:`grown_body_mask`).

    Args:
      predict_volume: ``(X', Y', Z')`` normalised MR -> prediction in [-1, 1] (from
        :func:`make_volume_predictor`).
      config: the model's config (MR percentiles).
      mr: the input MR.
      mask: ``(X, Y, Z)`` body mask on the MR's grid; ``None``: made from the MR.
      geometry: the model's training geometry; ``None``: the MR's own (no change).
    """
    if geometry is None:
        geometry = TrainingGeometry(
            tuple(nib.aff2axcodes(mr.affine)), tuple(mr.spacing))
    grid = geometry_lib.to_model_grid(mr.affine, mr.shape, geometry)
    mr_model = grid.to_grid(np.asarray(mr.data, np.float32), order=1)
    if mask is None:
        mask_model = preprocess.body_mask_from_mr(mr_model)
    else:
        mask_model = grid.to_grid(np.asarray(mask, np.float32), order=0) > 0.5
    unit = np.asarray(modality.spec(config).to_unit(
        mr_model, mask_model if mask_model.any() else None), np.float32)
    if prior_lib.check_prior_config(config):
        if geometry.prior is None:
            raise DataError("the model takes the mean training CT (config.data.prior) but "
                            "its template was not given (the run's prior_ct.npy)")
        # The prior is placed on the body mask, the same way training placed it.
        unit = np.stack([unit, prior_lib.prior_unit(geometry.prior, mask_model)], axis=-1)
    pred = predict_volume(unit)
    sct = np.asarray(preprocess.unit_to_ct(pred), np.float32)
    if body_masked_loss(config):
        # The model never trained beyond the grown mask: what it says there is unconstrained.
        sct[~grown_body_mask(config, mask_model)] = AIR_HU
    return grid.to_input(sct, order=1).astype(np.float32)


def grown_body_mask(config, mask: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` body mask on the model grid grown as the training loss grew it
    (:func:`sct_jax.methods.common.grow_mask`): in-plane for slice models (they saw one
    axial slice), on every axis for patch models."""
    margin = body_mask_margin(config)
    if margin <= 0:
        return mask
    size = (2 * margin + 1,) * 2 + ((2 * margin + 1) if config.data.mode == "patches" else 1,)
    return ndimage.maximum_filter(mask.astype(np.uint8), size=size, mode="constant") > 0


def predict_case(predict_volume, config, case_data: synthrad.CaseData,
                 geometry: TrainingGeometry | None = None) -> np.ndarray:
    """One case's sCT in HU, ``(X, Y, Z)`` float32 on the MR's grid (see
    :func:`predict_mr`; the case's body mask sets the MR normalisation)."""
    return predict_mr(predict_volume, config, case_data.mr, case_data.mask, geometry)


def predict_draws(config, state, mr: Volume, mask: np.ndarray | None,
                  geometry: TrainingGeometry | None, samples: int = 1,
                  jitted_predict=None, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``(sct, std)`` in HU on the MR's grid: one deterministic sCT (``std`` None), or
    the mean and per-voxel standard deviation (``ddof=0``) of ``samples`` draws (and,
    with ``tta``, of every flipped view: :func:`predict_ensemble` of one member)."""
    member = ensemble.Member(config, state, geometry, jitted_predict or jax.jit(
        functools.partial(methods.get_method(config.method).predict, config)))
    return predict_ensemble([member], mr, mask, samples, tta)


def member_draws(member: ensemble.Member, mr: Volume, mask: np.ndarray | None,
                 samples: int = 1, tta: bool = False) -> Iterator[np.ndarray]:
    """One member's sCTs of ``mr`` in HU, ``(X, Y, Z)`` float32 on the MR's grid, one
    at a time: per view of :func:`ensemble.tta_views` (identity first), ``samples``
    draws (sample ``k`` with the key :func:`sample_rng` ``(config, k)``; ``samples=1``:
    the method's deterministic prediction)."""
    config = member.config
    for axes in ensemble.tta_views(config, tta):
        for k in range(samples):
            rng = sample_rng(config, k) if samples > 1 else None
            predictor = make_volume_predictor(config, member.state, rng=rng,
                                              jitted_predict=member.jitted_predict)
            yield predict_mr(ensemble.flipped(predictor, axes), config, mr, mask,
                             member.geometry)


def predict_ensemble(members: Sequence[ensemble.Member], mr: Volume,
                     mask: np.ndarray | None, samples: int = 1,
                     tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``(sct, std)`` in HU on the MR's grid: the mean over members, views and samples
    (:func:`member_draws`) and the per-voxel std (``ddof=0``) across all of them,
    ``None`` when there is one draw (see :mod:`sct_jax.inference.ensemble`)."""
    return ensemble.mean_and_std(draw for member in members
                                 for draw in member_draws(member, mr, mask, samples, tta))


def load_members(config, workdir: str | Path, ensemble_dirs: Sequence[str | Path] = (),
                 checkpoint: int | str = "best",
                 ensemble_checkpoint: int | str | None = None,
                 samples: int = 1) -> list[ensemble.Member]:
    """The run in ``workdir`` and the runs of ``ensemble_dirs`` as ensemble members.

    Every run is checked (config, geometry, ``samples``, one input kind and training
    grid: :func:`ensemble.check_members`) before any parameters load.

    Args:
      config: the config of the run in ``workdir`` (its ``eval.*`` apply to it).
      workdir: the first member's run directory.
      ensemble_dirs: further run directories, each predicting with its own
        ``config.json``.
      checkpoint: the first run's checkpoint (see :func:`sct_jax.runs.load_state`).
      ensemble_checkpoint: the others' (default: ``checkpoint``).
      samples: draws per view (checked for every member).

    Raises:
      ConfigError, DataError: naming the run directory.
    """
    named = [(str(workdir), config, runs.read_geometry(config, workdir))]
    for path in ensemble_dirs:
        member_config = runs.read_config(path)
        named.append((str(path), member_config, runs.read_geometry(member_config, path)))
    ensemble.check_members(named)
    for name, member_config, _ in named[1:]:
        try:
            check_samples(member_config, samples)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    members = []
    for i, (name, member_config, geometry) in enumerate(named):
        choice = checkpoint if i == 0 or ensemble_checkpoint is None else ensemble_checkpoint
        step, state = runs.load_state(member_config, name, step=choice)
        log.info("member %s: step-%d checkpoint", name, step)
        members.append(ensemble.make_member(member_config, state, geometry, name))
    return members


def predict_split(config, workdir: str | Path, data_root: str | Path | None = None,
                  out_dir: str | Path | None = None,
                  samples: int = 1,
                  checkpoint: int | str = "best", tta: bool = False,
                  ensemble_dirs: Sequence[str | Path] = (),
                  ensemble_checkpoint: int | str | None = None,
                  ) -> tuple[Path, list[synthrad.Case]]:
    """Predicts the evaluation cases and writes their sCT NIfTIs.

    Args:
      config: the run's config.
      workdir: the training run directory (checkpoints, batch_spec.json).
      data_root: score these cases instead of the config's evaluation split.
      out_dir: where to write ``<id>/sct.nii.gz`` (default ``workdir/predictions``).
      samples: sCT samples per case (sampling methods only): with ``K > 1``,
        ``sct.nii.gz`` is their mean and ``sct_std.nii.gz`` their standard deviation.
      checkpoint: ``"best"``, ``"latest"`` or a step (see :func:`sct_jax.runs.load_state`).
      tta: also predict every case flipped the ways training flipped
        (:func:`ensemble.tta_views`) and average.
      ensemble_dirs: further runs of the same input and training grid: the mean over
        all members is written (see :func:`load_members`).
      ensemble_checkpoint: the checkpoint of the ``ensemble_dirs`` runs (default:
        ``checkpoint``).

    Whenever the mean is over more than one draw (members x views x samples),
    ``sct_std.nii.gz`` holds their per-voxel std (``ddof=0``); otherwise an old one is
    removed.

    Returns:
      ``(out_dir, cases)``.

    Raises:
      ConfigError: see :func:`check_samples` and :func:`load_members` (raised before
        any parameters load).
    """
    samples = int(samples)
    check_samples(config, samples)
    workdir = Path(workdir)
    out_dir = Path(out_dir) if out_dir else workdir / "predictions"
    cases = eval_cases(config, data_root)
    members = load_members(config, workdir, ensemble_dirs, checkpoint, ensemble_checkpoint,
                           samples)
    log.info("predicting %d cases: %d draw(s) each (%d member(s), %s, %d sample(s))",
             len(cases), ensemble.draw_count([m.config for m in members], samples, tta),
             len(members), "flips" if tta else "no flips", samples)
    for case in cases:
        case_data = synthrad.load_case(case)
        sct, std = predict_ensemble(members, case_data.mr, case_data.mask, samples, tta)
        if std is None:
            save_like(out_dir / case.id / "sct.nii.gz", sct, case_data.mr)
            # A std map of an earlier multi-draw run would no longer describe sct.nii.gz.
            (out_dir / case.id / "sct_std.nii.gz").unlink(missing_ok=True)
            continue
        save_like(out_dir / case.id / "sct_std.nii.gz", std, case_data.mr)
        save_like(out_dir / case.id / "sct.nii.gz", sct, case_data.mr)
    return out_dir, cases
