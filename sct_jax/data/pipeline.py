"""grain input pipelines over prepared cases: 2D/2.5D slices, 3D patches, unpaired slices.

Each case is decoded and normalised once by :func:`prepare_cases` into ``.npy`` files
that later runs memory-map, so a slice costs a memory copy, never a gzip decode. The
datasets are grain ``MapDataset`` chains (index -> shuffle -> repeat -> random map ->
batch) turned into ``IterDataset``s whose iterators checkpoint their position
(``get_state``/``set_state``; orbax saves them through ``grain.checkpoint``).

Multi-host: every process passes its ``shard_index``/``shard_count`` and reads only its
own part of the slice (or case) index; ``batch_size`` is the per-process batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import grain
import jax
import numpy as np

from sct_jax.data import modality, preprocess, prior as prior_lib, register, synthrad
from sct_jax.data.io import atomic_path, atomic_write_text
from sct_jax.errors import ConfigError, DataError

_CACHE_VERSION = 2
# grain's default read-ahead (16 threads, 500 elements) counts *batches* here: 500
# batches of 6 x 320 x 192 x (3 + 1 + 1) float32 are 3.7 GB per iterator (measured 4.5
# GB RSS), and 3D patches far more. A few batches ahead keep the accelerator fed.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
# The axes every training sampler flips (together, with probability 1/2), as axes of
# the (X, Y, Z) volume: a 2D slice (X, Y, ...) and a 3D patch (X, Y, Z, ...) both start
# with X, which runs left-right in NIfTI (the anatomy is near-symmetric that way; it is
# not front-back or head-feet). Test-time augmentation predicts under the same flip
# (:func:`sct_jax.data.datasets.augmentation_flips`), so a change here changes both.
FLIP_AXES = (0,)


def flip(array: np.ndarray) -> np.ndarray:
    """``array`` flipped along :data:`FLIP_AXES` (a view)."""
    return np.flip(array, FLIP_AXES)


@dataclasses.dataclass
class PreparedCase:
    """A case normalised for training; arrays are read-only memory maps.

    Attributes:
      id: case id.
      mr: ``(X, Y, Z)`` float32 in [-1, 1].
      ct: ``(X, Y, Z)`` float32 in [-1, 1], or ``None``.
      mask: ``(X, Y, Z)`` uint8 body mask.
      affine: ``(4, 4)`` voxel -> world.
      folder: the cache folder it is read from.
      prior: ``(X, Y, Z)`` float32 mean-CT prior in [-1, 1] (:func:`with_prior`), an
        input channel after the MR's; ``None``: the model takes none.
    """

    id: str
    mr: np.ndarray
    ct: np.ndarray | None
    mask: np.ndarray
    affine: np.ndarray
    folder: Path | None = None
    prior: np.ndarray | None = None


def _cache_key(case: synthrad.Case, spec: modality.InputSpec) -> str:
    parts = [str(_CACHE_VERSION), spec.key()]
    for path in (case.mr, case.ct, case.mask):
        if path is None:
            parts.append("-")
        else:
            st = os.stat(path)
            # The inode catches a file replaced atomically within the mtime resolution.
            parts.append(f"{Path(path).absolute()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        # Fortran order: an axial slice arr[:, :, z] is then one contiguous block of the
        # memory map (C order would gather X*Y values strided by Z).
        np.save(tmp, np.asfortranarray(array))


def prepare_case(case: synthrad.Case, cache_dir: str | Path,
                 mr_percentiles: Sequence[float] = (0.5, 99.5),
                 input_spec: modality.InputSpec | None = None) -> PreparedCase:
    """Normalises one case once and memory-maps the cached result.

    Args:
      case: the case.
      cache_dir: the prepared-data cache.
      mr_percentiles: MR input: the normalisation percentiles (when no ``input_spec``).
      input_spec: how the input becomes model units (:mod:`sct_jax.data.modality`; the
        ``mr`` array of the result holds the normalised input, MR or CBCT).
    """
    lo, hi = (float(p) for p in mr_percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        raise ConfigError(f"mr_percentiles {tuple(mr_percentiles)}: need 0 <= low < high "
                          "<= 100")
    spec = input_spec or modality.InputSpec("mr", (lo, hi))
    if spec.kind != case.input:
        raise ConfigError(f"{case.mr}: a {modality.LABEL[case.input]} case, but the "
                          f"config's input is {spec.kind} (config.data.input)")
    folder = Path(cache_dir) / f"{case.id}-{_cache_key(case, spec)}"
    done = folder / "meta.json"
    if not done.exists():
        data = synthrad.load_case(case)
        folder.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic(folder / "mr.npy", spec.to_unit(data.mr.data, data.mask))
        if data.ct is not None:
            _save_npy_atomic(folder / "ct.npy", preprocess.ct_to_unit(data.ct.data))
        _save_npy_atomic(folder / "mask.npy", data.mask.astype(np.uint8))
        _save_npy_atomic(folder / "affine.npy", data.mr.affine)
        meta = {"id": case.id, "has_ct": data.ct is not None, "source": str(case.dir)}
        atomic_write_text(done, json.dumps(meta))  # written last: marks the entry complete
    meta = json.loads(done.read_text())
    return PreparedCase(
        id=meta["id"],
        mr=np.load(folder / "mr.npy", mmap_mode="r"),
        ct=np.load(folder / "ct.npy", mmap_mode="r") if meta["has_ct"] else None,
        mask=np.load(folder / "mask.npy", mmap_mode="r"),
        affine=np.load(folder / "affine.npy"), folder=folder)


def with_registered_ct(prepared: Sequence[PreparedCase]) -> list[PreparedCase]:
    """The cases with their CT moved onto the input's frame
    (:func:`sct_jax.data.register.register_to_input`), registered once and cached in the
    case's folder; cases without a CT are returned as they are."""
    out = []
    for case in prepared:
        if case.ct is None or case.folder is None:
            out.append(case)
            continue
        path = case.folder / register.cache_name()
        if not path.exists():
            ct, _ = register.register_to_input(np.asarray(case.mr), np.asarray(case.ct),
                                               np.asarray(case.mask) > 0)
            _save_npy_atomic(path, ct)
        out.append(dataclasses.replace(case, ct=np.load(path, mmap_mode="r")))
    return out


