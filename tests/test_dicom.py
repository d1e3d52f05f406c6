"""DICOM CT export (sct_jax.export.dicom, python -m sct_jax.cli.export_dicom).

Read-back references: the DICOM standard's pixel -> patient formula (PS3.3 C.7.6.2.1.1)
evaluated by hand on pydicom's tags, and SimpleITK's own series reader.
"""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from sct_jax.cli import export_dicom
from sct_jax.data.io import Volume, load_volume, save_volume
from sct_jax.data.phantom import generate_case
from sct_jax.errors import ConfigError, DataError
from sct_jax.export.dicom import CT_IMAGE_STORAGE, export_dicom_series, slice_geometry

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k  # Rodrigues


def _affine(linear, origin):
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


AFFINES = {
    # Pelvis-like spacing, off-centre origin, RAS+.
    "axial": _affine(np.diag([1.0, 1.0, 2.5]), [12.5, -40.25, 100.0]),
    # Oblique and anisotropic in all three axes, right-handed.
    "oblique": _affine(_rotation([1.0, 2.0, 3.0], 20.0) @ np.diag([0.8, 1.2, 2.5]),
                       [-30.0, 15.5, -7.25]),
    # Left-handed (LAS, radiological): readers stack its slices in reverse order.
    "left_handed": _affine(np.diag([-0.9, 1.1, 2.0]), [50.0, -20.0, 10.0]),
}


@pytest.fixture(scope="module")
def phantom_sct():
    """A small phantom CT with non-integer HU, one voxel below -1024 and one high."""
    ct = generate_case("pelvis", 0, seed=0, shape=(20, 16, 5))["ct"].astype(np.float32)
    ct += 0.3
    ct[0, 0, 0], ct[1, 0, 0] = -1100.0, 3500.0
    return ct


def _expected_hu(data):
    return np.clip(np.rint(data), -1024, None)


def _write_nifti(tmp_path, data, affine, name="sct.nii.gz"):
    return save_volume(tmp_path / name, data, affine)


def _read_pydicom(folder):
    """Slices sorted along the normal, as a reader does: [(dataset, HU (Rows, Cols))]."""
    slices = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    slices.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal))
    return [(ds, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
            for ds in slices]


@pytest.mark.parametrize("kind", list(AFFINES))
def test_roundtrip_pydicom_and_simpleitk(tmp_path, phantom_sct, kind):
    nifti = _write_nifti(tmp_path, phantom_sct, AFFINES[kind])
    volume = load_volume(nifti)  # the affine as stored (float32 in the header)
    assert export_dicom.main(["--sct", str(nifti), "--out", str(tmp_path / "dcm")]) == 0
    expected = _expected_hu(volume.data)
    nx, ny, nz = volume.shape
    lps = LPS @ volume.affine

    slices = _read_pydicom(tmp_path / "dcm")
    assert len(slices) == nz
    if kind == "left_handed":  # sorted along the normal = decreasing k
        assert [int(ds.InstanceNumber) for ds, _ in slices] == list(range(nz, 0, -1))
    else:
        assert [int(ds.InstanceNumber) for ds, _ in slices] == list(range(1, nz + 1))
    for ds, hu in slices:
        k = int(ds.InstanceNumber) - 1
        assert (ds.Rows, ds.Columns) == (ny, nx)
        np.testing.assert_array_equal(hu, expected[:, :, k].T)
        # PS3.3 C.7.6.2.1.1: P(r, c) = IPP + c * dc * X + r * dr * Y, X/Y = IOP triplets.
        x_cos, y_cos = np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3))
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        for c, r in ((0, 0), (nx - 1, 0), (0, ny - 1), (nx - 1, ny - 1), (3, 7)):
            dicom_point = ipp + c * col_spacing * x_cos + r * row_spacing * y_cos
            nifti_point = (lps @ [c, r, k, 1.0])[:3]
            np.testing.assert_allclose(dicom_point, nifti_point, atol=1e-4)
        assert float(ds.SliceThickness) == pytest.approx(np.linalg.norm(lps[:3, 2]), abs=1e-6)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dcm")))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-5)
    if kind == "left_handed":
        # Same voxels in space, stacked the other way: ITK index k' is NIfTI k = Z-1-k'.
        np.testing.assert_array_equal(array, expected[:, :, ::-1])
        np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3] + (nz - 1) * lps[:3, 2],
                                   atol=1e-4)
        flip = np.diag([1.0, 1.0, -1.0])
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)),
                                   lps[:3, :3] / spacing @ flip, atol=1e-6)
    else:
        np.testing.assert_array_equal(array, expected)
        np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3], atol=1e-4)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)),
                                   lps[:3, :3] / spacing, atol=1e-6)
    assert not list(tmp_path.glob(".dcm.tmp-*"))  # the temporary folder was renamed


