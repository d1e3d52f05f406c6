"""evaluate.py and sct_jax.evaluation.scoring on a tiny SynthRAD-layout dataset."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sct_jax.dose import wepl
from sct_jax.guard import guarded
from sct_jax.errors import ConfigError, DataError
from sct_jax.evaluation import scoring
from sct_jax.metrics import METRIC_NAMES, lpips, synthrad_metrics
from test_vgg import random_vgg_npz

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 10)
AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])
PELVIS_IDS = ("1PA001", "1PB002", "1PC003")
BRAIN_ID = "1BA001"


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 pelvis cases + 1 brain case; predictions (CT + noise) for the pelvis ones,
    in the three accepted namings."""
    base = tmp_path_factory.mktemp("eval")
    root, pred = base / "data", base / "pred"
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    body = (grid[0] ** 2 + grid[1] ** 2) < 0.8
    for case_id in PELVIS_IDS + (BRAIN_ID,):
        region = "brain" if case_id == BRAIN_ID else "pelvis"
        ct = rng.choice([-1000.0, -80.0, 40.0, 400.0, 1200.0], size=SHAPE)
        ct = np.where(body, ct + rng.normal(0, 20, SHAPE), -1000.0).astype(np.float32)
        case_dir = root / "Task1" / region / case_id
        _save(case_dir / "ct.nii.gz", ct)
        _save(case_dir / "mr.nii.gz", rng.random(SHAPE).astype(np.float32))
        _save(case_dir / "mask.nii.gz", body.astype(np.uint8))
    names = {PELVIS_IDS[0]: f"{PELVIS_IDS[0]}/sct.nii.gz",
             PELVIS_IDS[1]: f"{PELVIS_IDS[1]}.nii.gz",
             PELVIS_IDS[2]: f"{PELVIS_IDS[2]}_sct.nii.gz"}
    for case_id, name in names.items():
        ct = _load(root / "Task1" / "pelvis" / case_id / "ct.nii.gz")
        _save(pred / name, (ct + rng.normal(0, 60, SHAPE)).astype(np.float32))
    return root, pred, names


def _expected(root: Path, pred: Path, names: dict) -> dict:
    """Metrics recomputed from the files, independently of the scoring module."""
    out = {}
    for case_id, name in names.items():
        case_dir = root / "Task1" / "pelvis" / case_id
        out[case_id] = synthrad_metrics(_load(case_dir / "ct.nii.gz"), _load(pred / name),
                                        _load(case_dir / "mask.nii.gz"))
    return out


def _run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_scores_every_prediction(dataset, tmp_path):
    root, pred, names = dataset
    out = tmp_path / "results" / "run.json"
    result = _run_cli("--pred", pred, "--data", root, "--out", out)
    assert result.returncode == 0, result.stderr
    expected = _expected(root, pred, names)

    doc = json.loads(out.read_text())
    assert doc["n_scored"] == 3 and doc["unscored"] == [BRAIN_ID]
    assert [c["id"] for c in doc["cases"]] == sorted(PELVIS_IDS)
    for row in doc["cases"]:
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[row["id"]][name], rel=1e-12)
        case_dir = root / "Task1" / "pelvis" / row["id"]
        ranges = wepl.wepl_differences(_load(case_dir / "ct.nii.gz"), _load(pred / names[row["id"]]),
                                       _load(case_dir / "mask.nii.gz") > 0, AFFINE)
        assert row["wepl_center"] == pytest.approx(ranges["mean_abs_diff_center"], rel=1e-9)
        assert row["wepl_distal"] == pytest.approx(ranges["mean_abs_diff_distal"], rel=1e-9)
        assert row["wepl_distal"] > 0
    for name in METRIC_NAMES:
        values = [expected[i][name] for i in PELVIS_IDS]
        assert doc["metrics"][name]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert doc["metrics"][name]["std"] == pytest.approx(np.std(values), rel=1e-9)
        assert doc["metrics"][name]["n"] == 3

    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == sorted(PELVIS_IDS)
    for row in rows:
        assert row["region"] == "pelvis"
        for name in METRIC_NAMES:
            assert float(row[name]) == expected[row["id"]][name]  # full precision

    table = {line.split()[0]: line.split() for line in result.stdout.splitlines()
             if line.strip()}
    for case_id in PELVIS_IDS:
        assert table[case_id][2] == f"{expected[case_id]['mae']:.2f}"
    mean_mae = np.mean([expected[i]["mae"] for i in PELVIS_IDS])
    std_mae = np.std([expected[i]["mae"] for i in PELVIS_IDS])
    assert table["mean"][1] == f"{mean_mae:.2f}" and table["std"][1] == f"{std_mae:.2f}"
    assert "scored 3 of 4 reference cases (1 without a prediction)" in result.stdout
    assert not (pred / "metrics.json").exists()  # --out was given