def with_prior(prepared: Sequence[PreparedCase], template: np.ndarray) -> list[PreparedCase]:
    """The cases with their mean-CT prior channel (:func:`sct_jax.data.prior.prior_unit`
    of ``template`` on each case's body mask), cached beside the case as a memory map
    named after the template's content."""
    name = f"prior-{prior_lib.digest(template)}.npy"
    out = []
    for case in prepared:
        path = Path(case.folder) / name
        if not path.exists():
            _save_npy_atomic(path, prior_lib.prior_unit(template, np.asarray(case.mask) > 0))
        out.append(dataclasses.replace(case, prior=np.load(path, mmap_mode="r")))
    return out


def prepare_cases(cases: Sequence[synthrad.Case], cache_dir: str | Path,
                  mr_percentiles: Sequence[float] = (0.5, 99.5),
                  input_spec: modality.InputSpec | None = None) -> list[PreparedCase]:
    """:func:`prepare_case` for every case (decoded only the first time)."""
    return [prepare_case(c, cache_dir, mr_percentiles, input_spec) for c in cases]


def _shard(shard_index, shard_count) -> tuple[int, int]:
    index = jax.process_index() if shard_index is None else int(shard_index)
    count = jax.process_count() if shard_count is None else int(shard_count)
    return index, count


def slice_index(prepared: Sequence[PreparedCase]) -> np.ndarray:
    """``(N, 2)`` int array of (case, z) for every axial slice with body in it."""
    rows = []
    for i, case in enumerate(prepared):
        zs = np.nonzero(np.asarray(case.mask).any(axis=(0, 1)))[0]
        rows.extend((i, int(z)) for z in zs)
    if not rows:
        raise DataError("no slice with a non-empty mask among "
                        f"{[c.id for c in prepared]}")
    return np.asarray(rows, np.int64)


def _slice(volume: np.ndarray, z: int, context: int) -> np.ndarray:
    zs = np.clip(np.arange(z - context, z + context + 1), 0, volume.shape[2] - 1)
    return np.stack([volume[:, :, k] for k in zs], axis=-1)


def input_slice(case: PreparedCase, z: int, context: int) -> np.ndarray:
    """``(X, Y, 2*context+1 [+1])``: the MR slices around ``z``, then the prior's slice
    ``z`` when the case has one."""
    mr = _slice(case.mr, z, context)
    if case.prior is None:
        return mr
    return np.concatenate([mr, np.asarray(case.prior[:, :, z])[..., None]], axis=-1)


