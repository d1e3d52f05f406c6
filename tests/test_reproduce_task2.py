"""sct-reproduce synthrad_task2 at tiny size on a user's Task 2 data (its own file: one of
the suite's longest tests, so that pytest-xdist runs it beside the rest)."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from sct_jax.data import phantom_cli, synthrad
from sct_jax.reproduce import __main__ as cli
from sct_jax.reproduce import baselines

NEW_COLUMNS = ("MS-SSIM", "bone HD95 [mm]", "air Dice", "air HD95 [mm]", "dWEPL [mm]")


@pytest.mark.slow
def test_reproduce_synthrad_task2_tiny_writes_every_row(tmp_path, capsys):
    """Seed 03's rows (synthrad_task2 is seed03.run on CBCT input) on a user's own
    dataset (``--data``): the brain phantom's Task 2 cases of the tiny configs, written by
    the phantom CLI; the phantom's own path is seed02's test (and the docs run, which also
    runs seed03 on MR)."""
    root = tmp_path / "mydata"
    assert phantom_cli.main(["--out", str(root), "--region", "brain", "--cases", "4",
                         "--seed", "0", "--shape", "32", "32", "32", "--task", "2"]) == 0
    out = tmp_path / "task2"
    argv = ["synthrad_task2", "--tiny", "--seeds", "1", "--data", str(root), "--out", str(out)]
    assert cli.main(argv) == 0
    entries = {e["method"]: e for e in csv.DictReader(io.StringIO(
        (out / "table.csv").read_text()))}
    trained = ["LDM (MR concat)", "LDM (ControlNet)", "pix2pix"]
    fixed = ["constant 40 HU", "intensity lookup", "mean training CT", "CBCT itself",
             "perfect model (floor)"]
    assert list(entries) == trained + fixed
    for name in trained + fixed:
        for key in ("mae_mean", "psnr_mean", "ssim_mean", "ms_ssim_mean", "air_dice_mean"):
            assert math.isfinite(float(entries[name][key])), (name, key)
    for name in trained[:2]:
        assert "autoencoder recon" in entries[name]["note"]
        assert "another head's CBCT" in entries[name]["note"]
    floor = float(entries["perfect model (floor)"]["mae_mean"])
    assert 0 < floor < float(entries["mean training CT"]["mae_mean"])
    md = (out / "table.md").read_text()
    assert str(root) in md.splitlines()[0]  # the title names the data
    assert all(f" {name} |" in md.splitlines()[2] for name in NEW_COLUMNS)
    config = json.loads((out / "pix2pix" / "seed0" / "config.json").read_text())
    assert config["data"]["root"] == str(root)  # trained on --data, not the phantom
    assert config["data"]["input"] == "cbct"
    # The CBCT row is the CBCT's own HU scored against the CT in the CBCT's frame.
    cases = synthrad.discover_cases(root, input="cbct")
    test_ids = {i for line in capsys.readouterr().out.splitlines()
                if "held-out head(s): " in line
                for i in line.split("held-out head(s): ")[1].split(", ")}
    test_cases = [c for c in cases if c.id in test_ids]
    expected = []
    for case in test_cases:
        ref = baselines.load_reference(case)[0]
        cbct = synthrad.load_case(case).mr.data
        expected.append(np.abs(cbct - ref.ct)[ref.mask].mean())
    expected = float(np.mean(expected))
    assert float(entries["CBCT itself"]["mae_mean"]) == pytest.approx(expected, rel=1e-6)
    assert 0 < expected < float(entries["constant 40 HU"]["mae_mean"])
    # A row cached before the new columns is rescored from its run's predictions.
    cached = out / "ldm_concat" / "seed0" / "reproduce_row.json"
    record = json.loads(cached.read_text())
    for key in ("ms_ssim", "bone_hd95", "air_dice", "air_hd95", "wepl_distal"):
        del record["row"][key]
    cached.write_text(json.dumps(record))
    # --only retrains nothing it is not asked to; the other rows come from their runs.
    capsys.readouterr()
    assert cli.main([*argv, "--only", "pix2pix"]) == 0
    printed = capsys.readouterr().out
    assert "steps in" not in printed and "| LDM (ControlNet) | 1 |" in printed
    rescored = json.loads(cached.read_text())["row"]
    assert rescored["ms_ssim"] == pytest.approx(float(entries[trained[0]]["ms_ssim_mean"]))
    # The same command on the phantom-less data: the floor says why it is empty.
    for path in root.rglob("ct_ideal.nii.gz"):
        path.unlink()
    assert cli.main([*argv, "--only", "pix2pix"]) == 0
    floor_line = next(line for line in (out / "table.md").read_text().splitlines()
                      if line.startswith("| perfect model (floor)"))
    assert "| n/a |" in floor_line and "no noise-free CT" in floor_line
    assert cli.main([*argv, "--only", "ldm"]) == 2
    assert "--only ldm: unknown method" in capsys.readouterr().err
    # A finished stage of another config is refused, not resumed as this one's.
    done = out / "ldm_autoencoder" / "seed0" / "stage_done.json"
    done.write_text(done.read_text().replace('"config_digest": "', '"config_digest": "0'))
    assert cli.main([*argv, "--only", "ldm_concat"]) == 2
    assert "holds a finished run of a different config" in capsys.readouterr().err
