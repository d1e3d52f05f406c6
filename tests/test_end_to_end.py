"""The real pipeline on tiny configs: phantom data -> train -> predict -> score -> panels."""

import html
import json
import os
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sct_jax.dose import engine
from sct_jax.errors import ConfigError
from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.config_utils import load_config_file
from sct_jax.data import preprocess
from sct_jax.data.io import load_volume
from sct_jax.data import datasets as train_data
from sct_jax import runs
from sct_jax.training import loop


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """pix2pix tiny (2D) trained for 2 steps and evaluated (predictions written) with
    whole-slice inference (``eval.tile = (0, 0)``), so the sCT has a simple reference."""
    return _train_and_evaluate("configs/pix2pix_pelvis.py:tiny", tmp_path_factory,
                               tile=(0, 0))


@pytest.fixture(scope="module")
def trained_3d(tmp_path_factory):
    """pix2pix tiny (3D patches) trained for 2 steps and evaluated."""
    return _train_and_evaluate("configs/pix2pix3d_pelvis.py:tiny", tmp_path_factory)


def _train_and_evaluate(config_path, tmp_path_factory, tile=None):
    config = load_config_file(config_path)
    if tile is not None:
        config.eval.tile = tile
    workdir = tmp_path_factory.mktemp("run")
    result = loop.train(config, workdir)
    report = evaluate_run(config, workdir)
    return config, workdir, result, report