def _source(index: np.ndarray, shard_index, shard_count) -> grain.MapDataset:
    i, n = _shard(shard_index, shard_count)
    ds = grain.MapDataset.source(index)
    if n > 1:
        if len(index) < n:
            raise DataError(f"{len(index)} items cannot be sharded over {n} processes")
        ds = ds[i::n]
    return ds


def slice_dataset(prepared: Sequence[PreparedCase], *, crop: Sequence[int], batch_size: int,
                  seed: int, context: int = 0, train: bool = True, shard_index=None,
                  shard_count=None, read_options: grain.ReadOptions | None = None
                  ) -> grain.IterDataset:
    """Axial (2D or 2.5D) slice batches.

    Args:
      prepared: cases from :func:`prepare_cases` (with CT).
      crop: ``(H, W)``; slices are centre-cropped/padded (MR/CT with -1, mask with 0).
      batch_size: per-process batch.
      seed: shuffle and augmentation seed.
      context: MR neighbours on each side: ``mr`` has ``2*context+1`` channels (one
        more, the prior, for cases :func:`with_prior` made).
      train: shuffle every epoch, repeat forever, random left-right flips
        (:data:`FLIP_AXES`), drop the
        last partial batch; otherwise one ordered pass without flips.
      shard_index, shard_count: this process's part of the slices (default: the JAX
        process index and count).
      read_options: grain read-ahead (threads, batches buffered); default
        :data:`DEFAULT_READ_OPTIONS`.

    Returns:
      An ``IterDataset`` of dicts: ``mr (B, H, W, 2c+1)``, ``ct (B, H, W, 1)``,
      ``mask (B, H, W, 1)``, all float32.
    """
    crop = tuple(int(c) for c in crop)
    _require_ct(prepared)
    ds = _source(slice_index(prepared), shard_index, shard_count)

    def load(row, rng=None):
        case = prepared[int(row[0])]
        z = int(row[1])
        mr = crop_or_pad_hw(input_slice(case, z, context), crop, -1.0)
        ct = crop_or_pad_hw(np.asarray(case.ct[:, :, z])[..., None], crop, -1.0)
        mask = crop_or_pad_hw(np.asarray(case.mask[:, :, z], np.float32)[..., None], crop, 0.0)
        if rng is not None and rng.random() < 0.5:
            mr, ct, mask = flip(mr), flip(ct), flip(mask)
        return {"mr": np.ascontiguousarray(mr), "ct": np.ascontiguousarray(ct),
                "mask": np.ascontiguousarray(mask)}

    if train:
        ds = ds.shuffle(seed=seed).repeat(None).random_map(load, seed=seed + 1)
    else:
        ds = ds.map(load)
    return ds.batch(batch_size, drop_remainder=train).to_iter_dataset(
        read_options or DEFAULT_READ_OPTIONS)


def _require_ct(prepared: Sequence[PreparedCase]) -> None:
    missing = [c.id for c in prepared if c.ct is None]
    if missing:
        raise DataError(f"cases without a CT cannot be used for training: {missing}")


def crop_or_pad_hw(arr: np.ndarray, crop: tuple[int, int], value: float) -> np.ndarray:
    """Centred crop/pad of the first two axes of ``(X, Y, ...)`` to ``crop``, as float32."""
    return preprocess.crop_or_pad(np.asarray(arr, np.float32), crop, axes=(0, 1), value=value)


