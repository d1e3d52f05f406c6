"""CycleGAN: the image pool against the reference query, the unpaired data, the tiny run.

The pool is checked against a plain-Python transcription of the reference
``ImagePool.query`` fed the same random decisions. One tiny run (2 steps through the
real loop, a checkpoint per step) is shared by the training, pool-content and
evaluation tests.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest

from sct_jax import methods
from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.config_utils import load_config_file
from sct_jax.data.io import load_volume
from sct_jax.errors import ConfigError
from sct_jax.methods import cyclegan
from sct_jax.data import datasets as train_data
from sct_jax import runs, sharding
from sct_jax.training import loop


def tiny_config():
    return load_config_file("configs/cyclegan_pelvis.py:tiny")


# ------------------------------------------------------------------------- image pool

class ReferencePool:
    """The reference ``ImagePool.query`` in plain Python, its random draws passed in."""

    def __init__(self, size):
        self.size = size
        self.images = []

    def query(self, images, swap, slot):
        out = []
        for image, swap_i, slot_i in zip(images, swap, slot):
            if len(self.images) < self.size:
                self.images.append(image.copy())
                out.append(image)
            elif swap_i:  # the reference: uniform(0, 1) > 0.5
                out.append(self.images[slot_i].copy())
                self.images[slot_i] = image.copy()
            else:
                out.append(image)
        return np.stack(out)


def test_pool_matches_the_reference_query():
    pool_size, batch, queries = 4, 3, 5
    pool = cyclegan.init_pool(pool_size, (2, 3, 1))
    reference = ReferencePool(pool_size)
    query = jax.jit(cyclegan.query_pool_with)
    draw = jax.jit(cyclegan.pool_decisions, static_argnums=(1, 2))
    full_phase_swaps = []
    for q in range(queries):
        # Distinct images, so every returned image names its origin.
        images = (np.arange(batch * 6, dtype=np.float32).reshape(batch, 2, 3, 1)
                  + 100.0 * (q + 1))
        swap, slot = (np.asarray(a) for a in draw(jax.random.key(q), batch, pool_size))
        assert slot.min() >= 0 and slot.max() < pool_size
        filled_before = len(reference.images)
        expected = reference.query(images, swap, slot)
        full_phase_swaps += [bool(s) for i, s in enumerate(swap) if filled_before + i >= pool_size]
        pool, returned = query(pool, images, swap, slot)
        np.testing.assert_array_equal(np.asarray(returned), expected)
        assert int(pool.count) == len(reference.images)
        np.testing.assert_array_equal(np.asarray(pool.images)[:len(reference.images)],
                                      np.stack(reference.images))
    # The second query crossed from filling to full inside the batch; the full phase saw
    # both decisions (otherwise the comparison above would not cover them).
    assert True in full_phase_swaps and False in full_phase_swaps, full_phase_swaps
    # Unfilled rows are never touched.
    small = cyclegan.init_pool(8, (2, 3, 1))
    small, returned = query(small, np.ones((3, 2, 3, 1), np.float32), *draw(jax.random.key(9),
                                                                             3, 8))
    assert int(small.count) == 3 and not np.asarray(small.images)[3:].any()
    np.testing.assert_array_equal(np.asarray(returned), 1.0)


def test_pool_decisions_are_fair_coins_and_uniform_slots():
    n, pool_size = 20_000, 5
    swap, slot = (np.asarray(a) for a in cyclegan.pool_decisions(jax.random.key(0), n,
                                                                 pool_size))
    assert swap.shape == slot.shape == (n,)
    # Binomial(20000, 0.5): sd 0.0035; 5 sd.
    assert abs(swap.mean() - 0.5) < 0.018
    counts = np.bincount(slot, minlength=pool_size)
    assert len(counts) == pool_size
    np.testing.assert_allclose(counts / n, 1 / pool_size, atol=0.015)


def test_zero_size_pool_returns_its_input():
    pool = cyclegan.init_pool(0, (2, 3, 1))
    images = np.random.default_rng(0).normal(size=(2, 2, 3, 1)).astype(np.float32)
    new_pool, returned = cyclegan.query_pool(pool, images, jax.random.key(0))
    assert returned is images and new_pool is pool


# ------------------------------------------------------------------------------- data

def test_unpaired_batches_pair_mr_and_ct_of_different_cases():
    config = tiny_config()
    prepared = train_data.prepare(config, train_data.case_splits(config)["train"])
    assert len(prepared) >= 2
    crop = tuple(config.data.crop)

    def slices(volume):
        out = []
        for z in range(volume.shape[2]):
            s = train_data.pipeline.crop_or_pad_hw(np.asarray(volume[:, :, z])[..., None],
                                                   crop, -1.0)
            out += [s, s[::-1]]  # the sampler flips at random
        return out

    library = {kind: {c.id: slices(getattr(c, kind)) for c in prepared}
               for kind in ("mr", "ct")}

    def source(image, kind):
        ids = {cid for cid, cands in library[kind].items()
               if any(np.array_equal(image, s) for s in cands)}
        assert len(ids) == 1, f"{kind} slice matches cases {ids}"
        return ids.pop()

    iterator = iter(loop.train_dataset(config, config.train.batch_size))
    seen = set()
    for _ in range(4):
        batch = next(iterator)
        assert batch["mr"].shape == batch["ct"].shape == (2,) + crop + (1,)
        for mr, ct in zip(batch["mr"], batch["ct"]):
            mr_id, ct_id = source(mr, "mr"), source(ct, "ct")
            assert mr_id != ct_id
            seen.add((mr_id, ct_id))
    assert len(seen) >= 2  # both orderings of the two training cases


# --------------------------------------------------------------------------- the run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = tiny_config()
    workdir = tmp_path_factory.mktemp("cyclegan_tiny")
    result = loop.train(config, workdir)
    return config, result


def initial_state(config, workdir):
    """The state the loop started from (same key and program as ``loop.train``)."""
    method = methods.get_method(config.method)
    spec = runs.read_batch_spec(workdir)
    init_rng, _ = jax.random.split(jax.random.key_data(jax.random.key(config.seed)))
    create = functools.partial(method.create_state, config, batch_spec=spec)
    repl = sharding.replicated(sharding.make_mesh(dict(config.mesh)))
    shardings = jax.tree.map(lambda _: repl, jax.eval_shape(create, init_rng))
    return jax.jit(create, out_shardings=shardings)(init_rng)


def test_two_steps_train_all_four_networks(tiny_run):
    config, result = tiny_run
    m = result.metrics
    assert result.step == 2
    assert all(math.isfinite(v) for v in m.values()), m
    # The reference's weights: cycle 10 / 10, identity 0.5 x the domain's cycle weight.
    assert m["loss"] == pytest.approx(
        m["g_adv_ct"] + m["g_adv_mr"] + 10 * (m["cycle_mr"] + m["cycle_ct"])
        + 5 * (m["idt_ct"] + m["idt_mr"]), rel=1e-5)
    assert m["d_loss"] == pytest.approx(m["d_ct_loss"] + m["d_mr_loss"], rel=1e-5)
    before = initial_state(config, result.workdir)
    for name in ("g_mr2ct", "g_ct2mr", "d_ct", "d_mr"):
        changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(before[name].params),
                       jax.tree.leaves(result.state[name].params))]
        assert all(changed), f"{name}: {changed.count(False)} parameter arrays unchanged"
        assert int(result.state[name].step) == 2


def test_pools_hold_the_generators_fakes(tiny_run):
    """2 steps x batch 2 fill the size-4 pools with the fakes each step's forward made."""
    config, result = tiny_run
    workdir = result.workdir
    batches = iter(loop.train_dataset(config, config.train.batch_size))
    batch1, batch2 = next(batches), next(batches)
    step1 = runs.load_state(config, workdir, step=1)[1]
    states = (initial_state(config, workdir), step1)
    to_ct = jax.jit(functools.partial(cyclegan.predict, config))
    to_mr = jax.jit(functools.partial(cyclegan.predict_ct_to_mr, config))
    pool_ct, pool_mr = result.state["pool_ct"], result.state["pool_mr"]
    assert int(pool_ct.count) == int(pool_mr.count) == 4
    for rows, state, batch in ((slice(0, 2), states[0], batch1),
                               (slice(2, 4), states[1], batch2)):
        fake_ct = np.asarray(to_ct(state, batch["mr"]))
        fake_mr = np.asarray(to_mr(state, batch["ct"]))
        assert fake_ct.shape == fake_mr.shape == batch["mr"].shape
        np.testing.assert_allclose(np.asarray(pool_ct.images)[rows], fake_ct, atol=1e-5)
        np.testing.assert_allclose(np.asarray(pool_mr.images)[rows], fake_mr, atol=1e-5)


