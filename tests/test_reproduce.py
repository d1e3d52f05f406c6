"""sct-reproduce: the table (mean ± std over seeds), the baselines and the seed commands."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest

from sct_jax.data.io import save_volume
from sct_jax.reproduce import __main__ as cli
from sct_jax.evaluation import baselines as evaluation_baselines
from sct_jax.reproduce import baselines, table

NEW_COLUMNS = ("MS-SSIM", "bone HD95 [mm]", "air Dice", "air HD95 [mm]", "dWEPL [mm]")


def _row(method, seed, mae, dice=math.nan, note=""):
    return {"method": method, "seed": seed, "mae": mae, "psnr": 20.0, "ssim": 0.5,
            "ms_ssim": 0.6, "bone_mae": 2 * mae, "bone_dice": dice, "bone_hd95": 3.0,
            "air_dice": 0.7, "air_hd95": 4.0, "wepl_distal": 1.5, "wall_s": 10.0,
            "note": note}


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
    header = md.splitlines()[2]
    assert all(f" {name} |" in header for name in NEW_COLUMNS), header
    assert float(floor["air_hd95_mean"]) == 4.0
    with pytest.raises(ValueError, match="lacks"):  # a row without the new keys
        table.aggregate([{k: v for k, v in _row("C", 0, 1.0).items() if k != "air_dice"}])


def test_constant_and_mean_ct_rows_use_the_evaluation_baselines():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1500, (12, 10, 9)).astype(np.float32)
    mask = np.zeros(ct.shape, bool)
    mask[1:11, 1:9, :] = True
    ref = baselines.Reference(ct, mask, (1.0, 1.0, 2.0))
    const = baselines.constant_row([ref])
    assert const["mae"] == pytest.approx(np.abs(ct[mask] - 40.0).mean(), rel=1e-5)
    assert const["bone_dice"] == 0.0 and const["seed"] is None
    for key in ("ms_ssim", "air_dice"):  # the evaluation's metrics (no air: HD95 NaN)
        assert math.isfinite(const[key]), key
    # Two training CTs of other sizes: each body box is resampled onto the test's.
    train = [(rng.uniform(-100, 100, (12, 10, 9)), np.ones((12, 10, 9), bool)),
             (rng.uniform(-100, 100, (14, 10, 7)), np.ones((14, 10, 7), bool))]
    average = evaluation_baselines.mean_ct_on_boxes(train, [(10, 8, 9)])[0]
    mean_row = baselines.mean_training_ct_row(train, [ref])
    expected = evaluation_baselines.place_in_body(average, mask)
    assert mean_row["mae"] == pytest.approx(np.abs(ct[mask] - expected[mask]).mean(), rel=1e-5)


def test_cached_row_without_the_new_metrics_is_rescored_or_na(tmp_path):
    rng = np.random.default_rng(1)
    ct = rng.uniform(-1000, 1500, (12, 10, 9)).astype(np.float32)
    mask = np.ones(ct.shape, bool)
    references = {"1BA001": baselines.Reference(ct, mask, (1.0, 1.0, 1.0))}
    old = {k: v for k, v in _row("A", 0, 5.0).items()
           if k not in ("ms_ssim", "bone_hd95", "air_dice", "air_hd95", "wepl_distal")}
    row, rescored = baselines.complete_row(old, tmp_path / "predictions", references)
    assert not rescored and math.isnan(row["air_dice"]) and "n/a" in row["note"]
    save_volume(tmp_path / "predictions" / "1BA001" / "sct.nii.gz", ct, np.eye(4))
    row, rescored = baselines.complete_row(old, tmp_path / "predictions", references)
    assert rescored and row["mae"] == 0.0 and row["ms_ssim"] == pytest.approx(1.0)
    assert row["wepl_distal"] == pytest.approx(0.0, abs=1e-9)
    assert row["note"] == "" and set(table.ROW_KEYS) <= set(row)


def test_phantom_only_notes_on_other_data(tmp_path):
    """Data without the phantom's manifest and ct_ideal: the aligned-subset check and
    the floor are left out, each saying why (nothing is prepared or scored for them)."""
    from sct_jax.data import synthrad
    from sct_jax.reproduce import seed02

    rng = np.random.default_rng(2)
    for case_id in ("1PA001", "1PA002"):
        ct = rng.uniform(-1000, 1000, (16, 16, 8)).astype(np.float32)
        for name, volume in (("mr", ct + 1000), ("ct", ct), ("mask", np.ones(ct.shape))):
            save_volume(tmp_path / "pelvis" / case_id / f"{name}.nii.gz", volume, np.eye(4))
    cases = synthrad.discover_cases(tmp_path, region="pelvis")
    assert baselines.phantom_manifest(cases) is None
    note = seed02.meta_validation_check(None, {"train": cases})
    assert "left out: the data are not the phantom" in note
    references = {c.id: baselines.load_reference(c)[0] for c in cases}
    assert not baselines.load_reference(cases[0])[1]  # no ct_aligned: the case's own CT
    floor = baselines.floor_row(cases, references, "unused")
    assert math.isnan(floor["mae"]) and "no noise-free CT" in floor["note"]


def test_default_out_keeps_user_data_apart(tmp_path):
    assert cli.default_out("seed02", False, None, None) == Path("runs/reproduce/seed02")
    assert cli.default_out("seed03", True, str(tmp_path / "mine"), "pelvis") == Path(
        "runs/reproduce/seed03_mine_pelvis_tiny")
    assert cli.default_out("seed03", False, None, None, atlas=True) == Path(
        "runs/reproduce/seed03_atlas")


def test_atlas_sets_the_phantoms_anatomy_of_every_config_and_refuses_data(tmp_path, capsys):
    from sct_jax.reproduce import seed03
    overrides = baselines.data_overrides(None, None, 0.2)
    assert overrides == {"data.phantom.anatomy_variation": 0.2}
    assert baselines.data_overrides(None, None) == {}
    assert seed03.pix2pix_config("tiny", 0, overrides).data.phantom.anatomy_variation == 0.2
    runs = {"autoencoder": tmp_path / "ae", "diffusion": tmp_path / "d"}
    assert seed03.ldm_config("autoencoder", "tiny", runs, 0, overrides).data.phantom \
        .anatomy_variation == 0.2
    (tmp_path / "mine").mkdir()
    with pytest.raises(SystemExit) as err:
        cli.main(["seed03", "--atlas", "--data", str(tmp_path / "mine"),
                  "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and "error: --atlas" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_arguments_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        cli.main(["seed02", "--seeds", "0", "--out", str(out)])
    assert err.value.code == 2 and "error: --seeds 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["seed02", "--vgg19", str(tmp_path / "none.npz"), "--out", str(out)])
    assert err.value.code == 2 and "none.npz: --vgg19 weights file not found" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["seed03", "--region", "pelvis", "--out", str(out)])
    assert err.value.code == 2 and "error: --region pelvis: needs --data" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        cli.main(["seed03", "--data", str(tmp_path), "--region", "knee", "--out", str(out)])
    assert err.value.code == 2 and "--region knee: unknown region" in capsys.readouterr().err
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


class _FakeDose:
    """A stand-in for :class:`sct_jax.reproduce.dose.CaseDose`: its "dose MAE" is the mean
    |sCT - CT| in the body / 100 and its gamma 100 minus that (no dose engine needed)."""

    def __init__(self, ct, mask):
        self.ct, self.mask, self.calls = ct, mask, 0

    def __call__(self, sct):
        self.calls += 1
        err = float(np.abs(sct - self.ct)[self.mask].mean()) / 100
        return {"dose_mae_photon": err, "gamma_photon": 100 - err,
                "dose_mae_proton": 2 * err, "gamma_proton": math.nan}


def test_dose_columns_come_from_each_reference_and_show_only_when_scored(tmp_path):
    rng = np.random.default_rng(3)
    refs = []
    for _ in range(2):
        ct = rng.uniform(-1000, 1500, (12, 10, 9)).astype(np.float32)
        mask = np.ones(ct.shape, bool)
        refs.append(baselines.Reference(ct, mask, (1.0, 1.0, 1.0), _FakeDose(ct, mask)))
    const = baselines.constant_row(refs)
    expected = np.mean([np.abs(r.ct - 40.0).mean() / 100 for r in refs])
    assert const["dose_mae_photon"] == pytest.approx(expected, rel=1e-5)
    assert const["dose_mae_proton"] == pytest.approx(2 * expected, rel=1e-5)
    assert math.isnan(const["gamma_proton"]) and all(r.dose.calls == 1 for r in refs)
    plain = baselines.constant_row([r._replace(dose=None) for r in refs])
    assert "dose_mae_photon" not in plain  # without --dose: no dose keys, no columns
    md, _ = table.write_tables(tmp_path / "plain", [plain])
    assert "dose MAE" not in md.read_text()
    md, csv_path = table.write_tables(tmp_path / "dose", [const, plain | {"method": "p"}])
    header = md.read_text().splitlines()[0]
    assert "photon dose MAE [% Rx]" in header and "proton gamma 2%/2mm [%]" in header
    assert header.index("proton gamma") < header.index("wall [s]")
    entries = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert float(entries[0]["dose_mae_photon_mean"]) == pytest.approx(expected, rel=1e-5)
    assert entries[1]["dose_mae_photon_mean"] == ""  # the row scored without dose: n/a


def test_cached_row_without_dose_columns_is_rescored_when_dose_is_asked(tmp_path):
    rng = np.random.default_rng(4)
    ct = rng.uniform(-1000, 1500, (12, 10, 9)).astype(np.float32)
    mask = np.ones(ct.shape, bool)
    references = {"1BA001": baselines.Reference(ct, mask, (1.0,) * 3, _FakeDose(ct, mask))}
    cached = _row("A", 0, 5.0)
    save_volume(tmp_path / "predictions" / "1BA001" / "sct.nii.gz", ct + 100, np.eye(4))
    row, rescored = baselines.complete_row(cached, tmp_path / "predictions", references)
    assert rescored and row["dose_mae_photon"] == pytest.approx(1.0, rel=1e-5)
    plain = {"1BA001": references["1BA001"]._replace(dose=None)}
    assert baselines.complete_row(cached, tmp_path / "predictions", plain) == (cached, False)


def test_case_dose_reads_each_modality_and_keeps_the_other_when_one_fails(monkeypatch):
    from sct_jax.data.io import Volume
    from sct_jax.dose import compare
    from sct_jax.errors import RunFailed
    from sct_jax.reproduce import dose

    calls = []

    def fake_run_modality(ct, scts, body, target, organs, modality, rx, out, figures):
        assert not figures and set(scts) == {"sct"} and target.any() and rx == 3.0
        calls.append(modality)
        if modality == "proton":
            raise RunFailed("too shallow for the machine")
        return {"scts": {"sct": {"dose_mae_percent_rx": 0.5, "gamma_pass_2pct_2mm": 97.0,
                                 "gamma_pass_1pct_1mm": 90.0}}}

    monkeypatch.setattr(compare, "run_modality", fake_run_modality)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    ct = np.zeros((20, 20, 20), np.float32)
    case = dose.CaseDose("1HN001", Volume(ct, affine), np.ones(ct.shape, bool), Path("x"), 3.0)
    out = case(ct)
    assert (out["dose_mae_photon"], out["gamma_photon"]) == (0.5, 97.0)
    assert math.isnan(out["dose_mae_proton"]) and math.isnan(out["gamma_proton"])
    assert math.isnan(case(ct + 10)["gamma_proton"])
    assert calls == ["photon", "proton", "photon"]  # a failed modality is not retried


def test_dose_flags_are_checked_before_anything_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        cli.main(["seed03", "--tiny", "--dose", "--dose_rx", "0", "--out", str(out)])
    assert err.value.code == 2 and "error: --dose_rx 0" in capsys.readouterr().err
    from sct_jax.dose import engine
    from sct_jax.errors import ConfigError

    def missing():
        raise ConfigError(f"pyradplan is not installed: {engine.INSTALL_HINT}")

    monkeypatch.setattr(engine, "require_pyradplan", missing)
    with pytest.raises(SystemExit) as err:
        cli.main(["seed03", "--tiny", "--dose", "--out", str(out)])
    message = capsys.readouterr().err
    assert err.value.code == 2 and message.startswith("error: --dose: pyradplan")
    assert message.count("\n") == 1 and not out.exists()


def test_seed03_flow_row_and_sampler_rows_sample_the_finished_run_elsewhere(tmp_path,
                                                                             monkeypatch):
    """The rectified-flow row trains the concat UNet by flow on the shared autoencoder
    (MR input only); ``--samplers`` samples a finished run with each variant into its own
    folder (never the run's), one row each, cached."""
    from types import SimpleNamespace

    from sct_jax.reproduce import seed03
    assert [slug for _, slug, _ in seed03.chains("mr")] == [
        "ldm_concat", "ldm_controlnet", "ldm_concat_flow", "pix2pix"]
    assert "ldm_concat_flow" not in [slug for _, slug, _ in seed03.chains("cbct")]
    runs = {"autoencoder": tmp_path / "ae", "diffusion": tmp_path / "d"}
    flow = seed03.ldm_config("diffusion,concat,flow", "small", runs, 0)
    concat = seed03.ldm_config("diffusion,concat", "small", runs, 0)
    assert (flow.ldm.objective, concat.ldm.objective) == ("flow", "diffusion")
    assert flow.ldm.autoencoder_workdir == concat.ldm.autoencoder_workdir
    assert seed03.sampler_label(flow) == "Euler 30 steps"

    calls = []

    def predict_split(config, workdir, out_dir=None, samples=1, **_):
        # Each variant's "sCT" is its step count, so a row scores its own predictions.
        calls.append((config.ldm.sampler, config.ldm.sample_steps, Path(out_dir), samples))
        for case in ("a", "b"):
            save_volume(Path(out_dir) / case / "sct.nii.gz",
                        np.full((2, 2, 2), config.ldm.sample_steps, np.float32), np.eye(4))
        return Path(out_dir), [SimpleNamespace(id="a"), SimpleNamespace(id="b")]

    monkeypatch.setattr(seed03.predict, "predict_split", predict_split)
    monkeypatch.setattr(seed03.baselines, "score",
                        lambda pairs: {"mae": float(np.mean([s.mean() for s, _ in pairs]))})
    run, out = tmp_path / "ldm_concat_flow" / "seed0", tmp_path / "samplers"
    references = {"a": SimpleNamespace(dose=None), "b": SimpleNamespace(dose=None)}
    rows = seed03.sampler_rows("LDM (flow)", "ldm_concat_flow", flow, run, out, references,
                               4, 7)
    variants = seed03.SAMPLER_VARIANTS["ldm_concat_flow"]
    assert [(s, n) for s, n, _, _ in calls] == list(variants)
    assert all(d.parent.parent == out and k == 4 for _, _, d, k in calls)
    assert not run.exists()  # the run is read, never written
    assert [r["mae"] for r in rows] == [float(n) for _, n in variants]
    assert rows[0]["method"] == "LDM (flow), Euler 10 steps" and rows[0]["seed"] == 7
    assert "s per sample and head" in rows[0]["note"]
    assert flow.ldm.sample_steps == 30  # the run's own config is left as it was
    calls.clear()
    again = seed03.sampler_rows("LDM (flow)", "ldm_concat_flow", flow, run, out, references,
                                4, 7)
    assert [(r["method"], r["mae"], r["note"]) for r in again] == [
        (r["method"], r["mae"], r["note"]) for r in rows]
    assert calls == []  # cached
    assert seed03.sampler_rows("pix2pix", "pix2pix", flow, run, out, references, 4, 7) == []


def test_samplers_flag_is_seed03s(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["seed02", "--samplers", "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and "error: --samplers: only seed03" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
