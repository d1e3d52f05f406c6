"""Test-time augmentation and ensembles (sct_jax.inference.ensemble, sct-predict --tta,
-m A -m B): the flips training shows, the mean and std over members, views and
samples, and the CLI's checks of several model folders.

One tiny pix2pix (2 steps on synthetic batches, a checkpoint each step) gives two
different members: its step-2 checkpoint (the run) and its step-1 checkpoint (exported).
Stand-in predictors (plain functions in place of the jitted network) make the
equivariance cases exact by construction.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sct_jax import runs
from sct_jax.cli import predict as predict_cli
from sct_jax.config_utils import load_config_file
from sct_jax.data import datasets, pipeline
from sct_jax.data.geometry import TrainingGeometry
from sct_jax.data.io import Volume, load_volume
from sct_jax.export.model import export_model, load_model
from sct_jax.inference import ensemble
from sct_jax.inference import predict as predict_lib
from sct_jax.training import loop

sys.path.insert(0, str(Path(__file__).parent))
from test_training import synthetic_dataset, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GEOMETRY = TrainingGeometry(("R", "A", "S"), (1.0, 1.0, 2.5), "pelvis", 1)
SHAPE = (40, 36, 8)  # SSIM (evaluate) needs 7 voxels a side


def _mr_array() -> np.ndarray:
    """An off-centre body (so that a left-right flip moves it) with a dark bone in it."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    body = ((x - 17) / 14.0) ** 2 + ((y - 18) / 12.0) ** 2 < 1.0
    bone = ((x - 11) / 4.0) ** 2 + ((y - 15) / 3.0) ** 2 < 1.0
    rng = np.random.default_rng(0)
    mr = np.where(body, 300.0 + 4.0 * x, 0.0) * np.where(bone, 0.1, 1.0)
    mr = np.repeat(mr[..., None], SHAPE[2], axis=2) + rng.gamma(2.0, 4.0, SHAPE)
    return mr.astype(np.float32)


@pytest.fixture(scope="module")
def mr() -> Volume:
    """The MR on the training grid (RAS, 1 x 1 x 2.5 mm)."""
    return Volume(_mr_array(), np.diag([1.0, 1.0, 2.5, 1.0]))