def test_tags_mark_a_synthetic_ct_series(tmp_path, phantom_sct):
    files = export_dicom_series(Volume(phantom_sct, AFFINES["axial"]), tmp_path / "out",
                                source="MR (pix2pix)", source_file="sct.nii.gz")
    datasets = [pydicom.dcmread(p) for p in files]
    assert [p.name for p in files] == [f"CT{k:04d}.dcm" for k in range(1, 6)]
    for ds in datasets:
        assert ds.SOPClassUID == CT_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "CT"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert ds.SeriesDescription == "SYNTHETIC CT from MR (pix2pix)"
        assert "SYNTHETIC CT" in ds.DerivationDescription
        assert "sct.nii.gz" in ds.DerivationDescription
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.min() >= 0
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    # Two exports are two series of two studies, each its own frame of reference.
    again = pydicom.dcmread(export_dicom_series(Volume(phantom_sct, AFFINES["axial"]),
                                                tmp_path / "again")[0])
    for tag in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert again[tag].value != datasets[0][tag].value


def _fake_mr_series(folder, n=2, geometry=None, shape=None, patient_id="PAT-0042",
                    prefix="MR", pixels=False):
    """A minimal MR Image Storage series with patient/study tags, plus a non-DICOM file;
    with ``geometry`` (:func:`slice_geometry`) and ``shape``, its slices are on that grid
    (and hold zero pixels with ``pixels``). Files ``<prefix><k>.dcm``; ``folder`` may
    exist."""
    folder.mkdir(parents=True, exist_ok=True)
    study, frame, series = generate_uid(), generate_uid(), generate_uid()
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID = "Doe^Jane", patient_id
        ds.PatientBirthDate, ds.PatientSex = "19600102", "F"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20240305", "101500"
        ds.StudyID, ds.AccessionNumber = "S17", "ACC99"
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
        ds.PatientPosition = "FFS"
        ds.InstanceNumber = k + 1
        if geometry is not None:
            ds.ImagePositionPatient = [float(v) for v in geometry["positions"][k]]
            ds.ImageOrientationPatient = [float(v) for v in geometry["orientation"]]
            ds.PixelSpacing = [float(v) for v in geometry["pixel_spacing"]]
            ds.Rows, ds.Columns = shape[1], shape[0]
            if pixels:
                ds.set_pixel_data(np.zeros((shape[1], shape[0]), np.uint16), "MONOCHROME2",
                                  16, generate_instance_uid=False)
        ds.save_as(folder / f"{prefix}{k}.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM")
    return {"study": study, "frame": frame, "series": series}


def test_like_copies_frame_only_from_a_series_on_the_sct_grid(tmp_path, phantom_sct, caplog):
    uids = _fake_mr_series(tmp_path / "mr")  # no slice geometry: another grid
    nifti = _write_nifti(tmp_path, phantom_sct, AFFINES["axial"])
    assert export_dicom.main(["--sct", str(nifti), "--out", str(tmp_path / "dcm"),
                              "--like", str(tmp_path / "mr")]) == 0
    ds = pydicom.dcmread(sorted((tmp_path / "dcm").iterdir())[0])
    assert ds.StudyInstanceUID == uids["study"] and ds.PatientID == "PAT-0042"
    assert ds.FrameOfReferenceUID != uids["frame"]
    assert "new Frame of Reference" in caplog.text


def test_like_copies_patient_study_and_frame(tmp_path, phantom_sct):
    shape = phantom_sct.shape
    uids = _fake_mr_series(tmp_path / "mr", n=shape[2], shape=shape,
                           geometry=slice_geometry(AFFINES["axial"], shape))
    nifti = _write_nifti(tmp_path, phantom_sct, AFFINES["axial"])
    assert export_dicom.main(["--sct", str(nifti), "--out", str(tmp_path / "dcm"),
                              "--like", str(tmp_path / "mr")]) == 0
    for path in sorted((tmp_path / "dcm").iterdir()):
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "PAT-0042"
        assert (ds.PatientBirthDate, ds.PatientSex) == ("19600102", "F")
        assert ds.StudyInstanceUID == uids["study"]
        assert ds.FrameOfReferenceUID == uids["frame"]
        assert (ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber) == (
            "20240305", "101500", "S17", "ACC99")
        assert ds.PatientPosition == "FFS"
        assert ds.SeriesInstanceUID != uids["series"] and ds.Modality == "CT"
    with pytest.raises(DataError, match="no DICOM file"):
        (tmp_path / "empty").mkdir()
        export_dicom_series(Volume(phantom_sct, AFFINES["axial"]), tmp_path / "o2",
                            like_dir=tmp_path / "empty")
    assert not (tmp_path / "o2").exists()


