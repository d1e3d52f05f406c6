"""Tests of sct_jax.data.pipeline: the prepared-case cache and the grain datasets.

Every batch element is identified by exact comparison with slices cut directly out of
the prepared arrays (all cases, all z, flipped or not), so the tests check content, not
just shapes: which (case, z) was used, whether it was flipped, and that MR, CT and mask
agree.
"""

import itertools
import os
import time

import nibabel as nib
import numpy as np
import pytest

from sct_jax.data import pipeline, preprocess, synthrad
from sct_jax.data.io import save_volume
from sct_jax.errors import ConfigError, DataError

SHAPE = (24, 20, 8)
CROP = (16, 24)  # crops X (24 -> 16) and pads Y (20 -> 24)
AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])
# Axial slices (z) with body in them, per case: edges at z = 0 and z = 7 are included.
MASK_Z = {0: range(0, 6), 1: range(2, 8), 2: range(3, 5)}


def _case_arrays(index):
    """MR (random), CT (random + a per-case offset, HU) and a box mask on some slices."""
    rng = np.random.default_rng(index)
    mr = rng.gamma(2.0, 100.0, SHAPE).astype(np.float32)
    ct = (rng.normal(0, 50, SHAPE) + 400 * index).astype(np.int16)
    mask = np.zeros(SHAPE, np.uint8)
    mask[5 + index:18, 4:15 - index, list(MASK_Z[index])] = 1
    return mr, ct, mask


def _write_cases(root, n):
    for index in range(n):
        for name, data in zip(("mr", "ct", "mask"), _case_arrays(index)):
            save_volume(root / f"case{index}" / f"{name}.nii.gz", data, AFFINE)
    return synthrad.discover_cases(root)