def test_cli_wrong_shape_names_the_file_and_writes_nothing(dataset, tmp_path):
    root, pred, names = dataset
    bad_pred = tmp_path / "pred"
    shutil.copytree(pred, bad_pred)
    bad_file = bad_pred / names[PELVIS_IDS[1]]
    _save(bad_file, np.zeros((24, 20, 9), np.float32))
    line = _one_error_line(_run_cli("--pred", bad_pred, "--data", root))
    assert str(bad_file) in line and "(24, 20, 9)" in line and "(24, 20, 10)" in line
    assert not (bad_pred / "metrics.json").exists()
    assert not (bad_pred / "metrics.csv").exists()


def test_cli_missing_data_root(dataset, tmp_path):
    _, pred, _ = dataset
    missing = tmp_path / "no_such_root"
    line = _one_error_line(_run_cli("--pred", pred, "--data", missing))
    assert str(missing) in line


def test_truncated_prediction_names_the_file(dataset, tmp_path):
    root, pred, names = dataset
    bad_pred = tmp_path / "pred"
    shutil.copytree(pred, bad_pred)
    bad_file = bad_pred / names[PELVIS_IDS[2]]
    data = bad_file.read_bytes()
    bad_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=str(bad_file)):
        scoring.evaluate_folder(bad_pred, root, echo=lambda _: None)
    assert not (bad_pred / "metrics.json").exists()


def test_prediction_without_reference_and_duplicates(dataset, tmp_path):
    root, pred, _ = dataset
    bad_pred = tmp_path / "pred"
    shutil.copytree(pred, bad_pred)
    stray = bad_pred / "1PA999.nii.gz"
    _save(stray, np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError, match=f"{stray}.*1PA999"):
        scoring.score_folder(bad_pred, root, progress=False)
    stray.unlink()
    duplicate = bad_pred / f"{PELVIS_IDS[0]}.nii.gz"  # besides <id>/sct.nii.gz
    shutil.copy(bad_pred / PELVIS_IDS[0] / "sct.nii.gz", duplicate)
    with pytest.raises(DataError, match=f"second prediction for case {PELVIS_IDS[0]}"):
        scoring.find_predictions(bad_pred)


