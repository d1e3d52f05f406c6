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

import grain
import jax

from sct_jax.data import pipeline, synthrad
from sct_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def cache_root(config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir).expanduser()
    env = os.environ.get("SCT_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sct_jax"


def phantom_root(config) -> Path:
    """Where the phantom dataset of this config lives (generated if missing)."""
    p = config.data.phantom
    shape = "x".join(str(int(s)) for s in p.shape) if p.shape else "default"
    aligned = float(p.get("aligned_fraction", 0.0))
    name = (f"phantom_{config.data.region}_n{p.cases}_seed{p.seed}"
            f"_mis{float(p.misalign):g}{f'_al{aligned:g}' if aligned else ''}_{shape}")
    root = cache_root(config) / "datasets" / name
    if not (root / "Task1" / config.data.region / "manifest.json").exists():
        from sct_jax.data import phantom
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
        try:
            phantom.write_dataset(tmp, config.data.region, p.cases, p.seed,
                                  misalign_mm=float(p.misalign),
                                  shape=tuple(p.shape) if p.shape else None,
                                  aligned_fraction=aligned)
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


def case_splits(config) -> dict[str, list[synthrad.Case]]:
    """Discovers, validates and splits the config's cases into train/val/test."""
    root = dataset_root(config)
    cases = synthrad.discover_cases(root, region=config.data.region or None)
    synthrad.validate_cases(cases)
    fractions = tuple(config.data.split)
    splits = synthrad.split_cases(cases, fractions=fractions, seed=config.data.split_seed)
    # A split asked for (fraction > 0) that holds no case would train or score nothing.
    for (name, part), fraction in zip(splits.items(), fractions):
        if not part and (fraction > 0 or name == "train"):
            raise DataError(f"{root}: the {name} split is empty ({len(cases)} case(s), "
                            f"data.split={fractions}); add cases or change data.split")
    return splits


def prepare(config, cases: list[synthrad.Case]) -> list[pipeline.PreparedCase]:
    return pipeline.prepare_cases(cases, cache_root(config) / "prepared",
                                  mr_percentiles=tuple(config.data.mr_percentiles))


def train_dataset(config, local_batch_size: int):
    """The per-process training dataset (a grain ``IterDataset`` of numpy batches)."""
    splits = case_splits(config)
    prepared = prepare(config, splits["train"])
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
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
    if mode == "slices_with_meta":
        return meta_slice_dataset(config, prepared, local_batch_size, **shard)
    raise ConfigError(f"config.data.mode={mode!r}: expected slices, patches, "
                      "unpaired_slices or slices_with_meta")


# ------------------------------------------------------------- meta-learning (seed 02)

def meta_validation_ids(config, prepared: list[pipeline.PreparedCase]) -> list[str]:
    """The best-registered training cases: top ``config.meta.val_fraction`` by MR/CT MI.

    Mutual information inside the body mask (:mod:`sct_jax.data.alignment`), computed
    once per dataset build from the prepared (normalised) arrays; at least one case.
    """
    from sct_jax.data import alignment
    mi = {case.id: alignment.mutual_information(case.mr, case.ct, case.mask)
          for case in prepared}
    return alignment.select_meta_validation(mi, float(config.meta.val_fraction))


def meta_slice_dataset(config, prepared: list[pipeline.PreparedCase], local_batch_size: int,
                       shard_index: int, shard_count: int):
    """Training slices zipped with meta-validation slices (data mode ``slices_with_meta``).

    The meta-validation cases are the top ``config.meta.val_fraction`` (seed 02: 11%) of
    the *training* cases by mutual information. With ``config.meta.val_exclusive`` they
    are taken out of the training slices (seed 02 "allocates" them to validation), unless
    that would leave none.

    Returns:
      An ``IterDataset`` of dicts: ``mr (B, H, W, 2c+1)``, ``ct``, ``mask`` ``(B, H, W, 1)``
      as mode ``slices``, plus ``val_mr``, ``val_ct``, ``val_mask`` with
      ``config.meta.val_batch_size / process_count`` shuffled, flipped validation slices.
    """
    val_ids = set(meta_validation_ids(config, prepared))
    val_cases = [c for c in prepared if c.id in val_ids]
    train_cases = [c for c in prepared if c.id not in val_ids]
    if not (config.meta.val_exclusive and train_cases):
        train_cases = list(prepared)
    log.info("meta-validation cases (top %g by MI): %s; %d training "
             "cases", config.meta.val_fraction, sorted(val_ids), len(train_cases))
    val_batch = int(config.meta.val_batch_size)
    if val_batch <= 0 or val_batch % shard_count:
        raise ConfigError(f"config.meta.val_batch_size={val_batch} must be positive and "
                          f"divisible by the {shard_count} processes")
    common = dict(crop=tuple(config.data.crop), seed=config.seed, context=config.data.context,
                  train=True, shard_index=shard_index, shard_count=shard_count)
    train_ds = pipeline.slice_dataset(train_cases, batch_size=local_batch_size, **common)
    # Its own shuffle seed: the two streams must not draw the same permutation.
    common["seed"] = config.seed + 1_000_003
    val_ds = pipeline.slice_dataset(val_cases, batch_size=val_batch // shard_count, **common)

    def merge(pair):
        train, val = pair
        return {**train, **{f"val_{k}": v for k, v in val.items()}}

    return grain.experimental.ZipIterDataset([train_ds, val_ds]).map(merge)
