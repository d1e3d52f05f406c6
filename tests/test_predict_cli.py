"""sct-predict on a real MR: the porcine fixture (64 x 64 x 12, LPS, 1 x 1 x 2.5 mm)
through a tiny pix2pix trained once for the module on the RAS phantom (32 x 32 crop).

The porcine data (MRI-DIR, TCIA; CC BY 4.0, Ger et al., Med Phys 2018,
doi:10.1002/mp.13090): see tests/fixtures/porcine/README.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sct_jax.cli import predict as predict_cli
from sct_jax.config_utils import load_config_file
from sct_jax.data import preprocess
from sct_jax.data.io import load_volume
from sct_jax.inference import geometry
from sct_jax import runs
from sct_jax.training import loop

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "porcine" / "porcine01"
FULL_PORCINE = REPO.parent.parent / "shared" / "data" / "mridir_porcine"
FILL_HU = float(preprocess.unit_to_ct(np.float32(-1.0)))  # the old crop's fill value


def _tiny_as_run():
    """pix2pix tiny with the decoder and L1 of :func:`run_dir`."""
    config = load_config_file(str(REPO / "configs/pix2pix_pelvis.py:tiny"))
    config.model.gen.upsample, config.loss.body_mask = "transpose", False
    return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny pix2pix run (20 steps, so its sCT has structure), with the reference's
    decoder and whole-slice L1 (``upsample=transpose``, ``loss.body_mask=False``), which
    the tolerances below were set with: after 20 steps a body-masked model says anything
    beyond the mask, and the geometry tests here compare sCTs of masks made on two grids."""
    config = _tiny_as_run()
    config.train.steps = 20
    config.train.ckpt_every = 20
    config.eval.batch_size = 16
    workdir = tmp_path_factory.mktemp("run")
    loop.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def predicted(run_dir, tmp_path_factory):
    """One CLI call on a folder: the fixture MR and a permuted + flipped copy."""
    src = tmp_path_factory.mktemp("mrs")
    img = nib.load(FIXTURE / "mr.nii.gz")
    nib.save(img, src / "original.nii.gz")
    data = np.asarray(img.dataobj)
    n_x = data.shape[0]
    # Stored as (Z, X reversed, Y); voxel (k, i', j) is the original (X-1-i', j, k).
    new_to_old = np.array([[0, -1, 0, n_x - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
                          float)
    permuted = np.ascontiguousarray(np.flip(data.transpose(2, 0, 1), axis=1))
    nib.save(nib.Nifti1Image(permuted, img.affine @ new_to_old), src / "permuted.nii.gz")
    out = tmp_path_factory.mktemp("out")
    assert predict_cli.main(["-i", str(src), "-o", str(out), "-m", str(run_dir)]) == 0
    return src, out


def test_training_records_its_geometry(run_dir):
    recorded = runs.read_geometry(None, run_dir)
    assert recorded.axcodes == ("R", "A", "S") and recorded.region == "pelvis"
    assert recorded.spacing == (1.0, 1.0, 2.5) and recorded.cases > 0


def test_sct_is_on_the_mr_grid_with_no_filled_body_voxel(predicted):
    src, out = predicted
    mr = nib.load(src / "original.nii.gz")
    sct = nib.load(out / "original_sct.nii.gz")
    assert sct.shape == mr.shape
    np.testing.assert_array_equal(sct.affine, mr.affine)
    for coded in ("get_qform", "get_sform"):
        q_mr, code_mr = getattr(mr.header, coded)(coded=True)
        q_sct, code_sct = getattr(sct.header, coded)(coded=True)
        assert code_mr == code_sct
        np.testing.assert_array_equal(q_sct, q_mr)
    hu = np.asarray(sct.dataobj, np.float32)
    body = load_volume(FIXTURE / "mask.nii.gz").data > 0
    # The training crop is 32 x 32 of a 64 x 64 slice: 3/4 of the body lies outside it.
    assert body.mean() > 0.99
    assert np.count_nonzero(hu[body] == FILL_HU) == 0
    assert np.std(hu[body]) > 1.0  # a network's output, not a constant


def test_permuted_and_flipped_axes_give_the_same_sct(predicted):
    _, out = predicted
    sct = np.asarray(nib.load(out / "original_sct.nii.gz").dataobj, np.float32)
    other = np.asarray(nib.load(out / "permuted_sct.nii.gz").dataobj, np.float32)
    np.testing.assert_allclose(other, np.flip(sct.transpose(2, 0, 1), axis=1),
                               rtol=0, atol=0.01)


def _fine_copy(path: Path, factor: float, out: Path):
    """The MR resampled to ``factor`` x spacing with scipy's zoom (an independent
    resampler), voxel edges aligned; returns ``(fine path, fine affine)``."""
    img = nib.load(path)
    data = np.asarray(img.dataobj, np.float32)
    fine = ndimage.zoom(data, 1 / factor, order=1, grid_mode=True, mode="grid-constant")
    scale = np.array(data.shape) / np.array(fine.shape)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * scale
    # The first fine voxel centre lies half a fine voxel from the common edge.
    affine[:3, 3] = img.affine[:3, :3] @ (0.5 * scale - 0.5) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(fine, affine), out)
    return out, affine


def _on_grid_of(volume, reference_affine, shape):
    """``volume`` sampled linearly at the voxel centres of another grid (world coords)."""
    idx = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    world = idx @ reference_affine[:3, :3].T + reference_affine[:3, 3]
    own = (world - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T
    return ndimage.map_coordinates(volume.data, np.moveaxis(own, -1, 0), order=1,
                                   mode="nearest")


def test_finer_spacing_gives_the_same_sct_within_tolerance(run_dir, predicted, tmp_path,
                                                           monkeypatch):
    """An MR at 0.7x spacing: its sCT, sampled at the original voxel centres, agrees
    with the original's sCT in the body within 60 HU mean absolute difference (two
    linear interpolations of the MR and one of the sCT blur the tiny model's noisy,
    edge-heavy sCT); predicting it at its own spacing disagrees at least 1.5x more."""
    _, out = predicted
    fine_path, affine = _fine_copy(FIXTURE / "mr.nii.gz", 0.7, tmp_path / "fine.nii.gz")
    sct = load_volume(out / "original_sct.nii.gz")
    interior = (slice(2, -2), slice(2, -2), slice(1, -1))

    def disagreement(name):
        assert predict_cli.main(["-i", str(fine_path), "-o", str(tmp_path / name), "-m",
                                 str(run_dir)]) == 0
        fine_sct = load_volume(tmp_path / name)
        assert fine_sct.shape == nib.load(fine_path).shape
        np.testing.assert_allclose(fine_sct.affine, affine, atol=1e-5)
        back = _on_grid_of(fine_sct, sct.affine, sct.shape)
        return float(np.abs(back[interior] - sct.data[interior]).mean())

    resampled = disagreement("fine_sct.nii.gz")
    monkeypatch.setattr(geometry, "SPACING_TOLERANCE", 1.0)  # never resample
    unresampled = disagreement("fine_unresampled_sct.nii.gz")
    print(f"0.7x spacing: mean |dHU| in the body {resampled:.1f} resampled, "
          f"{unresampled:.1f} at its own spacing")
    assert np.ptp(sct.data[interior]) > 200
    assert resampled < 60.0 and unresampled > 1.5 * resampled, (resampled, unresampled)


def _write_dicom_mr(volume, folder: Path) -> None:
    """The fixture as a DICOM MR series with pydicom (LPS, one file per axial slice)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "MR", series, study
        ds.FrameOfReferenceUID, ds.InstanceNumber = frame, k + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [float(v) for v in
                                      [*lps[:3, 0] / spacing[0], *lps[:3, 1] / spacing[1]]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        pixels = np.ascontiguousarray(volume.data[:, :, k].T.astype(np.uint16))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.tobytes()
        # Files named out of slice order: the reader must sort by position.
        ds.save_as(folder / f"IM{(k * 7) % volume.shape[2]:03d}.dcm",
                   enforce_file_format=True)


def test_dicom_series_predicts_the_same_sct_as_the_nifti(run_dir, predicted, tmp_path):
    _, out = predicted
    mr = load_volume(FIXTURE / "mr.nii.gz")
    assert mr.data.min() >= 0 and np.array_equal(mr.data, np.round(mr.data))
    _write_dicom_mr(mr, tmp_path / "mr_dicom")
    assert predict_cli.main(["-i", str(tmp_path / "mr_dicom"), "-o", str(tmp_path / "o"),
                             "-m", str(run_dir)]) == 0
    dicom_sct = load_volume(tmp_path / "o" / "mr_dicom_sct.nii.gz")
    nifti_sct = load_volume(out / "original_sct.nii.gz")
    np.testing.assert_allclose(dicom_sct.affine, nifti_sct.affine, atol=1e-4)
    np.testing.assert_allclose(dicom_sct.data, nifti_sct.data, rtol=0, atol=0.01)


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        proc.stderr
    return lines[0]


def _module_cli(*args):
    return subprocess.run([sys.executable, "-m", "sct_jax.predict", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_output_onto_the_input_is_refused(tmp_path):
    mr = tmp_path / "mr.nii.gz"
    mr.write_bytes((FIXTURE / "mr.nii.gz").read_bytes())
    before = mr.read_bytes()
    line = _one_error_line(_module_cli("-i", mr, "-o", tmp_path / "." / "mr.nii.gz",
                                       "-m", tmp_path))
    assert "mr.nii.gz" in line and "input" in line
    assert mr.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == \
        ["mr.nii.gz"]
    line = _one_error_line(_module_cli("-i", tmp_path, "-o", tmp_path, "-m", tmp_path))
    assert "input folder" in line


def test_bad_inputs_are_one_line_and_write_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    for args, expected in [
            (["-i", tmp_path / "missing.nii.gz"], "missing.nii.gz: input not found"),
            (["-i", broken], "broken.nii.gz"),
            (["-i", FIXTURE / "mr.nii.gz", "--mask", FIXTURE / "missing.nii.gz"],
             "missing.nii.gz"),
            (["-i", FIXTURE / "mr.nii.gz", "--samples", "2"], "--samples 2")]:
        assert predict_cli.main([*map(str, args), "-o", str(out), "-m", str(run_dir)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: ") and expected in lines[-1], lines
        assert not out.exists()
    assert predict_cli.main(["-i", str(FIXTURE / "mr.nii.gz"), "-o", str(out), "-m",
                             str(tmp_path / "nomodel")]) == 2
    assert "nomodel" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(not (FULL_PORCINE / "mr_t2.nii.gz").is_file(),
                    reason="the full porcine MR is not present")
def test_full_porcine_mr(run_dir, tmp_path):
    mr = load_volume(FULL_PORCINE / "mr_t2.nii.gz")
    assert predict_cli.main(["-i", str(FULL_PORCINE / "mr_t2.nii.gz"), "-o",
                             str(tmp_path / "sct.nii.gz"), "-m", str(run_dir),
                             "--batch-size", "64"]) == 0
    sct = load_volume(tmp_path / "sct.nii.gz")
    assert sct.shape == mr.shape
    np.testing.assert_array_equal(sct.affine, mr.affine)
    body = load_volume(FULL_PORCINE / "mask.nii.gz").data > 0
    assert np.count_nonzero(sct.data[body] == FILL_HU) == 0


def test_evaluate_scores_only_this_calls_cases(run_dir, tmp_path, capsys):
    """evaluate on a data root with a case without CT and a stale prediction file:
    the CT-less case is predicted and listed unscored, the stale file ignored."""
    import shutil

    from sct_jax.evaluation.evaluate import evaluate_run

    root = tmp_path / "data"
    shutil.copytree(FIXTURE, root / "porcine01")
    (root / "porcine02").mkdir()
    for name in ("mr.nii.gz", "mask.nii.gz"):
        shutil.copy(FIXTURE / name, root / "porcine02" / name)
    config = runs.read_config(run_dir)
    config.eval.max_cases = 0
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    stale = workdir / "predictions" / "porcine03" / "sct.nii.gz"
    stale.parent.mkdir(parents=True)
    shutil.copy(FIXTURE / "ct.nii.gz", stale)  # a case of an earlier call, no longer here
    report = evaluate_run(config, workdir, data_root=root, panels=False)
    assert [c.id for c in report.cases] == ["porcine01"]
    assert report.no_reference == ("porcine02",)
    assert (workdir / "predictions" / "porcine02" / "sct.nii.gz").is_file()
    assert "no reference CT" in capsys.readouterr().out


def test_exported_model_predicts_as_the_run_and_its_serialized_function(
        run_dir, predicted, tmp_path, capsys):
    import json

    from sct_jax.cli import export_model as export_cli
    from sct_jax.export import model as model_files
    from sct_jax.inference import predict as predict_lib

    _, out = predicted
    model_dir = tmp_path / "model"
    assert export_cli.main(["--workdir", str(run_dir), "-o", str(model_dir)]) == 0
    description = json.loads((model_dir / "model.json").read_text())
    assert description["method"] == "pix2pix" and description["step"] == 20
    assert description["training_geometry"]["axcodes"] == ["R", "A", "S"]
    assert description["inference"]["window"] == [32, 32]
    assert not (model_dir / "checkpoints").exists()  # parameters only
    # The model directory alone (no config file, no checkpoint) gives the run's sCT.
    assert predict_cli.main(["-i", str(FIXTURE / "mr.nii.gz"), "-o",
                             str(tmp_path / "sct.nii.gz"), "-m", str(model_dir)]) == 0
    run_sct = load_volume(out / "original_sct.nii.gz").data
    np.testing.assert_allclose(load_volume(tmp_path / "sct.nii.gz").data, run_sct,
                               rtol=0, atol=1e-3)
    # The serialized function, driven only by model.json's windows.
    loaded = model_files.load_exported(model_dir)
    serialized_sct = predict_lib.predict_mr(
        model_files.serialized_volume_predictor(model_dir), loaded.config,
        load_volume(FIXTURE / "mr.nii.gz"), None, loaded.geometry)
    np.testing.assert_allclose(serialized_sct, run_sct, rtol=0, atol=1e-2)
    # A changed parameter file is refused, in one line.
    params = model_dir / model_files.PARAMS
    raw = bytearray(params.read_bytes())
    raw[-1] ^= 0xFF
    params.write_bytes(bytes(raw))
    capsys.readouterr()
    assert predict_cli.main(["-i", str(FIXTURE / "mr.nii.gz"), "-o",
                             str(tmp_path / "again.nii.gz"), "-m", str(model_dir)]) == 2
    assert "content hash" in capsys.readouterr().err
    assert not (tmp_path / "again.nii.gz").exists()


def test_evaluate_uses_the_runs_config_and_names_mismatching_keys(run_dir):
    from sct_jax.evaluation.evaluate import evaluate_run
    from sct_jax.errors import ConfigError

    own = runs.config_for(run_dir)
    assert own.method == "pix2pix" and tuple(own.data.crop) == (32, 32)
    given = _tiny_as_run()
    assert runs.config_for(run_dir, given) is given  # train.steps differs: allowed
    given.data.crop = (64, 32)
    given.model.gen.ngf = 8
    with pytest.raises(ConfigError, match=r"data\.crop.*model\.gen\.ngf") as err:
        runs.config_for(run_dir, given)
    assert "\n" not in str(err.value)
