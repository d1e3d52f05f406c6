"""``python -m sct_jax.cli.ablate``: the grid, the table and its files, and the pieces."""

from __future__ import annotations

import json
import math

import pytest

from sct_jax.cli import ablate as ablate_cli
from sct_jax.reproduce import ablate
from sct_jax.config_utils import load_config_file
from sct_jax.errors import ConfigError


def test_ablate_pgan_tiny_grid(tmp_path, capsys):
    root = tmp_path / "abl"
    argv = ["--config", "configs/pgan_pelvis.py:tiny", "--sweep", "loss.l1_weight=50,100",
            "--seeds", "1", "--steps", "2", "--workdir", str(root),
            "--set", "loss.adv_weight=0.5"]
    assert ablate_cli.main(argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("ablation of"):]
    for label in ("loss.l1_weight=50", "loss.l1_weight=100"):
        assert label in table
    for heading in ("MAE [HU]", "PSNR [dB]", "SSIM", "bone MAE [HU]", "bone Dice", "s/step"):
        assert heading in table

    record = json.loads((root / "ablation.json").read_text())
    rows = {r["point"]: r for r in record["rows"]}
    assert set(rows) == {"loss.l1_weight=50", "loss.l1_weight=100"}
    for row in rows.values():
        assert row["n_seeds"] == 1 and row["n_failed"] == 0
        assert 0 < row["mae_mean"] < 3000 and 0 < row["ssim_mean"] <= 1
        assert row["s_per_step_mean"] > 0
        assert row["mae_std"] is None  # one seed: no spread
    csv_lines = (root / "ablation.csv").read_text().splitlines()
    assert csv_lines[0].startswith("point,n_seeds,n_failed,mae_mean,mae_std")
    assert len(csv_lines) == 3
    # Each run trained with its own override and scored its own predictions.
    run50 = root / "loss.l1_weight-50" / "seed0"
    written = json.loads((run50 / "config.json").read_text())
    assert written["loss"]["l1_weight"] == 50.0 and written["loss"]["adv_weight"] == 0.5
    assert (run50 / "predictions" / "metrics.json").exists()
    # The per-run MAE is the scoring report's mean.
    scored = json.loads((run50 / "predictions" / "metrics.json").read_text())
    assert rows["loss.l1_weight=50"]["mae_mean"] == pytest.approx(
        scored["metrics"]["mae"]["mean"])

    # A second invocation reuses the finished runs (no training) and rewrites the table.
    assert ablate_cli.main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 2


def test_sweep_parsing():
    assert ablate.split_values("a,(1, 2),'x,y'") == ["a", "(1, 2)", "'x,y'"]
    assert ablate.parse_sweep("meta.method=lookahead,jvp") == ("meta.method",
                                                               ["lookahead", "jvp"])
    assert ablate.parse_sweep("data.crop=(32, 32),(64,32)") == ("data.crop",
                                                                [(32, 32), (64, 32)])
    assert ablate.parse_sweep("optim.lr=1e-4,2e-4")[1] == [1e-4, 2e-4]
    with pytest.raises(ConfigError, match="key=value1"):
        ablate.parse_sweep("meta.method")
    points = ablate.grid_points([("a", [1, 2]), ("b", ["x", "y"])])
    assert points == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"},
                      {"a": 2, "b": "y"}]
    assert ablate.point_dirname({"data.crop": (32, 32)}) == "data.crop-32x32"


