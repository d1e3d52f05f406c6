"""``ablate --seeds N --vmap``: N seeds as one program of the one loop equal N separate
runs, and each seed's run directory is written as a single run writes one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sct_jax import runs
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.reproduce import ablate
from sct_jax.runs.lock import RunDirBusy, RunLock
from sct_jax.training import loop

CONFIG = "configs/pgan_pelvis.py:tiny"
STEPS = 3


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["d_loss"]) for r in records}


def test_vmapped_seeds_equal_separate_runs(tmp_path):
    args = (CONFIG, [], 2, )
    separate = ablate.run_ablation(*args, tmp_path / "separate", steps=STEPS,
                                   echo=lambda s: None)
    vmapped = ablate.run_ablation(*args, tmp_path / "vmapped", steps=STEPS, vmap=True,
                                  echo=lambda s: None)
    results = {name: {r["seed"]: r for r in json.loads(
        (tmp_path / name / "ablation.json").read_text())["runs"]}
        for name in ("separate", "vmapped")}
    config = load_config_file(CONFIG)
    lr = float(config.optim.lr)
    for seed in (0, 1):
        a, b = results["separate"][seed], results["vmapped"][seed]
        assert not a["error"] and not b["error"]
        # Every step's losses, then the scored predictions, as the separate run's.
        la, lb = _losses(tmp_path / "separate" / "base" / f"seed{seed}"), _losses(
            tmp_path / "vmapped" / "base" / f"seed{seed}")
        assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([lb[s] for s in lb], [la[s] for s in la], rtol=1e-4)
        for metric in ("mae", "psnr", "ssim"):
            assert b["metrics"][metric] == pytest.approx(a["metrics"][metric], rel=1e-3)
        # The checkpoints hold the same parameters (Adam moves each by ~lr per step).
        _, sa = runs.load_state(config, tmp_path / "separate" / "base" / f"seed{seed}")
        _, sb = runs.load_state(config, tmp_path / "vmapped" / "base" / f"seed{seed}")
        for x, y in zip(jax.tree.leaves(sa["gen"].params), jax.tree.leaves(sb["gen"].params)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0,
                                       atol=2.01 * lr * STEPS)
    # The two seeds are different runs (keys and data order), not one run twice.
    l0 = _losses(tmp_path / "vmapped" / "base" / "seed0")
    l1 = _losses(tmp_path / "vmapped" / "base" / "seed1")
    assert l0[1] != l1[1]
    assert separate[0]["n_seeds"] == vmapped[0]["n_seeds"] == 2
    assert json.loads((tmp_path / "vmapped" / "ablation.json").read_text())["vmap"] is True
    # Each seed's run directory is a whole run: geometry and batch spec recorded, the
    # lock released.
    for seed in (0, 1):
        run = tmp_path / "vmapped" / "base" / f"seed{seed}"
        assert (run / "geometry.json").is_file() and (run / "batch_spec.json").is_file()
        assert not (run / "run.lock").exists()


def test_vmap_refuses_configs_differing_beyond_the_seed():
    a, b = load_config_file(CONFIG), load_config_file(CONFIG)
    b.seed = 1
    loop.check_same_but_seed([a, b])
    b.loss.l1_weight = 1.0
    with pytest.raises(ConfigError, match="seed only"):
        loop.check_same_but_seed([a, b])


def tiny(steps=2, **train):
    c = load_config_file("configs/pix2pix_pelvis.py:tiny")
    c.train.steps = steps
    c.train.progress = False
    for key, value in train.items():
        c.train[key] = value
    return c


def test_vmapped_seeds_take_the_lock_and_validate(tmp_path):
    """The vmapped mode is the one loop: a held run directory is refused, and each seed
    is validated and keeps its best checkpoint like a single run (pix2pix on the CPU's
    convolution lowering: the flagship method must vmap)."""
    configs = [tiny(), tiny()]
    configs[1].seed = 1
    workdirs = [tmp_path / "s0", tmp_path / "s1"]
    workdirs[1].mkdir()
    held = RunLock(workdirs[1]).acquire()
    held.record["pid"] = 1  # a live process (init) holds it
    (workdirs[1] / "run.lock").write_text(json.dumps(held.record))
    with pytest.raises(RunDirBusy):
        loop.train_seeds(configs, workdirs)
    assert not (workdirs[0] / "checkpoints").exists()  # nothing trained
    (workdirs[1] / "run.lock").unlink()
    configs = [tiny(eval_every=2, eval_cases=1), tiny(eval_every=2, eval_cases=1)]
    configs[1].seed = 1
    results = loop.train_seeds(configs, workdirs)
    for result, workdir in zip(results, workdirs):
        assert not result.error and result.step == 2
        records = [json.loads(line) for line in
                   (workdir / "metrics.jsonl").read_text().splitlines()]
        assert any("val/mae" in r for r in records)
        assert runs.resolve_checkpoint(workdir, "best") == 2
    assert results[0].metrics["loss"] != results[1].metrics["loss"]


@pytest.mark.parametrize("spec", ["configs/cyclegan_pelvis.py:tiny",
                                  "configs/ldm_brain.py:autoencoder,tiny"])
def test_every_method_family_trains_vmapped(tmp_path, spec):
    """CycleGAN (two generators, an image pool) and the LDM's 3D autoencoder stage vmap
    like pix2pix and the pGAN family above: one step of two seeds, each its own run."""
    configs = [load_config_file(spec), load_config_file(spec)]
    for seed, c in enumerate(configs):
        c.seed = seed
        c.train.steps = 1
        c.train.progress = False
    workdirs = [tmp_path / "s0", tmp_path / "s1"]
    results = loop.train_seeds(configs, workdirs)
    assert [r.error for r in results] == ["", ""]
    assert results[0].metrics != results[1].metrics
    for workdir in workdirs:
        assert runs.latest_step(workdir) == 1 and not (workdir / "run.lock").exists()