def _nothing_written(parent, out):
    return not out.exists() and not list(parent.glob(f".{out.name}.tmp-*"))


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys, phantom_sct):
    out = tmp_path / "dcm"
    assert export_dicom.main(["--sct", str(tmp_path / "missing.nii.gz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.nii.gz" in err and err.count("\n") == 1
    assert _nothing_written(tmp_path, out)

    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 2), np.int16), np.eye(4)), four_d)
    assert export_dicom.main(["--sct", str(four_d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "3D" in err and err.count("\n") == 1
    assert _nothing_written(tmp_path, out)

    nifti = _write_nifti(tmp_path, phantom_sct, AFFINES["axial"])
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_dicom.main(["--sct", str(nifti), "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".dcm.tmp-*"))

    sheared = AFFINES["axial"].copy()
    sheared[0, 1] = 0.3
    with pytest.raises(DataError, match="not orthogonal"):
        export_dicom_series(Volume(phantom_sct, sheared), tmp_path / "sheared")
    tilted = AFFINES["axial"].copy()
    tilted[1, 2] = 0.5
    with pytest.raises(DataError, match="not perpendicular"):
        export_dicom_series(Volume(phantom_sct, tilted), tmp_path / "tilted")
    assert _nothing_written(tmp_path, tmp_path / "sheared")
    assert _nothing_written(tmp_path, tmp_path / "tilted")

    # An empty existing folder is fine, and `python -m` runs the entry point.
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "sct_jax.cli.export_dicom", "--sct", str(nifti),
                           "--out", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "empty").iterdir())) == phantom_sct.shape[2]


def test_like_refuses_two_patients_or_two_series(tmp_path, phantom_sct, capsys):
    """--like stamps an identity: a folder of two patients (or two series, also in a
    subfolder) has none, and is refused before anything is written."""
    nifti = _write_nifti(tmp_path, phantom_sct, AFFINES["axial"])
    _fake_mr_series(tmp_path / "two_patients")
    _fake_mr_series(tmp_path / "two_patients", patient_id="PAT-0099", prefix="ZZ")
    _fake_mr_series(tmp_path / "two_series")
    _fake_mr_series(tmp_path / "two_series" / "sub", prefix="ZZ")  # same patient
    for like, fragment in (("two_patients", "2 patients (PatientID 'PAT-0042', 'PAT-0099')"),
                           ("two_series", "2 series (SeriesInstanceUID")):
        out = tmp_path / f"dcm_{like}"
        assert export_dicom.main(["--sct", str(nifti), "--out", str(out),
                                  "--like", str(tmp_path / like)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / like}: holds "), err
        assert fragment in err, err
        assert _nothing_written(tmp_path, out)


def test_the_mr_reader_refuses_two_patients(tmp_path):
    from sct_jax.inference.inputs import load_dicom_series
    shape = (6, 5, 2)
    geometry = slice_geometry(AFFINES["axial"], shape)
    _fake_mr_series(tmp_path / "mr", n=2, geometry=geometry, shape=shape, pixels=True)
    assert load_dicom_series(tmp_path / "mr").shape == shape
    (tmp_path / "mr" / "MR1.dcm").unlink()
    _fake_mr_series(tmp_path / "other", n=2, geometry=geometry, shape=shape, pixels=True,
                    patient_id="PAT-0099")
    (tmp_path / "other" / "MR1.dcm").rename(tmp_path / "mr" / "MR1.dcm")
    with pytest.raises(DataError, match="2 patients"):
        load_dicom_series(tmp_path / "mr")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--series-number", "99999999999999", "0 to 2147483647"),  # 14 characters
    ("--series-number", "2147483648", "0 to 2147483647"),  # beyond a signed 32-bit IS
    ("--series-number", "-1", "0 to 2147483647"),
    ("--series-number", "9.5", "not a whole number"),
    ("--source", "x" * 47, "at most 46 characters"),  # SeriesDescription: LO, 64
    ("--source", "MR\\T1", "backslash"),  # the value separator of a DICOM string
    ("--source", "MR\tT1", "printable ASCII"),
    ("--source", "MR Universit\u00e4t", "printable ASCII"),  # --like may bring Latin-1
])
def test_dicom_values_are_checked_at_flag_parsing(tmp_path, capsys, flag, value, fragment):
    out = tmp_path / "dcm"
    with pytest.raises(SystemExit) as info:
        export_dicom.main(["--sct", str(tmp_path / "never_read.nii.gz"), "--out", str(out),
                           flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"argument {flag}: " in err
    assert fragment in err, err
    assert not out.exists()


def test_dicom_values_at_their_limits_are_written_whole(tmp_path, phantom_sct):
    nifti = _write_nifti(tmp_path, phantom_sct, AFFINES["axial"])
    source = "MR T1 (pix2pix), site A; " + "x" * 21  # 46 characters
    assert export_dicom.main(["--sct", str(nifti), "--out", str(tmp_path / "dcm"),
                              "--series-number", "2147483647", "--source", source]) == 0
    ds = pydicom.dcmread(sorted((tmp_path / "dcm").iterdir())[0])
    assert ds.SeriesNumber == 2147483647 and ds.SeriesDescription == f"SYNTHETIC CT from {source}"
    assert len(ds.SeriesDescription) == 64
    with pytest.raises(ConfigError, match="series_number=99999999999999"):
        export_dicom_series(Volume(phantom_sct, AFFINES["axial"]), tmp_path / "o",
                            series_number=99999999999999)
