"""sct-reproduce: the table (mean ± std over seeds), the baselines and the seed commands."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from sct_jax.reproduce import __main__ as cli
from sct_jax.evaluation import baselines as evaluation_baselines
from sct_jax.reproduce import baselines, table


def _row(method, seed, mae, dice=math.nan, note=""):
    return {"method": method, "seed": seed, "mae": mae, "psnr": 20.0, "ssim": 0.5,
            "bone_mae": 2 * mae, "bone_dice": dice, "wall_s": 10.0, "note": note}


def test_table_mean_and_sample_std_over_seeds(tmp_path):
    maes = [100.0, 110.0, 130.0]
    rows = [_row("A", k, m, dice=0.5 + 0.1 * k, note="n1" if k else "") for k, m in enumerate(maes)]
    rows += [_row("B", 0, 90.0), _row("floor", None, 12.0, note="ideal")]
    md_path, csv_path = table.write_tables(tmp_path, rows, "title")
    entries = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [e["method"] for e in entries] == ["A", "B", "floor"]
    a, b, floor = entries
    assert float(a["mae_mean"]) == pytest.approx(np.mean(maes))
    assert float(a["mae_std"]) == pytest.approx(np.std(maes, ddof=1))
    assert float(a["bone_dice_mean"]) == pytest.approx(0.6)
    assert (a["seeds"], b["seeds"], floor["seeds"]) == ("3", "1", "")
    assert b["mae_std"] == "" and b["bone_dice_mean"] == ""  # one seed; NaN
    md = md_path.read_text()
    assert f"| A | 3 | {np.mean(maes):.1f} ± {np.std(maes, ddof=1):.1f} |" in md
    assert "| floor | - | 12.0 |" in md and "| n1 |" in md


def test_constant_and_mean_ct_rows_use_the_evaluation_baselines():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1500, (12, 10, 9)).astype(np.float32)
    mask = np.zeros(ct.shape, bool)
    mask[1:11, 1:9, :] = True
    const = baselines.constant_row([(ct, mask)])
    assert const["mae"] == pytest.approx(np.abs(ct[mask] - 40.0).mean(), rel=1e-5)
    assert const["bone_dice"] == 0.0 and const["seed"] is None
    # Two training CTs of other sizes: each body box is resampled onto the test's.
    train = [(rng.uniform(-100, 100, (12, 10, 9)), np.ones((12, 10, 9), bool)),
             (rng.uniform(-100, 100, (14, 10, 7)), np.ones((14, 10, 7), bool))]
    average = evaluation_baselines.mean_ct_on_boxes(train, [(10, 8, 9)])[0]
    mean_row = baselines.mean_training_ct_row(train, [(ct, mask)])
    expected = evaluation_baselines.place_in_body(average, mask)
    assert mean_row["mae"] == pytest.approx(np.abs(ct[mask] - expected[mask]).mean(), rel=1e-5)


def test_cli_refuses_bad_arguments_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        cli.main(["seed02", "--seeds", "0", "--out", str(out)])
    assert err.value.code == 2 and "error: --seeds 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["seed02", "--vgg19", str(tmp_path / "none.npz"), "--out", str(out)])
    assert err.value.code == 2 and "none.npz: --vgg19 weights file not found" in \
        capsys.readouterr().err
    assert not out.exists()
    assert cli._load("seed99") is None  # a seed module this version lacks


@pytest.mark.slow
def test_reproduce_seed02_tiny_writes_every_row(tmp_path, capsys):
    out = tmp_path / "seed02"
    assert cli.main(["seed02", "--tiny", "--seeds", "1", "--out", str(out)]) == 0
    entries = {e["method"]: e for e in csv.DictReader(io.StringIO(
        (out / "table.csv").read_text()))}
    trained = ["pGAN", "REG-pGAN", "meta-pGAN (per pixel)", "meta-pGAN (16x16 patch)",
               "meta-pGAN (per slice)"]
    fixed = ["constant 40 HU", "intensity lookup", "mean training CT", "perfect model (floor)"]
    assert list(entries) == [trained[0], "CTX-pGAN", *trained[1:], *fixed]
    for name in trained + fixed:
        for key in ("mae_mean", "psnr_mean", "ssim_mean", "bone_mae_mean"):
            assert math.isfinite(float(entries[name][key])), (name, key)
    assert "needs VGG-19 weights" in entries["CTX-pGAN"]["note"]
    assert "bone weight share" in entries["meta-pGAN (per slice)"]["note"]
    floor = float(entries["perfect model (floor)"]["mae_mean"])
    assert 0 < floor < float(entries["mean training CT"]["mae_mean"])
    assert "| pGAN | 1 |" in (out / "table.md").read_text()
    # Run again: every run is reused, nothing retrained.
    capsys.readouterr()
    assert cli.main(["seed02", "--tiny", "--seeds", "1", "--out", str(out)]) == 0
    assert "steps in" not in capsys.readouterr().out  # no "training N steps in DIR"


@pytest.mark.slow
def test_reproduce_seed03_tiny_writes_every_row(tmp_path, capsys):
    out = tmp_path / "seed03"
    assert cli.main(["seed03", "--tiny", "--seeds", "1", "--out", str(out)]) == 0
    entries = {e["method"]: e for e in csv.DictReader(io.StringIO(
        (out / "table.csv").read_text()))}
    trained = ["LDM (MR concat)", "LDM (ControlNet)", "pix2pix"]
    fixed = ["constant 40 HU", "intensity lookup", "mean training CT", "perfect model (floor)"]
    assert list(entries) == trained + fixed
    for name in trained + fixed:
        for key in ("mae_mean", "psnr_mean", "ssim_mean"):
            assert math.isfinite(float(entries[name][key])), (name, key)
    for name in trained[:2]:
        assert "autoencoder recon" in entries[name]["note"]
        assert "another head's MR" in entries[name]["note"]
    floor = float(entries["perfect model (floor)"]["mae_mean"])
    assert 0 < floor < float(entries["mean training CT"]["mae_mean"])
    # --only retrains nothing it is not asked to; the other rows come from their runs.
    capsys.readouterr()
    assert cli.main(["seed03", "--tiny", "--seeds", "1", "--only", "pix2pix",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "steps in" not in printed and "| LDM (ControlNet) | 1 |" in printed
    assert cli.main(["seed03", "--tiny", "--only", "ldm", "--out", str(out)]) == 2
    assert "--only ldm: unknown method" in capsys.readouterr().err
    # A finished stage of another config is refused, not resumed as this one's.
    done = out / "ldm_autoencoder" / "seed0" / "stage_done.json"
    done.write_text(done.read_text().replace('"config_digest": "', '"config_digest": "0'))
    assert cli.main(["seed03", "--tiny", "--only", "ldm_concat", "--out", str(out)]) == 2
    assert "holds a finished run of a different config" in capsys.readouterr().err