def patch_dataset(prepared: Sequence[PreparedCase], *, patch: Sequence[int], batch_size: int,
                  seed: int, train: bool = True, shard_index=None, shard_count=None,
                  read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Random 3D patches centred inside the body's bounding box.

    Patch centres are drawn uniformly in the bounding box of the mask, so every patch
    holds its centre voxel of the box (clipped to the volume); a volume smaller than
    ``patch`` is padded (MR/CT -1, mask 0). ``train``: shuffle, repeat forever, random
    flips of the first axis; otherwise one pass of 64 seeded draws per case, no flips.

    Returns:
      An ``IterDataset`` of dicts ``mr``, ``ct``, ``mask``: ``(B, D, H, W, 1)`` float32
      (``mr`` with a second channel, the prior, for cases :func:`with_prior` made).
    """
    patch = tuple(int(p) for p in patch)
    _require_ct(prepared)
    # Many draws per case per epoch: the index is just case numbers, repeated.
    draws_per_case = 64
    index = np.repeat(np.arange(len(prepared)), draws_per_case)
    ds = _source(index, shard_index, shard_count)
    boxes = []
    for case in prepared:
        nz = [np.nonzero(np.asarray(case.mask).any(axis=tuple(a for a in range(3) if a != ax)))[0]
              for ax in range(3)]
        boxes.append([(int(n[0]), int(n[-1])) if len(n) else (0, s - 1)
                      for n, s in zip(nz, case.mask.shape)])

    def load(case_index, rng):
        case = prepared[int(case_index)]
        starts = []
        for (lo, hi), size, p in zip(boxes[int(case_index)], case.mr.shape, patch):
            centre = int(rng.integers(lo, hi + 1))
            starts.append(int(np.clip(centre - p // 2, 0, max(size - p, 0))))
        sl = tuple(slice(s, s + p) for s, p in zip(starts, patch))

        def cut(vol, value):
            return preprocess.crop_or_pad(np.asarray(vol[sl], np.float32), patch,
                                          axes=(0, 1, 2), value=value)[..., None]

        mr = cut(case.mr, -1.0)
        if case.prior is not None:  # the prior is the input's second channel
            mr = np.concatenate([mr, cut(case.prior, -1.0)], axis=-1)
        out = {"mr": mr, "ct": cut(case.ct, -1.0), "mask": cut(case.mask, 0.0)}
        if train and rng.random() < 0.5:
            out = {k: np.ascontiguousarray(flip(v)) for k, v in out.items()}
        return out

    if train:
        ds = ds.shuffle(seed=seed).repeat(None)
    return ds.random_map(load, seed=seed + 1).batch(batch_size, drop_remainder=train) \
        .to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)


def unpaired_slice_dataset(prepared: Sequence[PreparedCase], *, crop: Sequence[int],
                           batch_size: int, seed: int, context: int = 0, shard_index=None,
                           shard_count=None, read_options: grain.ReadOptions | None = None
                           ) -> grain.IterDataset:
    """MR and CT slices from different cases (CycleGAN's unpaired training).

    Returns:
      An ``IterDataset`` of dicts ``mr (B, H, W, 2c+1)``, ``mr_mask``, ``ct (B, H, W, 1)``,
      ``ct_mask``; the MR and the CT of a pair never come from the same case when
      there is more than one case.
    """
    crop = tuple(int(c) for c in crop)
    _require_ct(prepared)
    index = slice_index(prepared)
    ds = _source(index, shard_index, shard_count)
    # Cases with slices, not len(prepared): a case whose mask is empty has no rows, and
    # counting it would make the draw below loop forever when only one case is left.
    n_cases = len(np.unique(index[:, 0]))

    def load(row, rng):
        mr_case, z = int(row[0]), int(row[1])
        # An independent draw of the CT slice, from any other case.
        while True:
            other = index[int(rng.integers(len(index)))]
            if n_cases == 1 or int(other[0]) != mr_case:
                break
        ct_case, zc = int(other[0]), int(other[1])
        flip_mr, flip_ct = rng.random() < 0.5, rng.random() < 0.5
        mr = crop_or_pad_hw(_slice(prepared[mr_case].mr, z, context), crop, -1.0)
        mr_mask = crop_or_pad_hw(np.asarray(prepared[mr_case].mask[:, :, z], np.float32)[..., None],
                                 crop, 0.0)
        ct = crop_or_pad_hw(np.asarray(prepared[ct_case].ct[:, :, zc])[..., None], crop, -1.0)
        ct_mask = crop_or_pad_hw(np.asarray(prepared[ct_case].mask[:, :, zc], np.float32)[..., None],
                                 crop, 0.0)
        if flip_mr:
            mr, mr_mask = flip(mr), flip(mr_mask)
        if flip_ct:
            ct, ct_mask = flip(ct), flip(ct_mask)
        return {k: np.ascontiguousarray(v) for k, v in
                (("mr", mr), ("mr_mask", mr_mask), ("ct", ct), ("ct_mask", ct_mask))}

    ds = ds.shuffle(seed=seed).repeat(None).random_map(load, seed=seed + 1)
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset(
        read_options or DEFAULT_READ_OPTIONS)