def test_std_maps_beside_predictions_are_not_predictions(tmp_path):
    """sct-predict's std maps (--samples, --tta, an ensemble) beside the sCTs of a folder
    are skipped; a lone ``*_std`` volume is still a prediction of its own name."""
    for name in ("a_sct", "a_sct_std", "b", "b_std", "c_std"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    found = scoring.find_predictions(tmp_path)
    assert {k: v.name for k, v in found.items()} == {
        "a": "a_sct.nii.gz", "b": "b.nii.gz", "c_std": "c_std.nii.gz"}


def test_region_filter(dataset):
    root, pred, _ = dataset
    report = scoring.score_folder(pred, root, region="pelvis", progress=False)
    assert [c.id for c in report.cases] == sorted(PELVIS_IDS)
    assert report.unscored == () and report.skipped == ()
    with pytest.raises(DataError, match="no prediction for a brain case"):
        scoring.score_folder(pred, root, region="brain", progress=False)
    with pytest.raises(ConfigError, match="'abdomen': unknown region"):
        scoring.score_folder(pred, root, region="abdomen", progress=False)


def test_perfect_prediction_writes_strict_json(dataset, tmp_path):
    root, _, _ = dataset
    pred = tmp_path / "perfect"
    case_dir = root / "Task1" / "pelvis" / PELVIS_IDS[0]
    pred.mkdir()
    shutil.copy(case_dir / "ct.nii.gz", pred / f"{PELVIS_IDS[0]}.nii.gz")
    printed = []
    scoring.evaluate_folder(pred, root, region="pelvis", echo=printed.append)

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    doc = json.loads((pred / "metrics.json").read_text(), parse_constant=reject)
    assert doc["cases"][0]["psnr"] == "inf" and doc["cases"][0]["mae"] == 0.0
    assert doc["metrics"]["psnr"]["mean"] == "inf"
    assert doc["metrics"]["psnr"]["std"] is None  # std of [inf] is undefined
    assert doc["unscored"] == sorted(PELVIS_IDS[1:])
    assert "scored 1 of 3 reference cases (2 without a prediction)" in printed[0]
    assert (pred / "metrics.csv").read_text().splitlines()[1].split(",")[3] == "inf"


def test_guarded_prints_one_line_and_exits_2(capsys):
    def failing_main(argv):
        raise DataError("x.nii.gz: first\nsecond")

    with pytest.raises(SystemExit) as exit_info:
        guarded(failing_main)(["prog"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: x.nii.gz: first second\n"

    def buggy_main(argv):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(SystemExit) as exit_info:
        guarded(buggy_main)(["prog"])
    assert exit_info.value.code == 3  # internal error: the traceback, then one line
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    assert err.splitlines()[-1].startswith("error: internal error (KeyError")


def _save_affine(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _flipped_x(data: np.ndarray, affine: np.ndarray):
    """The same world image stored with the x voxel axis reversed (a legal affine)."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
    return data[::-1].copy(), affine @ flip


def _swapped_xy(data: np.ndarray, affine: np.ndarray):
    """The same world image stored with the x and y voxel axes exchanged."""
    swap = np.eye(4)[[1, 0, 2, 3]]
    return data.transpose(1, 0, 2).copy(), affine @ swap


def test_a_prediction_stored_in_another_voxel_order_scores_as_on_the_ct_grid(dataset, tmp_path):
    """The metrics compare voxels: a flipped or transposed file of the same world image
    is brought onto the CT's grid (lossless) and scores exactly as the original."""
    root, pred, names = dataset
    case_id = PELVIS_IDS[0]
    data = _load(pred / names[case_id])
    expected = scoring.score_folder(pred, root, progress=False, case_ids=[case_id])
    for reorder in (_flipped_x, _swapped_xy, lambda d, a: _swapped_xy(*_flipped_x(d, a))):
        stored, affine = reorder(data, AFFINE)
        assert not np.array_equal(stored.shape, SHAPE) or not np.array_equal(stored, data)
        other = tmp_path / reorder.__name__
        shutil.rmtree(other, ignore_errors=True)
        _save_affine(other / f"{case_id}.nii.gz", stored, affine)
        report = scoring.score_folder(other, root, progress=False)
        assert report.cases[0].metrics == expected.cases[0].metrics


@pytest.mark.parametrize("change, fragment", [
    ("origin", "voxel centres up to 0.5 mm apart"),
    ("spacing", "voxel centres up to"),
    ("shape", "(24, 20, 9)"),
])
def test_a_prediction_on_another_grid_is_refused(dataset, tmp_path, change, fragment):
    root, pred, names = dataset
    case_id = PELVIS_IDS[0]
    data, affine = _flipped_x(_load(pred / names[case_id]), AFFINE)  # reoriented first
    if change == "origin":
        affine[1, 3] += 0.5
    elif change == "spacing":
        affine[:3, 2] *= 1.01
    else:
        data = data[:, :, :-1]
    bad = _save_affine(tmp_path / "pred" / f"{case_id}.nii.gz", data, affine)
    line = _one_error_line(_run_cli("--pred", tmp_path / "pred", "--data", root))
    assert line.startswith(f"error: {bad}: ") and fragment in line, line
    assert "reference CT" in line
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [bad.name]


def test_a_volume_the_metrics_refuse_is_named(tmp_path):
    """Six slices are too few for SSIM's 7-voxel window: the error names the files."""
    ct = np.where(np.arange(24)[:, None, None] < 12, 40.0, -1000.0) * np.ones((24, 20, 6))
    ct = ct.astype(np.float32)
    case_dir = tmp_path / "data" / "1PA001"
    for name, data in (("ct", ct), ("mr", ct), ("mask", np.ones(ct.shape, np.uint8))):
        _save_affine(case_dir / f"{name}.nii.gz", data, AFFINE)
    sct = _save_affine(tmp_path / "pred" / "1PA001.nii.gz", ct, AFFINE)
    with pytest.raises(DataError, match=f"^{sct}: SSIM needs every side >= 7 voxels.*ct.nii"):
        scoring.score_folder(tmp_path / "pred", tmp_path / "data", progress=False)


def test_a_mask_stored_flipped_selects_the_same_voxels(dataset, tmp_path):
    root, pred, names = dataset
    case_id = PELVIS_IDS[0]
    source = root / "Task1" / "pelvis" / case_id
    case_dir = tmp_path / "data" / case_id
    shutil.copytree(source, case_dir)
    mask, affine = _flipped_x(_load(source / "mask.nii.gz"), AFFINE)
    _save_affine(case_dir / "mask.nii.gz", mask.astype(np.uint8), affine)
    expected = scoring.score_folder(pred, root, progress=False, case_ids=[case_id])
    report = scoring.score_folder(pred, tmp_path / "data", progress=False, case_ids=[case_id])
    assert report.cases[0].metrics == expected.cases[0].metrics


def test_lpips_column_with_given_weights_and_why_empty_without(dataset, tmp_path):
    root, pred, names = dataset
    weights = random_vgg_npz(tmp_path / "vgg16.npz", "vgg16", seed=2)
    out = tmp_path / "with.json"
    result = _run_cli("--pred", pred, "--data", root, "--out", out, "--lpips_weights",
                      weights, "--region", "pelvis", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert str(weights) in doc["lpips_note"]
    net = lpips.load_lpips(weights)
    for row in doc["cases"]:
        case_dir = root / "Task1" / "pelvis" / row["id"]
        expected = lpips.lpips_volume(net, _load(case_dir / "ct.nii.gz"),
                                      _load(pred / names[row["id"]]),
                                      _load(case_dir / "mask.nii.gz") > 0)
        assert expected > 0 and row["lpips"] == pytest.approx(expected, rel=1e-5)
    assert "LPIPS" in out.with_suffix(".html").read_text()

    # No weights anywhere (a fresh working folder): no number, and the reason.
    bare = tmp_path / "bare"
    bare.mkdir()
    result = _run_cli("--pred", pred, "--data", root, "--out", bare / "without.json",
                      "--region", "pelvis", cwd=bare)
    assert result.returncode == 0, result.stderr
    doc = json.loads((bare / "without.json").read_text())
    assert all(row["lpips"] is None for row in doc["cases"])
    assert doc["lpips_note"].startswith("LPIPS not computed: no VGG-16")
    assert "LPIPS not computed" in result.stdout
    assert "LPIPS not computed" in (bare / "without.html").read_text()

    # A named file that is not there is bad input: exit 2, nothing written.
    line = _one_error_line(_run_cli("--pred", pred, "--data", root, "--out",
                                    bare / "missing.json", "--lpips_weights",
                                    bare / "nope.npz", cwd=bare))
    assert "nope.npz" in line and "--lpips_weights" in line
    assert not (bare / "missing.json").exists()


def test_markdown_table_from_metrics_json(tmp_path, capsys):
    from sct_jax.evaluation import markdown
    doc = {"n_scored": 2,
           "metrics": {"mae": {"mean": 87.15, "std": 2.36, "n": 2},
                       "hd95_bone": {"mean": "inf", "std": None, "n": 2},
                       "lpips": {"mean": None, "std": None, "n": 0}},
           "baselines": {"mean_ct": {"label": "mean training CT",
                                     "mean": {"mae": 120.15, "hd95_bone": 7.03,
                                              "lpips": None}}}}
    cols = (("mae", "MAE", ".1f"), ("hd95_bone", "HD95", ".2f"), ("lpips", "LPIPS", ".4f"))
    assert markdown.table(doc, "pix2pix", cols).splitlines() == [
        "| | MAE | HD95 | LPIPS |", "|---|---|---|---|",
        "| pix2pix (2 cases) | 87.2 ± 2.4 | inf | n/a |",
        "| mean training CT | 120.2 | 7.03 | n/a |"]
    (tmp_path / "m.json").write_text(json.dumps(doc))
    assert markdown.main([str(tmp_path / "m.json")]) == 0
    assert markdown.main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