@pytest.fixture(scope="module")
def permuted_mr(mr) -> tuple[Volume, int]:
    """The same MR stored as (Z, X reversed, Y): the model grid's X is its axis 1.

    Returns:
      ``(volume, axis)``: the volume and its storage axis along the patient's
      left-right.
    """
    n_x = SHAPE[0]
    # voxel (k, i', j) of the new array is the original (X-1-i', j, k)
    new_to_old = np.array([[0, -1, 0, n_x - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
                          float)
    data = np.ascontiguousarray(np.flip(mr.data.transpose(2, 0, 1), axis=1))
    return Volume(data, mr.affine @ new_to_old), 1


@pytest.fixture(scope="module")
def config():
    return load_config_file(str(REPO / "configs/pix2pix_pelvis.py:tiny"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny run (step 2) and its step-1 checkpoint exported: two different models of
    one config and training grid; and a CBCT model folder (the run's config and geometry
    saying ``data.input=cbct``; never loaded)."""
    workdir = tmp_path_factory.mktemp("ens_run")
    loop.train(tiny_config(steps=2), workdir, make_dataset=synthetic_dataset)
    runs.write_geometry(GEOMETRY, workdir)
    step1 = export_model(workdir, tmp_path_factory.mktemp("ens_export") / "step1",
                         model=load_model(workdir, checkpoint=1), serialized=False)
    cbct = tmp_path_factory.mktemp("ens_cbct") / "cbct_run"
    cbct.mkdir()
    for name in (runs.CONFIG_FILE, "geometry.json", "batch_spec.json"):
        shutil.copy(workdir / name, cbct / name)
    saved = json.loads((cbct / runs.CONFIG_FILE).read_text())
    saved["data"]["input"] = "cbct"
    (cbct / runs.CONFIG_FILE).write_text(json.dumps(saved))
    return {"run": workdir, "step1": step1, "cbct": cbct}


@pytest.fixture(scope="module")
def members(models):
    """The two models as ensemble members (one jitted predict each, shared by the tests)."""
    out = []
    for path in (models["run"], models["step1"]):
        model = load_model(path)
        out.append(ensemble.make_member(model.config, model.state, model.geometry, str(path)))
    assert [load_model(p).step for p in (models["run"], models["step1"])] == [2, 1]
    return out


def _mirrored(volume: Volume, axis: int) -> Volume:
    """The patient flipped left-right: the data flipped along ``axis``, the same affine."""
    return Volume(np.ascontiguousarray(np.flip(volume.data, axis)), volume.affine)


def _hand_views(member, volume: Volume, axis: int) -> list[np.ndarray]:
    """A member's plain sCT and its sCT of the mirrored patient flipped back, float64."""
    plain = predict_lib.predict_mr(
        predict_lib.make_volume_predictor(member.config, member.state,
                                          jitted_predict=member.jitted_predict),
        member.config, volume, None, member.geometry)
    mirror = predict_lib.predict_mr(
        predict_lib.make_volume_predictor(member.config, member.state,
                                          jitted_predict=member.jitted_predict),
        member.config, _mirrored(volume, axis), None, member.geometry)
    return [plain.astype(np.float64), np.flip(mirror, axis).astype(np.float64)]


def _stand_in(config, predict_window):
    """A member whose network is ``predict_window``: ``(B, H, W)`` centre channel of the
    normalised MR windows -> ``(B, H, W)`` in [-1, 1]."""
    centre = int(config.data.context)

    def predict(state, batch):
        return predict_window(np.asarray(batch)[..., centre])[..., None]

    return ensemble.Member(config, None, GEOMETRY, predict, "stand-in")


# ------------------------------------------------------------------ views and flips


def test_tta_views_are_the_training_flips(config):
    """TTA predicts under the flips training draws: the identity and pipeline.FLIP_AXES,
    for every data mode; without TTA, the identity only."""
    assert ensemble.tta_views(config, tta=False) == ((),)
    for mode in ("slices", "patches", "unpaired_slices"):
        changed = config.copy_and_resolve_references()
        with changed.unlocked():
            changed.data.mode = mode
        assert ensemble.tta_views(changed, tta=True) == ((), pipeline.FLIP_AXES) == \
            datasets.augmentation_flips(changed) == ((), (0,))
    assert ensemble.draw_count([config, config], samples=3, tta=True) == 12
    x = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(pipeline.flip(x), x[::-1])


def test_tta_of_a_flip_equivariant_predictor_is_the_plain_prediction(config, permuted_mr):
    """An elementwise network commutes with every flip: TTA gives the plain sCT (to
    float rounding of the window blend) and a near-zero spread, through the whole path
    (windows, reorientation, HU)."""
    volume, _ = permuted_mr
    member = _stand_in(config, lambda u: 0.8 * np.tanh(u))
    plain, no_std = predict_lib.predict_ensemble([member], volume, None)
    tta, std = predict_lib.predict_ensemble([member], volume, None, tta=True)
    assert no_std is None and std is not None
    np.testing.assert_allclose(tta, plain, rtol=0, atol=1e-3)
    assert float(std.max()) < 1e-3


def test_tta_of_a_non_equivariant_predictor_is_the_mean_of_the_patient_and_its_mirror(
        config, permuted_mr):
    """A network that sees position (a ramp along the window's X): TTA differs from the
    plain sCT and equals the mean of the plain sCT and the sCT of the mirrored patient
    flipped back, computed by hand on the input's own voxel order (its left-right is
    storage axis 1 here, the model grid's axis 0)."""
    volume, axis = permuted_mr
    ramp = np.linspace(-0.3, 0.3, int(config.data.crop[0]))[None, :, None]
    member = _stand_in(config, lambda u: 0.5 * np.tanh(u) + ramp)
    tta, std = predict_lib.predict_ensemble([member], volume, None, tta=True)
    plain, mirrored_back = _hand_views(member, volume, axis)
    assert np.abs(tta - plain).max() > 10.0  # HU: the ramp is not flip-symmetric
    np.testing.assert_allclose(tta, (plain + mirrored_back) / 2, rtol=0, atol=1e-3)
    np.testing.assert_allclose(std, np.abs(plain - mirrored_back) / 2, rtol=0, atol=1e-3)


# ----------------------------------------------------------- the trained model


def test_ensemble_of_one_model_is_its_plain_prediction(members, mr):
    """One member, no TTA, one sample: the model's plain sCT bit for bit, no std map."""
    member = members[0]
    plain = predict_lib.predict_mr(
        predict_lib.make_volume_predictor(member.config, member.state,
                                          jitted_predict=member.jitted_predict),
        member.config, mr, None, member.geometry)
    sct, std = predict_lib.predict_ensemble([member], mr, None)
    assert std is None and sct.dtype == np.float32
    np.testing.assert_array_equal(sct, plain)
    via_draws, std = predict_lib.predict_draws(member.config, member.state, mr, None,
                                               member.geometry)
    assert std is None
    np.testing.assert_array_equal(via_draws, plain)


def test_tta_of_the_model_is_the_mean_of_the_patient_and_its_mirror(members, permuted_mr):
    volume, axis = permuted_mr
    plain, mirrored_back = _hand_views(members[0], volume, axis)
    sct, std = predict_lib.predict_ensemble(members[:1], volume, None, tta=True)
    assert np.abs(plain - mirrored_back).max() > 1.0  # the net is not flip-equivariant
    np.testing.assert_allclose(sct, (plain + mirrored_back) / 2, rtol=0, atol=1e-3)
    np.testing.assert_allclose(std, np.abs(plain - mirrored_back) / 2, rtol=0, atol=1e-3)


def test_ensemble_std_is_the_numpy_std_of_the_members(members, mr):
    """Two different members: the mean and the float64 numpy std (ddof=0) of their
    sCTs."""
    a, b = (predict_lib.predict_ensemble([m], mr, None)[0] for m in members)
    sct, std = predict_lib.predict_ensemble(members, mr, None)
    stack = np.stack([a, b]).astype(np.float64)
    assert np.abs(a - b).max() > 1.0
    np.testing.assert_allclose(sct, stack.mean(0), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(std, stack.std(0, ddof=0), rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(std > 0, a != b)


def test_ensemble_std_is_non_zero_exactly_where_members_differ(config, mr):
    """Two stand-in members that agree except in the bright voxels: the std is zero
    exactly where their sCTs are equal and the numpy std (ddof=0) elsewhere."""
    first = _stand_in(config, lambda u: 0.5 * np.tanh(u))
    second = _stand_in(config, lambda u: 0.5 * np.tanh(u) + 0.2 * (u > 0.5))
    a, b = (predict_lib.predict_ensemble([m], mr, None)[0] for m in (first, second))
    sct, std = predict_lib.predict_ensemble([first, second], mr, None)
    differ = a != b
    assert differ.any() and (~differ).any()
    np.testing.assert_array_equal(std > 0, differ)
    stack = np.stack([a, b]).astype(np.float64)
    np.testing.assert_allclose(std, stack.std(0, ddof=0), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(sct, stack.mean(0), rtol=1e-6, atol=1e-4)


def test_ensemble_with_tta_averages_every_member_and_view(members, mr):
    """Members x views: four draws, against numpy on the four computed by hand."""
    draws = [v for m in members for v in _hand_views(m, mr, 0)]
    sct, std = predict_lib.predict_ensemble(members, mr, None, tta=True)
    stack = np.stack(draws)
    np.testing.assert_allclose(sct, stack.mean(0), rtol=0, atol=1e-3)
    np.testing.assert_allclose(std, stack.std(0, ddof=0), rtol=0, atol=1e-3)


def test_mean_and_std_of_one_draw_is_the_draw(mr):
    draw = mr.data * np.float32(1.1)
    mean, std = ensemble.mean_and_std(iter([draw]))
    assert std is None
    np.testing.assert_array_equal(mean, draw)
    with pytest.raises(ValueError):
        ensemble.mean_and_std(iter([]))


# ------------------------------------------------------------------------- the CLI


def _predict(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = predict_cli.main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture()
def mr_file(mr, tmp_path) -> Path:
    path = tmp_path / "in" / "mr.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(mr.data, mr.affine), path)
    return path


def test_cli_ensemble_writes_mean_std_and_a_report_naming_every_member(
        models, members, mr_file, mr, tmp_path, capsys):
    out = tmp_path / "out" / "sct.nii.gz"
    report = tmp_path / "out" / "run.json"
    code, lines = _predict(["-i", mr_file, "-o", out, "-m", models["run"], "-m",
                            models["step1"], "--tta", "--report", report], capsys)
    assert code == 0, lines
    sct, std = predict_lib.predict_ensemble(members, mr, None, tta=True)
    np.testing.assert_array_equal(load_volume(out).data, sct)
    std_path = tmp_path / "out" / "sct_std.nii.gz"
    np.testing.assert_array_equal(load_volume(std_path).data, std)
    document = json.loads(report.read_text())
    assert document["command"]["tta"] is True and document["command"]["draws"] == 4
    assert [(m["path"], m["step"]) for m in document["members"]] == [
        (str(models["run"].resolve()), 2), (str(models["step1"].resolve()), 1)]
    assert all(len(m["content_sha256"]) == 64 for m in document["members"])
    assert document["model"] == document["members"][0]
    # --continue leaves the finished pair alone; one model without --tta removes the
    # std map, which would no longer describe the sCT.
    code, lines = _predict(["-i", mr_file, "-o", out, "-m", models["run"], "-m",
                            models["step1"], "--tta", "--continue"], capsys)
    assert code == 0 and any("already have their sCT" in line for line in lines), lines
    code, lines = _predict(["-i", mr_file, "-o", out, "-m", models["run"]], capsys)
    assert code == 0, lines
    assert not std_path.exists()
    np.testing.assert_array_equal(load_volume(out).data,
                                  predict_lib.predict_ensemble(members[:1], mr, None)[0])


def test_cli_refuses_a_bad_member_before_loading_anything(models, mr_file, tmp_path, capsys,
                                                          monkeypatch):
    """A missing folder, a folder that is no model, a CBCT model beside an MR one and
    the same model twice: one ``error:`` line naming it, exit 2, nothing written, no
    model loaded."""
    from sct_jax.export import model as model_lib

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model_lib, "load_model", no_load)
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("not a model")
    out = tmp_path / "out"
    run, step1 = str(models["run"]), str(models["step1"])
    for second, fragment in [(tmp_path / "missing", "missing: model not found"),
                             (not_a_model, f"{not_a_model}/config.json: not found"),
                             (models["cbct"], f"{models['cbct']}: a CBCT model"),
                             (f"{run}/.", f"{run}/.: given twice")]:
        code, lines = _predict(["-i", mr_file, "-o", out / "sct.nii.gz", "-m", run,
                                "-m", step1, "-m", second, "--tta"], capsys)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("error: ") and fragment in lines[0], lines
        assert not out.exists()
    # An ensemble (or --tta) writes a std map: one landing on an input is refused too.
    std_named = tmp_path / "scans" / "sct_std.nii.gz"
    std_named.parent.mkdir()
    shutil.copy(mr_file, std_named)
    for extra in (["-m", step1], ["--tta"]):
        code, lines = _predict(["-i", std_named, "-o", std_named.parent / "sct.nii.gz",
                                "-m", run, *extra], capsys)
        assert code == 2 and len(lines) == 1 and "std map" in lines[0], lines
        assert sorted(p.name for p in std_named.parent.iterdir()) == ["sct_std.nii.gz"]


# ------------------------------------------------------------------- evaluate.py


def test_evaluate_scores_the_tta_ensemble_and_writes_its_std(models, mr, tmp_path, capsys):
    """evaluate_run with tta and a second run (the first's step 1): the scored sCT is
    the library's mean over 2 runs x 2 views, sct_std.nii.gz beside it; a plain call
    afterwards removes the std map."""
    from sct_jax.evaluation.evaluate import evaluate_run

    root = tmp_path / "data" / "case01"
    root.mkdir(parents=True)
    body = mr.data > 50
    for name, data in (("mr", mr.data), ("ct", np.where(body, 40.0, -1000.0)),
                       ("mask", body.astype(np.uint8))):
        nib.save(nib.Nifti1Image(np.asarray(data), mr.affine), root / f"{name}.nii.gz")
    first, second = tmp_path / "run_a", tmp_path / "run_b"
    shutil.copytree(models["run"], first)
    shutil.copytree(models["run"], second)
    shutil.rmtree(second / "checkpoints" / "2")  # its latest (and best): step 1
    config = runs.read_config(first)
    report = evaluate_run(config, first, data_root=root.parent, panels=False, tta=True,
                          ensemble=[str(second)])
    out = capsys.readouterr().out
    assert "each sCT the mean of 4 predictions (2 runs, flipped left-right (TTA))" in out
    case_dir = first / "predictions" / "case01"
    members = predict_lib.load_members(config, first, [second])
    assert [int(load_model(p).step) for p in (first, second)] == [2, 1]
    sct, std = predict_lib.predict_ensemble(members, mr, body, tta=True)
    np.testing.assert_array_equal(load_volume(case_dir / "sct.nii.gz").data, sct)
    np.testing.assert_array_equal(load_volume(case_dir / "sct_std.nii.gz").data, std)
    metrics = json.loads((first / "predictions" / "metrics.json").read_text())
    assert metrics["prediction"] == {"samples": 1, "tta": True, "draws": 4,
                                     "ensemble": [str(first), str(second)]}
    assert [c.id for c in report.cases] == ["case01"]
    evaluate_run(config, first, data_root=root.parent, panels=False)
    assert not (case_dir / "sct_std.nii.gz").exists()