def test_evaluate_run_scores_the_paired_test_case(tiny_run):
    config, result = tiny_run
    report = evaluate_run(config, result.workdir, panels=False)
    assert len(report.cases) == 1
    scores = report.cases[0].metrics
    for key in ("mae", "psnr", "ssim"):
        assert math.isfinite(scores[key]), scores
    case = train_data.case_splits(config)["test"][0]
    sct = load_volume(result.workdir / "predictions" / case.id / "sct.nii.gz")
    assert sct.shape == load_volume(case.mr).shape


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("variant", ["", "small", "tiny"])
def test_every_variant_validates(variant):
    config = load_config_file(f"configs/cyclegan_pelvis.py:{variant}" if variant
                              else "configs/cyclegan_pelvis.py")
    cyclegan.validate_config(config)
    assert config.data.mode == "unpaired_slices" and config.model.gen.dropout == 0.0


@pytest.mark.parametrize("key, value, message", [
    ("data.crop", (30, 32), "config.data.crop"),
    ("data.mode", "slices", "config.data.mode"),
    ("data.context", 1, "config.data.context"),
    ("loss.gan", "wgan", "config.loss.gan"),
    ("loss.identity_weight", -0.5, "config.loss.identity_weight"),
    ("model.pool_size", -1, "config.model.pool_size"),
])
def test_bad_config_raises(key, value, message):
    config = tiny_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        cyclegan.validate_config(config)


def test_validation_slice_images(tiny_run, tmp_path):
    """CycleGAN draws the fixed validation slice like every method: MR, CT, sCT, error."""
    from sct_jax.training import validation
    from sct_jax.training.logging import MetricWriter
    config, result = tiny_run
    validator = validation.Validator(config, validation.validation_cases(config))
    images, ranges = validator.images(result.state)
    data, z = validator.data[0], validator.slice_index
    body = data.mask[:, :, z].T[::-1]
    np.testing.assert_allclose(images["val/abs_error_hu"],
                               np.abs(images["val/sct"] - images["val/ct"]) * body,
                               rtol=1e-5, atol=1e-3)
    assert images["val/abs_error_hu"].max() > 0 and ranges["val/ct"] == (-1000.0, 1500.0)
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write_images(7, images, ranges)
    writer.close()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"val_{k}_step7.png" for k in ("abs_error_hu", "ct", "mr", "sct")]