@pytest.mark.parametrize("trained", ["trained_2d", "trained_3d"])
def test_train_evaluate_tiny(request, trained):
    config, tmp_path, result, report = request.getfixturevalue(trained)
    assert result.step == config.train.steps
    assert np.isfinite(result.metrics["loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
    assert {"gen/grad_norm", "disc/grad_norm", "gen/param_norm", "compile_s"} <= set(records[0])

    assert len(report.cases) == config.eval.max_cases
    case = train_data.case_splits(config)["test"][0]
    sct = load_volume(tmp_path / "predictions" / case.id / "sct.nii.gz")
    mr = load_volume(case.mr)
    assert sct.shape == mr.shape
    np.testing.assert_allclose(sct.affine, mr.affine)
    summary = json.loads((tmp_path / "predictions" / "metrics.json").read_text())
    assert summary["n_scored"] == 1
    assert (tmp_path / "predictions" / "metrics.csv").exists()
    assert summary["verdict"]["line"].startswith("verdict: ")
    assert (tmp_path / "predictions" / case.id / "panel.png").stat().st_size > 10_000


def _centre_window(n, size):
    """``(start in the volume, start in the window, length)`` of a centred crop/pad."""
    if n >= size:
        return (n - size) // 2, 0, size
    return 0, (size - n) // 2, n


def test_sct_on_disk_is_the_models_output(trained_2d):
    """The written NIfTI is unit_to_ct(G(mr_to_unit(mr))) voxel by voxel, computed here
    from the raw files: every whole axial slice centre-padded with air to the network's
    stride, the generator applied (dropout off), cropped back, mapped to HU, air beyond
    the body mask grown by the loss's margin."""
    config, workdir, _, _ = trained_2d
    assert config.data.context == 0  # one MR channel per slice
    case = train_data.case_splits(config)["test"][0]
    mr_img = nib.load(case.mr)
    mr = np.asarray(mr_img.dataobj, np.float64)
    mask = np.asarray(nib.load(case.mask).dataobj) > 0
    lo, hi = config.data.mr_percentiles
    unit = preprocess.mr_to_unit(mr, mask, lo_pct=lo, hi_pct=hi)

    stride = 2 ** int(config.model.gen.num_downs)
    (x, y, z) = mr.shape
    h, w = (-(-max(n, stride) // stride) * stride for n in (x, y))
    assert (h, w) != tuple(config.data.crop)  # the whole slice, not the training crop
    (ax, wx, nx), (ay, wy, ny) = _centre_window(x, h), _centre_window(y, w)
    inputs = np.full((z, h, w, 1), -1.0, np.float32)
    inputs[:, wx:wx + nx, wy:wy + ny, 0] = np.moveaxis(unit[ax:ax + nx, ay:ay + ny], 2, 0)
    _, state = runs.load_state(config, workdir)
    gen = state["gen"]
    out = np.asarray(jax.jit(lambda p, v: gen.apply_fn({"params": p}, v, train=False))(
        gen.params, inputs), np.float64)
    expected_unit = np.full((x, y, z), -1.0)
    expected_unit[ax:ax + nx, ay:ay + ny] = np.moveaxis(out[:, wx:wx + nx, wy:wy + ny, 0], 0, 2)
    expected = (np.clip(expected_unit, -1, 1) + 1) * (3000.0 + 1024.0) / 2 - 1024.0
    if config.loss.body_mask:
        # Trained inside the body mask grown in-plane by the margin: air beyond it.
        r = int(config.loss.body_mask_margin)
        grown = ndimage.binary_dilation(mask, structure=np.ones((2 * r + 1, 2 * r + 1, 1)))
        expected[~grown] = -1000.0

    sct_img = nib.load(workdir / "predictions" / case.id / "sct.nii.gz")
    np.testing.assert_array_equal(sct_img.affine, mr_img.affine)
    sct = np.asarray(sct_img.dataobj, np.float64)
    assert sct.shape == mr.shape
    # float32 rounding of a forward pass (batched differently) and of the HU mapping.
    np.testing.assert_allclose(sct, expected, rtol=0, atol=0.05)
    # The model did something: the sCT is not the padding value everywhere in the body.
    assert np.ptp(sct[mask]) > 1.0


def test_a_two_step_model_is_flagged_as_not_beating_the_best_baseline(trained_2d, capsys):
    """2 training steps learn nothing: the report's first line says so, with a warning
    naming the best baseline and both numbers (stdout, metrics.json, report.html)."""
    config, workdir, _, report = trained_2d
    pred = workdir / "predictions"
    summary = json.loads((pred / "metrics.json").read_text())
    verdict = summary["verdict"]
    assert list(summary)[:2] == ["verdict", "baselines"]
    assert set(summary["baselines"]) == {"constant", "lookup", "mean_ct", "perfect"}
    assert verdict["beats_best_baseline"] == {"mae": False, "ssim": False}
    best = verdict["best_baseline"]["mae"]
    assert best["value"] == min(b["mean"]["mae"] for n, b in summary["baselines"].items()
                                if n != "perfect")
    assert verdict["model"]["mae"] == pytest.approx(summary["metrics"]["mae"]["mean"])
    mae_warning = (f"WARNING: the model does not beat the {best['label']} in MAE: model "
                   f"{verdict['model']['mae']:.1f} HU, {best['label']} {best['value']:.1f} HU")
    assert verdict["warnings"][0] == mae_warning
    # The perfect model (the phantom's noise-free CT) is far better than any baseline.
    assert summary["baselines"]["perfect"]["mean"]["mae"] < best["value"] / 2
    page = (pred / "report.html").read_text()
    body = page[page.index("</h1>") + len("</h1>"):].lstrip()
    assert body.startswith(f'<p class="verdict" id="verdict">{html.escape(verdict["line"])}'
                           f'</p>\n<p class="warning">{html.escape(mae_warning)}</p>')
    assert "WARNING: the model does not beat the" in page

    capsys.readouterr()
    evaluate_run(config, workdir, out=workdir / "again" / "metrics.json", panels=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("predicted 1 case(s)")
    assert lines[1] == verdict["line"] and lines[2] == mae_warning


def _cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


@pytest.mark.parametrize("override,expected", [
    ("--config.method=pix3pix", "config.method='pix3pix' is not a known method"),
    ("--config.data.crop=(30,32)", "config.data.crop=(30, 32) is not divisible"),
])
def test_train_cli_bad_config_is_one_line(tmp_path, override, expected):
    proc = _cli("train.py", "--config", "configs/pix2pix_pelvis.py:tiny", "--workdir",
                str(tmp_path / "run"), override)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_cli_without_checkpoint(tmp_path):
    proc = _cli("evaluate.py", "--config", "configs/pix2pix_pelvis.py:tiny",
                "--workdir", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(tmp_path / "checkpoints") in lines[0] and "no checkpoint" in lines[0]
    assert not (tmp_path / "predictions").exists()


def test_train_cli_bad_data_writes_nothing(tmp_path):
    case = tmp_path / "data" / "1PA001"
    case.mkdir(parents=True)
    (case / "mr.nii.gz").write_bytes(b"not a nifti")
    (case / "ct.nii.gz").write_bytes(b"not a nifti")
    proc = _cli("train.py", "--config", "configs/pix2pix_pelvis.py:tiny", "--workdir",
                str(tmp_path / "run"), f"--config.data.root={tmp_path / 'data'}",
                "--config.data.region=")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "1PA001/mr.nii.gz: unreadable or truncated NIfTI" in lines[0]
    assert not (tmp_path / "run").exists()


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.skipif(engine.has_pyradplan(), reason="checks the message shown without the "
                    "[dose] extra; the extra is installed here")
def test_dose_without_the_extra_is_refused_before_anything_runs(trained_2d):
    config, workdir, _, _ = trained_2d
    before = _tree(workdir)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[dose\]"'):
        evaluate_run(config, workdir, dose=True)
    assert _tree(workdir) == before


def test_dose_with_a_bad_prescription_is_refused(trained_2d):
    config, workdir, _, _ = trained_2d
    with pytest.raises(ConfigError, match="--dose_rx: 0 Gy"):
        evaluate_run(config, workdir, dose=True, dose_rx=0.0)


@pytest.mark.slow
def test_dose_evaluation_scores_model_and_baselines(trained_2d, capsys):
    """With the [dose] extra: every case planned on its CT, recomputed on the model's and
    each baseline's sCT; summary, per-case metrics, DVH plots in the report. The tiny
    phantom (48 x 32 x 8 mm of 1 x 1 x 2.5 mm) is filled by the body and the default 25 mm
    target reaches its edges (the engine pads it with air); protons may fail there (the
    generic machine's lowest energy reaches deeper than the target): then that failure is
    reported and the photons still scored."""
    pytest.importorskip("pyRadPlan", reason="needs the [dose] extra (pyradplan)")
    config, workdir, _, _ = trained_2d
    evaluate_run(config, workdir, out=workdir / "dose_eval" / "metrics.json", dose=True)
    doc = json.loads((workdir / "dose_eval" / "metrics.json").read_text())
    rows = doc["dose"]["summary"]["photon"]
    assert {"model", "constant", "lookup", "mean_ct"} <= set(rows)
    for name, row in rows.items():
        assert 0 <= row["gamma_2_2"] <= 100 and row["dose_mae_percent_rx"] >= 0, name
    if "perfect" in rows:  # the noise-free CT doses like the CT; a constant body less so
        assert rows["perfect"]["dose_mae_percent_rx"] <= rows["constant"]["dose_mae_percent_rx"]
    n_cases = len(doc["cases"])
    proton_failed = [e for e in doc["dose"]["errors"] if " proton: " in e]
    assert doc["dose"]["summary"]["proton"] or len(proton_failed) == n_cases
    case_id = doc["cases"][0]["id"]
    assert (workdir / "predictions" / case_id / "dose" / "dvh_model_photon.png").is_file()
    page = (workdir / "dose_eval" / "report.html").read_text()
    assert 'id="dose"' in page and 'data-figure="dvh_photon"' in page
    assert 'data-figure="dose_diff_photon"' in page
    assert "dose photon model: MAE" in capsys.readouterr().out
