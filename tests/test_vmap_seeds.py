"""``ablate --seeds N --vmap``: N seeds as one program equal N separate runs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sct_jax.cli import ablate
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError
from sct_jax.training import loop, vmap_seeds

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
    runs = {name: {r["seed"]: r for r in json.loads(
        (tmp_path / name / "ablation.json").read_text())["runs"]}
        for name in ("separate", "vmapped")}
    config = load_config_file(CONFIG)
    lr = float(config.optim.lr)
    for seed in (0, 1):
        a, b = runs["separate"][seed], runs["vmapped"][seed]
        assert not a["error"] and not b["error"]
        # Every step's losses, then the scored predictions, as the separate run's.
        la, lb = _losses(tmp_path / "separate" / "base" / f"seed{seed}"), _losses(
            tmp_path / "vmapped" / "base" / f"seed{seed}")
        assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([lb[s] for s in lb], [la[s] for s in la], rtol=1e-4)
        for metric in ("mae", "psnr", "ssim"):
            assert b["metrics"][metric] == pytest.approx(a["metrics"][metric], rel=1e-3)
        # The checkpoints hold the same parameters (Adam moves each by ~lr per step).
        _, sa = loop.load_state(config, tmp_path / "separate" / "base" / f"seed{seed}")
        _, sb = loop.load_state(config, tmp_path / "vmapped" / "base" / f"seed{seed}")
        for x, y in zip(jax.tree.leaves(sa["gen"].params), jax.tree.leaves(sb["gen"].params)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0,
                                       atol=2.01 * lr * STEPS)
    # The two seeds are different runs (keys and data order), not one run twice.
    l0 = _losses(tmp_path / "vmapped" / "base" / "seed0")
    l1 = _losses(tmp_path / "vmapped" / "base" / "seed1")
    assert l0[1] != l1[1]
    assert separate[0]["n_seeds"] == vmapped[0]["n_seeds"] == 2
    assert json.loads((tmp_path / "vmapped" / "ablation.json").read_text())["vmap"] is True


def test_vmap_refuses_configs_differing_beyond_the_seed():
    a, b = load_config_file(CONFIG), load_config_file(CONFIG)
    b.seed = 1
    vmap_seeds.check_same_but_seed([a, b])
    b.loss.l1_weight = 1.0
    with pytest.raises(ConfigError, match="seed only"):
        vmap_seeds.check_same_but_seed([a, b])
