"""The generic loop on pix2pix tiny: resume, NaN guard, no recompilation, bad configs.

These use a synthetic in-memory grain dataset so they test the loop alone; the
phantom-data end-to-end run is in ``test_end_to_end.py``.
"""

import json
import logging

import grain
import jax
import numpy as np
import pytest

from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.training import loop


def tiny_config(steps=3, **train):
    c = load_config_file("configs/pix2pix_pelvis.py:tiny")
    c.train.steps = steps
    c.train.ckpt_every = 1
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def synthetic_dataset(config, local_batch, nan_at=None):
    """Deterministic random batches; batch number ``nan_at`` (0-based) holds a NaN."""
    h, w = config.data.crop

    def make(i):
        rng = np.random.default_rng(i)
        mr = rng.uniform(-1, 1, (local_batch, h, w, 1)).astype(np.float32)
        ct = np.tanh(2 * mr + 0.1 * rng.standard_normal(mr.shape)).astype(np.float32)
        if nan_at is not None and i == nan_at:
            mr[0, 0, 0, 0] = np.nan
        return {"mr": mr, "ct": ct, "mask": np.ones_like(mr)}

    return grain.MapDataset.range(10_000).map(make).to_iter_dataset()


def test_resume_continues_exactly(tmp_path, capsys):
    """3 steps straight == 2 steps, a fresh process-like restart, then step 3."""
    straight = loop.train(tiny_config(steps=3), tmp_path / "a", make_dataset=synthetic_dataset)
    loop.train(tiny_config(steps=2), tmp_path / "b", make_dataset=synthetic_dataset)
    assert "resumed" not in capsys.readouterr().out
    resumed = loop.train(tiny_config(steps=3), tmp_path / "b", make_dataset=synthetic_dataset)
    checkpoint_dir = (tmp_path / "b" / "checkpoints" / "2").absolute()
    assert f"resumed from step 2 (checkpoint {checkpoint_dir})" in capsys.readouterr().out
    assert resumed.step == straight.step == 3
    # The step-3 loss depends on the restored params, optimizer state, data position
    # and RNG: all must match.
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], rel=1e-6)
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    records = [json.loads(line) for line in
               (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    # steps 1, 2, the resume marker, then 3
    assert [(r["step"], r.get("event")) for r in records] == [
        (1, None), (2, None), (2, "resume"), (3, None)]


def test_nan_in_batch_stops_with_step_and_checkpoint(tmp_path):
    config = tiny_config(steps=6)
    with pytest.raises(loop.TrainingDiverged) as err:
        loop.train(config, tmp_path,
                   make_dataset=lambda c, b: synthetic_dataset(c, b, nan_at=3))
    message = str(err.value)
    assert "at step 4" in message, message  # the 4th batch (index 3) holds the NaN
    assert "last good checkpoint: step 3" in message, message


def test_step_compiles_once(tmp_path, caplog):
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        loop.train(tiny_config(steps=3, ckpt_every=100), tmp_path,
                   make_dataset=synthetic_dataset)
    compiles = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("Compiling jit(train_step)")]
    assert len(compiles) == 1, compiles


def test_unknown_method_fails_at_start(tmp_path):
    config = tiny_config()
    config.method = "pix3pix"
    with pytest.raises(ConfigError, match="config.method='pix3pix'"):
        loop.train(config, tmp_path, make_dataset=synthetic_dataset)


def test_crop_not_divisible_fails_at_start(tmp_path):
    config = tiny_config()
    config.data.crop = (30, 32)
    with pytest.raises(ConfigError, match=r"config.data.crop=\(30, 32\).*2\*\*model.gen.num_downs=8"):
        loop.train(config, tmp_path, make_dataset=synthetic_dataset)


def test_overfitting_one_slice_beats_the_constant_baseline(tmp_path):
    """The loop learns: 60 steps on one phantom slice bring the generator's MAE inside
    the body well below the constant soft-tissue sCT's (the evaluation's floor)."""
    from sct_jax.evaluation.evaluate import SOFT_TISSUE_HU
    from sct_jax.data import preprocess
    from sct_jax.data import datasets as train_data

    config = tiny_config(steps=60, ckpt_every=60)
    config.optim.lr = 2e-3
    case = train_data.prepare(config, train_data.case_splits(config)["train"][:1])[0]
    z = case.ct.shape[2] // 2
    h, w = config.data.crop

    def crop(volume):
        return preprocess.crop_or_pad(np.asarray(volume[:, :, z], np.float32)[..., None],
                                      (h, w), axes=(0, 1), value=-1.0)

    mr, ct, mask = crop(case.mr), crop(case.ct), crop(case.mask) > 0
    assert mask.mean() > 0.3  # a slice through the body

    def one_slice(config, local_batch):
        batch = {"mr": np.stack([mr] * local_batch), "ct": np.stack([ct] * local_batch),
                 "mask": np.stack([mask.astype(np.float32)] * local_batch)}
        return grain.MapDataset.range(10_000).map(lambda _: batch).to_iter_dataset()

    result = loop.train(config, tmp_path, make_dataset=one_slice)
    gen = result.state["gen"]
    pred = np.asarray(gen.apply_fn({"params": gen.params}, mr[None], train=False))[0]
    ct_hu = np.asarray(preprocess.unit_to_ct(ct))
    mae = np.abs(np.asarray(preprocess.unit_to_ct(pred)) - ct_hu)[mask].mean()
    baseline = np.abs(SOFT_TISSUE_HU - ct_hu)[mask].mean()
    assert mae < 0.7 * baseline, (mae, baseline)