def test_several_configs_are_crossed_with_the_grid(tmp_path, monkeypatch):
    """Rows per config x point, named by the config; --set reaches every run."""
    trained = []

    def fake_run(config, workdir, point, seed, echo=print):
        trained.append((point, seed, workdir.relative_to(tmp_path).as_posix(), config))
        return ablate.RunResult(point, seed, str(workdir),
                                {"mae": float(config.loss.l1_weight), "s_per_step": 1.0}, 0.0)

    monkeypatch.setattr(ablate, "run_one", fake_run)
    rows = ablate.run_ablation(["configs/pgan_pelvis.py:tiny", "configs/meta_pgan_pelvis.py:tiny"],
                               ["loss.l1_weight=50,100"], 2, tmp_path, steps=3,
                               sets=["loss.adv_weight=0.25"], echo=lambda _: None)
    assert [r["point"] for r in rows] == [
        "pgan_pelvis_tiny,loss.l1_weight=50", "pgan_pelvis_tiny,loss.l1_weight=100",
        "meta_pgan_pelvis_tiny,loss.l1_weight=50", "meta_pgan_pelvis_tiny,loss.l1_weight=100"]
    assert [r["mae_mean"] for r in rows] == [50.0, 100.0, 50.0, 100.0]
    assert len(trained) == 8
    assert trained[0][2] == "pgan_pelvis_tiny_loss.l1_weight-50/seed0"
    assert {t[3].method for t in trained} == {"pgan", "meta_pgan"}
    assert all(t[3].loss.adv_weight == 0.25 and t[3].train.steps == 3 for t in trained)
    assert sorted({t[3].seed - t[1] for t in trained}) == [0]  # base seed 0 + k
    record = json.loads((tmp_path / "ablation.json").read_text())
    assert record["sets"] == ["loss.adv_weight=0.25"] and len(record["config"]) == 2
    with pytest.raises(ConfigError, match="different names"):
        ablate.run_ablation(["configs/pgan_pelvis.py:tiny"] * 2, [], 1, tmp_path / "x")
    with pytest.raises(ConfigError, match="key=value"):
        ablate.run_ablation("configs/pgan_pelvis.py:tiny", [], 1, tmp_path / "y",
                            sets=["loss.adv_weight"])


def test_overrides_are_checked():
    config = load_config_file("configs/meta_pgan_pelvis.py:tiny")
    ablate.set_override(config, "meta.method", "lookahead")
    ablate.set_override(config, "loss.l1_weight", 50)
    assert config.meta.method == "lookahead" and config.loss.l1_weight == 50.0
    with pytest.raises(ConfigError, match="meta.methd"):
        ablate.set_override(config, "meta.methd", "jvp")
    with pytest.raises(ConfigError, match="no field 'mta'"):
        ablate.set_override(config, "mta.method", "jvp")
    with pytest.raises(ConfigError, match="loss.l1_weight"):
        ablate.set_override(config, "loss.l1_weight", "fifty")


def test_bad_sweep_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="loss.l1_wieght"):
        ablate.run_ablation("configs/pgan_pelvis.py:tiny", ["loss.l1_wieght=1,2"], 1,
                            tmp_path / "abl")
    assert not (tmp_path / "abl").exists()


def test_seconds_per_step_is_the_median_interval(tmp_path):
    times = [(1, 100.0), (2, 100.5), (3, 101.0), (4, 101.5), (8, 150.0)]  # a restart gap
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "time": t}) for s, t in times) + "\n")
    # Intervals: 0.5, 0.5, 0.5, 48.5 / 4 = 12.125 -> median 0.5.
    assert ablate.seconds_per_step(tmp_path) == pytest.approx(0.5)
    assert math.isnan(ablate.seconds_per_step(tmp_path / "missing"))


def test_summary_mean_and_sample_std():
    results = [ablate.RunResult("p", k, "", {"mae": v, "s_per_step": 0.1}, 1.0)
               for k, v in enumerate([10.0, 20.0, 30.0])]
    results.append(ablate.RunResult("p", 3, "", {}, math.nan, error="diverged"))
    (row,) = ablate.summarize(results, ["p"])
    assert row["n_seeds"] == 3 and row["n_failed"] == 1
    assert row["mae_mean"] == pytest.approx(20.0)
    assert row["mae_std"] == pytest.approx(10.0)  # ddof=1
    assert "20.0 ± 10.0" in ablate.format_table([row])
