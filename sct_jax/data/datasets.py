"""From a config to cases, splits and the per-process training iterator.

``config.data.root`` empty means the built-in phantom dataset: it is generated once
into the cache (``$SCT_JAX_CACHE`` or ``~/.cache/sct_jax``) under a name that encodes
its parameters, written to a temporary folder and renamed, so an interrupted generation
never leaves a half dataset that a later run would trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from sct_jax.data import (modality, phantom, pipeline, preprocess, prior as prior_lib,
                          register, synthrad)
from sct_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def cache_root(config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir).expanduser()
    env = os.environ.get("SCT_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sct_jax"


def phantom_root(config) -> Path:
    """Where the phantom dataset of this config lives (generated if missing; a CBCT
    input's is the phantom's Task 2 dataset)."""
    p = config.data.phantom
    task = modality.spec(config).task
    shape = "x".join(str(int(s)) for s in p.shape) if p.shape else "default"
    aligned = float(p.get("aligned_fraction", 0.0))
    variation = float(p.get("anatomy_variation", 1.0))
    name = (f"phantom_{config.data.region}_n{p.cases}_seed{p.seed}"
            f"_mis{float(p.misalign):g}{f'_al{aligned:g}' if aligned else ''}_{shape}"
            f"{f'_task{task}' if task != 1 else ''}"
            f"{f'_var{variation:g}' if variation != 1.0 else ''}")
    root = cache_root(config) / "datasets" / name
    if not (root / f"Task{task}" / config.data.region / "manifest.json").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
        try:
            phantom.write_dataset(tmp, config.data.region, p.cases, p.seed,
                                  misalign_mm=float(p.misalign),
                                  shape=tuple(p.shape) if p.shape else None,
                                  aligned_fraction=aligned, anatomy_variation=variation,
                                  **({"task": task} if task != 1 else {}))
            if root.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def dataset_root(config) -> Path:
    return Path(config.data.root).expanduser() if config.data.root else phantom_root(config)


def discover(config, root=None) -> list[synthrad.Case]:
    """The cases of ``root`` (default the config's data) with the config's input
    (``data.input``: MR or CBCT) and region; not validated."""
    return synthrad.discover_cases(root if root is not None else dataset_root(config),
                                   region=config.data.region or None,
                                   input=modality.spec(config).kind)


def case_splits(config) -> dict[str, list[synthrad.Case]]:
    """Discovers, validates and splits the config's cases into train/val/test."""
    root = dataset_root(config)
    cases = discover(config, root)
    synthrad.validate_cases(cases)
    fractions = tuple(config.data.split)
    splits = synthrad.split_cases(cases, fractions=fractions, seed=config.data.split_seed)
    if config.data.get("folds", 0):
        splits = synthrad.fold_split(splits, int(config.data.folds), int(config.data.fold),
                                     seed=config.data.split_seed)
    # A split asked for (fraction > 0) that holds no case would train or score nothing.
    for (name, part), fraction in zip(splits.items(), fractions):
        if not part and (fraction > 0 or name == "train"):
            raise DataError(f"{root}: the {name} split is empty ({len(cases)} case(s), "
                            f"data.split={fractions}); add cases or change data.split")
    return splits


def prepare(config, cases: list[synthrad.Case]) -> list[pipeline.PreparedCase]:
    return pipeline.prepare_cases(cases, cache_root(config) / "prepared",
                                  mr_percentiles=tuple(config.data.mr_percentiles),
                                  input_spec=modality.spec(config))


# Templates fitted in this process, by the prepared training cases' folders (training
# needs one for the data pipeline and one for the run's geometry record).
_TEMPLATES: dict[tuple[str, ...], np.ndarray] = {}


def prior_template(config, train_cases: list[synthrad.Case]) -> np.ndarray:
    """The mean training CT template of ``config.data.prior`` (:mod:`sct_jax.data.prior`)
    over the first :data:`prior_lib.MAX_TEMPLATE_CASES` training cases with a CT, read
    from the prepared cache (one case in memory at a time).

    Raises:
      DataError: no training case with a CT.
    """
    cases = [c for c in train_cases if c.ct is not None][:prior_lib.MAX_TEMPLATE_CASES]
    if not cases:
        raise DataError("config.data.prior: no training case with a CT to average")
    prepared = prepare(config, cases)
    key = tuple(str(c.folder) for c in prepared)
    if key not in _TEMPLATES:
        shape = tuple(int(round(v)) for v in np.median(
            [prior_lib.box_shape(np.asarray(c.mask) > 0) for c in prepared], axis=0))
        pairs = ((preprocess.unit_to_ct(np.asarray(c.ct)), np.asarray(c.mask) > 0)
                 for c in prepared)
        _TEMPLATES[key] = prior_lib.fit_template(pairs, shape)
    return _TEMPLATES[key]


def input_channels(config) -> int:
    """The model's input channels: ``2 * data.context + 1`` MR slices (1 for 3D
    patches), plus one for the prior (``data.prior``)."""
    mr = 1 if config.data.mode == "patches" else 2 * int(config.data.context) + 1
    return mr + prior_lib.extra_channels(config)


def augmentation_flips(config) -> tuple[tuple[int, ...], ...]:
    """The flips training shows a model of ``config``: the views test-time augmentation
    predicts under (:mod:`sct_jax.inference.ensemble`).

    Every sampler of :mod:`sct_jax.data.pipeline` (slices, patches, unpaired slices,
    meta-pGAN's zipped slices) flips :data:`pipeline.FLIP_AXES` of the training-grid
    volume with probability 1/2, so every data mode has the same two views.

    Args:
      config: the model's config (``data.mode``); kept so that a sampler that flips
        differently changes this one function.

    Returns:
      The views as volume axes to flip, the identity first: ``((), (0,))`` today.
    """
    del config  # every data mode flips the same axes (see above)
    return ((), tuple(pipeline.FLIP_AXES))


def train_dataset(config, local_batch_size: int, method_dataset=None):
    """The per-process training dataset (a grain ``IterDataset`` of numpy batches).

    Args:
      config: the experiment config (``data.mode`` picks the sampler).
      local_batch_size: this process's share of the batch.
      method_dataset: a method's own ``train_dataset(config, prepared, local_batch,
        shard_index, shard_count)`` (its ``Method.train_dataset``), used instead of the
        data mode's sampler: meta-pGAN's training slices zipped with meta-validation ones.
    """
    splits = case_splits(config)
    prepared = prepare(config, splits["train"])
    if register.check_register_config(config):
        prepared = pipeline.with_registered_ct(prepared)
    if prior_lib.check_prior_config(config):
        prepared = pipeline.with_prior(prepared, prior_template(config, splits["train"]))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if method_dataset is not None:
        return method_dataset(config, prepared, local_batch_size, **shard)
    mode = config.data.mode
    seed = config.seed
    if mode == "slices":
        return pipeline.slice_dataset(prepared, crop=tuple(config.data.crop),
                                      batch_size=local_batch_size, seed=seed,
                                      context=config.data.context, train=True, **shard)
    if mode == "patches":
        return pipeline.patch_dataset(prepared, patch=tuple(config.data.patch),
                                      batch_size=local_batch_size, seed=seed, train=True,
                                      **shard)
    if mode == "unpaired_slices":
        return pipeline.unpaired_slice_dataset(prepared, crop=tuple(config.data.crop),
                                               batch_size=local_batch_size, seed=seed,
                                               context=config.data.context, **shard)
    raise ConfigError(f"config.data.mode={mode!r}: expected slices, patches or "
                      f"unpaired_slices (config.method={config.method!r} brings no sampler "
                      "of its own)")