@pytest.fixture(autouse=True, scope="module")
def _synthetic_ct_values():
    """These CTs are random numbers with per-case offsets, not HU: the HU check
    (sct_jax.data.hu) is told so the way a user would."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCT_JAX_ALLOW_NON_HU", "1")
        yield


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _write_cases(tmp_path_factory.mktemp("pipeline_cases"), len(MASK_Z))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline_cache")


@pytest.fixture(scope="module")
def prepared(cases, cache_dir):
    return pipeline.prepare_cases(cases, cache_dir)


# ---------------------------------------------------------------------------- cache


def test_prepared_arrays_are_the_normalised_sources(prepared):
    for index, case in enumerate(prepared):
        mr, ct, mask = _case_arrays(index)
        assert case.id == f"case{index}"
        lo, hi = np.percentile(mr[mask > 0].astype(np.float64), [0.5, 99.5])
        np.testing.assert_allclose(case.mr, np.clip((mr - lo) / (hi - lo) * 2 - 1, -1, 1),
                                   atol=1e-5)
        np.testing.assert_allclose(case.ct, (ct.astype(np.float64) + 1024) / 2012 - 1,
                                   atol=1e-6)
        np.testing.assert_array_equal(case.mask, mask)
        np.testing.assert_array_equal(case.affine, AFFINE)
        assert case.mr.dtype == case.ct.dtype == np.float32 and case.mask.dtype == np.uint8


def test_second_prepare_reads_the_cache_without_decoding(cases, cache_dir, prepared,
                                                         monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a source volume although the cache is complete")

    monkeypatch.setattr(synthrad, "load_case", no_decoding)
    monkeypatch.setattr(nib, "load", no_decoding)
    again = pipeline.prepare_cases(cases, cache_dir)
    for first, second in zip(prepared, again):
        assert second.id == first.id
        for name in ("mr", "ct", "mask"):
            array = getattr(second, name)
            assert isinstance(array, np.memmap) and not array.flags.writeable
            np.testing.assert_array_equal(array, getattr(first, name))
        np.testing.assert_array_equal(second.affine, first.affine)
    # Other percentiles are another cache entry: it must decode (and here, fail).
    with pytest.raises(AssertionError, match="decoded"):
        pipeline.prepare_cases(cases[:1], cache_dir, mr_percentiles=(1.0, 99.0))


@pytest.mark.parametrize("percentiles", [(99.5, 0.5), (-1.0, 50.0), (5.0, 101.0)])
def test_bad_mr_percentiles_are_a_config_error(cases, tmp_path, percentiles):
    with pytest.raises(ConfigError, match="mr_percentiles"):
        pipeline.prepare_cases(cases[:1], tmp_path, mr_percentiles=percentiles)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_source_invalidates_the_cache(tmp_path):
    (case,) = _write_cases(tmp_path / "data", 1)
    first = pipeline.prepare_case(case, tmp_path / "cache")
    mr, ct, mask = _case_arrays(0)
    save_volume(case.ct, ct + 100, AFFINE)  # new content, written as a user would
    second = pipeline.prepare_case(case, tmp_path / "cache")
    np.testing.assert_allclose(second.ct - first.ct, 100 / 2012, atol=1e-6)
    # Cache files are shared like every other output.
    for name in os.listdir(tmp_path / "cache"):
        for f in (tmp_path / "cache" / name).iterdir():
            assert f.stat().st_mode & 0o777 == 0o644, f


def test_case_without_mask_gets_one_from_the_mr(tmp_path):
    mr, ct, _ = _case_arrays(0)
    mr[:3] = 0.0  # a dark border the mask must leave out
    save_volume(tmp_path / "c" / "mr.nii.gz", mr, AFFINE)
    save_volume(tmp_path / "c" / "ct.nii.gz", ct, AFFINE)
    (case,) = synthrad.discover_cases(tmp_path)
    prep = pipeline.prepare_case(case, tmp_path / "cache")
    np.testing.assert_array_equal(prep.mask, preprocess.body_mask_from_mr(mr))
    assert not prep.mask[0].any() and prep.mask[10:20].all()


# ------------------------------------------------------------------------- slices


def _crop(slab, value):
    """``(24, 20, ...)`` -> ``(16, 24, ...)``: X cropped 4 each side, Y padded 2 each side."""
    out = slab[4:20]
    widths = [(0, 0), (2, 2)] + [(0, 0)] * (out.ndim - 2)
    return np.pad(out, widths, constant_values=value).astype(np.float32)


def _expected(prepared, case, z, context, flip=False):
    """The (mr, ct, mask) slice of (case, z) cut directly from the prepared arrays."""
    vol = prepared[case]
    last = SHAPE[2] - 1
    channels = [vol.mr[:, :, min(max(k, 0), last)] for k in range(z - context, z + context + 1)]
    out = (_crop(np.stack(channels, -1), -1.0), _crop(vol.ct[:, :, z, None], -1.0),
           _crop(vol.mask[:, :, z, None], 0.0))
    return tuple(a[::-1] for a in out) if flip else out


def _identify(prepared, example, context, key="mr"):
    """(case, z, flipped) whose slice equals ``example[key]`` exactly (unique)."""
    position = {"mr": 0, "ct": 1, "mask": 2}[key]
    found = [(c, z, flip) for c, z, flip in itertools.product(
        range(len(prepared)), range(SHAPE[2]), (False, True))
        if np.array_equal(example[key], _expected(prepared, c, z, context, flip)[position])]
    assert len(found) == 1, found
    return found[0]


def _examples(batches):
    for batch in batches:
        for i in range(len(batch["mr"])):
            yield {k: v[i] for k, v in batch.items()}


ALL_SLICES = [(c, z) for c in sorted(MASK_Z) for z in MASK_Z[c]]


def test_slice_index_lists_exactly_the_slices_with_body(prepared):
    assert [tuple(r) for r in pipeline.slice_index(prepared)] == ALL_SLICES


@pytest.mark.parametrize("context", [0, 1])
def test_eval_pass_is_ordered_complete_and_matches_the_prepared_arrays(prepared, context):
    ds = pipeline.slice_dataset(prepared, crop=CROP, batch_size=5, seed=0, context=context,
                                train=False)
    batches = list(ds)
    assert [len(b["mr"]) for b in batches] == [5, 5, 4]  # 14 slices, last batch partial
    first = batches[0]
    assert first["mr"].shape == (5, *CROP, 2 * context + 1)
    assert first["ct"].shape == first["mask"].shape == (5, *CROP, 1)
    assert all(v.dtype == np.float32 for v in first.values())
    for example, (case, z) in zip(_examples(batches), ALL_SLICES, strict=True):
        for key, want in zip(("mr", "ct", "mask"), _expected(prepared, case, z, context)):
            np.testing.assert_array_equal(example[key], want)


def test_context_channels_are_neighbours_with_edges_replicated(prepared):
    ds = pipeline.slice_dataset(prepared, crop=CROP, batch_size=14, seed=0, context=1,
                                train=False)
    (batch,) = list(ds)
    mr = prepared[0].mr
    # Case 0, z = 0 is row 0: channels z = 0 (replicated), 0, 1.
    for channel, k in enumerate((0, 0, 1)):
        np.testing.assert_array_equal(batch["mr"][0, :, 2:22, channel], mr[4:20, :, k])
    # Case 1, z = 7 (the last slice) is row 11: channels 6, 7, 7 (replicated).
    assert ALL_SLICES[11] == (1, 7)
    for channel, k in enumerate((6, 7, 7)):
        np.testing.assert_array_equal(batch["mr"][11, :, 2:22, channel],
                                      prepared[1].mr[4:20, :, k])
    # Padding along Y is -1 for the MR and 0 for the mask.
    assert np.all(batch["mr"][:, :, :2] == -1) and np.all(batch["mask"][:, :, 22:] == 0)


def _train_batches(prepared, seed, n, context=0, batch_size=4):
    ds = pipeline.slice_dataset(prepared, crop=CROP, batch_size=batch_size, seed=seed,
                                context=context, train=True)
    iterator = iter(ds)
    return [next(iterator) for _ in range(n)]


def test_training_batches_flip_mr_ct_and_mask_together(prepared):
    batches = _train_batches(prepared, seed=0, n=7, context=1)  # 28 examples, 2 epochs
    assert all(b["mr"].shape == (4, *CROP, 3) for b in batches)
    seen = []
    for example in _examples(batches):
        case, z, flipped = _identify(prepared, example, context=1)
        for key, want in zip(("ct", "mask"), _expected(prepared, case, z, 1, flipped)[1:]):
            np.testing.assert_array_equal(example[key], want)
        seen.append((case, z, flipped))
    assert {flip for _, _, flip in seen} == {False, True}
    # Each epoch (14 slices) visits every slice with body exactly once.
    for epoch in (seen[:14], seen[14:28]):
        assert sorted((c, z) for c, z, _ in epoch) == ALL_SLICES
    assert [s[:2] for s in seen[:14]] != [s[:2] for s in seen[14:28]], "reshuffled"


def test_same_seed_same_batches_other_seed_other_order(prepared):
    a = _train_batches(prepared, seed=5, n=3)
    b = _train_batches(prepared, seed=5, n=3)
    c = _train_batches(prepared, seed=6, n=3)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])

    def order(batches):
        return [_identify(prepared, e, 0)[:2] for e in _examples(batches)]

    assert order(a) != order(c)


_DATASETS = {
    "slices": lambda prepared: pipeline.slice_dataset(
        prepared, crop=CROP, batch_size=4, seed=1, context=1, train=True),
    "patches": lambda prepared: pipeline.patch_dataset(
        prepared, patch=(8, 6, 4), batch_size=2, seed=1, train=True),
    "unpaired": lambda prepared: pipeline.unpaired_slice_dataset(
        prepared, crop=CROP, batch_size=4, seed=1),
}


@pytest.mark.parametrize("kind", sorted(_DATASETS))
def test_iterator_state_resumes_on_a_fresh_dataset(prepared, kind, tmp_path):
    """3 batches, checkpoint (grain's orbax handler: JSON), 2 more; a fresh iterator
    restored from the checkpoint yields the same 2."""
    import grain

    iterator = iter(_DATASETS[kind](prepared))
    for _ in range(3):
        next(iterator)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(iterator))
    expected = [next(iterator) for _ in range(2)]

    fresh = iter(_DATASETS[kind](prepared))
    handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(fresh))
    for want in expected:
        got = next(fresh)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_two_shards_split_the_slices_without_overlap(prepared):
    def shard(index):
        ds = pipeline.slice_dataset(prepared, crop=CROP, batch_size=3, seed=0, train=False,
                                    shard_index=index, shard_count=2)
        return [_identify(prepared, e, 0)[:2] for e in _examples(ds)]

    first, second = shard(0), shard(1)
    assert len(first) == len(second) == 7
    assert not set(first) & set(second)
    assert sorted(first + second) == ALL_SLICES


def test_too_few_slices_for_the_shards_and_missing_ct(prepared):
    with pytest.raises(DataError, match="sharded"):
        pipeline.slice_dataset(prepared, crop=CROP, batch_size=1, seed=0, train=False,
                               shard_index=0, shard_count=99)
    no_ct = [pipeline.PreparedCase("x", prepared[0].mr, None, prepared[0].mask, AFFINE)]
    with pytest.raises(DataError, match="x"):
        pipeline.slice_dataset(no_ct, crop=CROP, batch_size=1, seed=0)


def test_unpaired_slices_never_pair_a_case_with_itself(prepared):
    ds = pipeline.unpaired_slice_dataset(prepared, crop=CROP, batch_size=4, seed=2,
                                         context=1)
    iterator = iter(ds)
    batches = [next(iterator) for _ in range(6)]
    assert batches[0]["mr"].shape == (4, *CROP, 3)
    assert batches[0]["ct"].shape == batches[0]["ct_mask"].shape == (4, *CROP, 1)
    pairs = []
    for example in _examples(batches):
        mr_case, mr_z, mr_flip = _identify(prepared, example, 1, "mr")
        ct_case, ct_z, ct_flip = _identify(prepared, example, 1, "ct")
        np.testing.assert_array_equal(
            example["mr_mask"], _expected(prepared, mr_case, mr_z, 1, mr_flip)[2])
        np.testing.assert_array_equal(
            example["ct_mask"], _expected(prepared, ct_case, ct_z, 1, ct_flip)[2])
        assert (mr_case, mr_z) in ALL_SLICES and (ct_case, ct_z) in ALL_SLICES
        pairs.append((mr_case, ct_case))
    assert all(m != c for m, c in pairs)
    assert len({c for _, c in pairs}) == 3  # every case's CT is drawn


def test_unpaired_with_only_one_case_having_body_still_runs(prepared):
    empty = pipeline.PreparedCase("empty", prepared[1].mr, prepared[1].ct,
                                  np.zeros(SHAPE, np.uint8), AFFINE)
    ds = pipeline.unpaired_slice_dataset([prepared[0], empty], crop=CROP, batch_size=2,
                                         seed=0)
    batch = next(iter(ds))  # used to loop forever looking for another case's CT
    assert batch["ct"].shape == (2, *CROP, 1)


# ------------------------------------------------------------------------ patches


def test_patches_have_the_shape_lie_in_the_volume_and_touch_the_body(prepared):
    patch = (8, 6, 4)
    ds = pipeline.patch_dataset(prepared, patch=patch, batch_size=3, seed=0, train=True)
    iterator = iter(ds)
    examples = list(_examples([next(iterator) for _ in range(4)]))
    for example in examples:
        assert example["mr"].shape == example["ct"].shape == (*patch, 1)
        assert example["mask"].sum() > 0
        # The MR patch is a (possibly X-flipped) window of one prepared case, and CT and
        # mask are the same window: search every window of every case at once.
        matches = []
        for case, vol in enumerate(prepared):
            windows = np.lib.stride_tricks.sliding_window_view(np.asarray(vol.mr), patch)
            for flip in (False, True):
                mr = example["mr"][::-1, ..., 0] if flip else example["mr"][..., 0]
                hits = np.argwhere(np.all(windows == mr, axis=(3, 4, 5)))
                matches += [(case, tuple(start), flip) for start in hits]
        assert len(matches) == 1
        case, start, flip = matches[0]
        window = tuple(slice(s, s + p) for s, p in zip(start, patch))
        for key in ("ct", "mask"):
            got = example[key][::-1] if flip else example[key]
            np.testing.assert_array_equal(got[..., 0], getattr(prepared[case], key)[window])


def test_patch_larger_than_the_volume_is_padded(prepared):
    patch = (28, 24, 10)
    ds = pipeline.patch_dataset(prepared[:1], patch=patch, batch_size=2, seed=0, train=False)
    batch = next(iter(ds))
    assert batch["mr"].shape == (2, *patch, 1)
    # No room to move: the whole volume, centred, padded with -1 (mask 0).
    want = np.pad(np.asarray(prepared[0].mr), [(2, 2), (2, 2), (1, 1)], constant_values=-1)
    np.testing.assert_array_equal(batch["mr"][0, ..., 0], want)
    want_mask = np.pad(np.asarray(prepared[0].mask), [(2, 2), (2, 2), (1, 1)])
    np.testing.assert_array_equal(batch["mask"][1, ..., 0], want_mask)


class _CountingArray(np.ndarray):
    """An array that counts how many times it is indexed (one per slice loaded)."""

    reads = 0

    def __getitem__(self, item):
        type(self).reads += 1
        return super().__getitem__(item)


def test_read_ahead_is_bounded(prepared):
    """grain's default read-ahead is 500 batches (GBs at 320 x 192); ours is a few."""
    counted = [pipeline.PreparedCase(c.id, c.mr, np.asarray(c.ct).view(_CountingArray),
                                     c.mask, c.affine) for c in prepared]
    _CountingArray.reads = 0
    iterator = iter(pipeline.slice_dataset(counted, crop=CROP, batch_size=2, seed=0))
    next(iterator)
    time.sleep(0.5)  # time for background threads to read ahead
    buffered = pipeline.DEFAULT_READ_OPTIONS.prefetch_buffer_size
    assert buffered <= 16
    # The batch returned, the buffered ones, and one being read by each thread at most.
    threads = pipeline.DEFAULT_READ_OPTIONS.num_threads
    assert 2 <= _CountingArray.reads <= 2 * (1 + buffered + threads)
