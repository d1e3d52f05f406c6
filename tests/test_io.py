"""Tests of sct_jax.data.io: round trips keep data and geometry, saves are atomic, and
every kind of bad input is one DataError naming the file.

The references are the file libraries themselves (nibabel's header, SimpleITK's
origin/spacing/direction and its own index -> physical point mapping), never the
functions under test.
"""

import gzip
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from sct_jax.data import io
from sct_jax.errors import DataError

SHAPE = (24, 20, 8)
SPACING = (0.9, 1.1, 2.5)
ORIGIN = (-12.5, 30.25, -80.0)


def _rotation(angles):
    """A proper rotation from three angles (rad), so the affine is oblique."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(rotation=np.eye(3)):
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN
    return affine


@pytest.fixture(scope="module")
def volume_data():
    return np.random.default_rng(0).normal(50, 300, SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def oblique_affine():
    return _affine(_rotation((0.1, -0.2, 0.3)))


def _single_line_error_naming(path, call):
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_data_affine_spacing_and_header(tmp_path, volume_data,
                                                               oblique_affine, suffix):
    source = nib.Nifti1Image(volume_data, oblique_affine)
    source.header["descrip"] = b"sct_jax test"
    source.header.set_xyzt_units("mm", "sec")
    path = io.save_volume(tmp_path / f"v{suffix}", volume_data, oblique_affine,
                          header=source.header)
    assert path == tmp_path / f"v{suffix}"
    if suffix == ".nii.gz":
        with gzip.open(path) as f:  # really compressed, not a plain file with that name
            assert len(f.read(348)) == 348

    vol = io.load_volume(path)
    np.testing.assert_array_equal(vol.data, volume_data)
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.affine, oblique_affine, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, SPACING, rtol=1e-6)
    # Independent view through nibabel's header.
    ref = nib.load(path)
    np.testing.assert_allclose(ref.header["pixdim"][1:4], SPACING, rtol=1e-6)
    assert ref.header["descrip"].tobytes().rstrip(b"\0") == b"sct_jax test"
    assert ref.header.get_xyzt_units() == ("mm", "sec")
    # On the reference's own grid its qform/sform codes are kept (an sCT keeps its MR's).
    assert int(ref.header["qform_code"]) == int(source.header["qform_code"])
    assert int(ref.header["sform_code"]) == int(source.header["sform_code"]) != 0
    np.testing.assert_allclose(ref.get_sform(), oblique_affine, atol=1e-5)
    np.testing.assert_allclose(ref.get_qform(), oblique_affine, atol=1e-5)


def test_nifti_int16_with_copied_scaled_header_keeps_raw_values(tmp_path):
    """A header copied from a scaled image must not rescale the written values again."""
    hu = np.random.default_rng(1).integers(-1024, 3000, SHAPE).astype(np.int16)
    scaled = nib.Nifti1Image(hu, _affine())
    scaled.header.set_slope_inter(2.0, -5.0)
    io.save_volume(tmp_path / "ct.nii.gz", hu, _affine(), header=scaled.header)
    ref = nib.load(tmp_path / "ct.nii.gz")
    assert ref.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(ref.dataobj), hu)
    np.testing.assert_array_equal(io.load_volume(tmp_path / "ct.nii.gz").data, hu)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_bool_and_int64_arrays_are_saved(tmp_path, suffix):
    mask = np.zeros(SHAPE, bool)
    mask[3:9, 2:5, 1:4] = True
    io.save_volume(tmp_path / f"mask{suffix}", mask, _affine())
    np.testing.assert_array_equal(io.load_volume(tmp_path / f"mask{suffix}").data, mask)
    if suffix == ".nii.gz":
        assert nib.load(tmp_path / f"mask{suffix}").get_data_dtype() == np.uint8
    labels = np.arange(np.prod(SHAPE), dtype=np.int64).reshape(SHAPE)
    io.save_volume(tmp_path / f"labels{suffix}", labels, _affine())
    np.testing.assert_array_equal(io.load_volume(tmp_path / f"labels{suffix}").data, labels)


def test_save_like_and_with_data_keep_the_reference_grid(tmp_path, volume_data,
                                                         oblique_affine):
    ref = io.Volume(volume_data, oblique_affine, None)
    out = io.save_like(tmp_path / "sct.nii.gz", volume_data * 2, ref)
    np.testing.assert_allclose(io.load_volume(out).affine, oblique_affine, atol=1e-5)
    _single_line_error_naming(tmp_path / "bad.nii.gz", lambda: io.save_like(
        tmp_path / "bad.nii.gz", volume_data[:, :, :4], ref))
    assert not (tmp_path / "bad.nii.gz").exists()
    moved = ref.with_data(volume_data + 1)
    moved.affine[0, 3] += 1  # a copy: the reference must not change
    assert ref.affine[0, 3] == oblique_affine[0, 3]
    with pytest.raises(ValueError):
        ref.with_data(volume_data[:4])


def test_singleton_fourth_axis_is_dropped(tmp_path, volume_data):
    nib.save(nib.Nifti1Image(volume_data[..., None], _affine()), tmp_path / "v4.nii.gz")
    vol = io.load_volume(tmp_path / "v4.nii.gz")
    assert vol.shape == SHAPE
    np.testing.assert_array_equal(vol.data, volume_data)


# ------------------------------------------------------------------------- MetaImage


def test_mha_round_trip_geometry_matches_simpleitk_lps(tmp_path, volume_data,
                                                       oblique_affine):
    sitk = pytest.importorskip("SimpleITK")
    path = io.save_volume(tmp_path / "v.mha", volume_data, oblique_affine)
    img = sitk.ReadImage(str(path))
    # SimpleITK works in LPS: x and y of every world vector change sign.
    flip = np.diag([-1.0, -1.0, 1.0])
    rotation = oblique_affine[:3, :3] / np.asarray(SPACING)[None, :]
    np.testing.assert_allclose(img.GetOrigin(), flip @ np.asarray(ORIGIN), atol=1e-6)
    np.testing.assert_allclose(img.GetSpacing(), SPACING, rtol=1e-6)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), flip @ rotation,
                               atol=1e-6)
    # SimpleITK's array is (Z, Y, X).
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), volume_data.transpose(2, 1, 0))

    vol = io.load_volume(path)
    np.testing.assert_array_equal(vol.data, volume_data)
    np.testing.assert_allclose(vol.affine, oblique_affine, atol=1e-6)


def test_mha_written_by_simpleitk_loads_with_its_world_coordinates(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    zyx = np.random.default_rng(2).normal(size=SHAPE[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing((1.5, 0.8, 3.0))
    img.SetOrigin((10.0, -20.0, 5.0))
    img.SetDirection(tuple(_rotation((0.2, 0.1, -0.4)).ravel()))
    sitk.WriteImage(img, str(tmp_path / "s.mha"))

    vol = io.load_volume(tmp_path / "s.mha")
    assert vol.shape == SHAPE
    np.testing.assert_array_equal(vol.data, zyx.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.spacing, (1.5, 0.8, 3.0), rtol=1e-6)
    for index in [(0, 0, 0), (23, 0, 0), (3, 17, 5), (23, 19, 7)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(index))
        ras = (vol.affine @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-6)


# ---------------------------------------------------------------------- atomic saves


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_saved_files_are_world_readable(tmp_path, volume_data, suffix):
    path = io.save_volume(tmp_path / f"v{suffix}", volume_data, _affine())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    text = io.atomic_write_text(tmp_path / "m.json", "{}")
    assert stat.S_IMODE(os.stat(text).st_mode) == 0o644
    assert text.read_text() == "{}"


def test_failed_save_leaves_no_temporary_and_no_target(tmp_path, volume_data, monkeypatch):
    def half_write_then_crash(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", half_write_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_volume(tmp_path / "out" / "sct.nii.gz", volume_data, _affine())
    assert list((tmp_path / "out").iterdir()) == []


def test_failed_save_keeps_the_previous_target(tmp_path, volume_data, monkeypatch):
    target = io.save_volume(tmp_path / "sct.nii.gz", volume_data, _affine())
    before = target.read_bytes()

    def crash(img, filename):
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_volume(target, volume_data + 1, _affine())
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sct.nii.gz"]


def test_failed_text_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        io.atomic_write_text(tmp_path / "r.csv", None)  # not a str: write() fails
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["v.png", "v.mhd", "v"])
def test_unsupported_output_type(tmp_path, volume_data, name):
    _single_line_error_naming(tmp_path / name, lambda: io.save_volume(
        tmp_path / name, volume_data, _affine()))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, volume_data):
    """name -> path of each kind of broken input."""
    folder = tmp_path_factory.mktemp("bad")
    files = {}
    for suffix in (".nii.gz", ".nii"):
        good = io.save_volume(folder / f"good{suffix}", volume_data, _affine())
        raw = good.read_bytes()
        files[f"truncated{suffix}"] = folder / f"truncated{suffix}"
        files[f"truncated{suffix}"].write_bytes(raw[:len(raw) // 2])
        files[f"garbage{suffix}"] = folder / f"garbage{suffix}"
        files[f"garbage{suffix}"].write_bytes(np.random.default_rng(3).bytes(2000))
    raw = bytearray((folder / "good.nii").read_bytes())
    raw[70:72] = np.int16(12345).tobytes()  # datatype code nibabel does not know
    files["bad_datatype.nii"] = folder / "bad_datatype.nii"
    files["bad_datatype.nii"].write_bytes(bytes(raw))
    files["garbage.mha"] = folder / "garbage.mha"
    files["garbage.mha"].write_bytes(b"ObjectType = Image\nNDims = 3\n" + bytes(100))
    files["empty.nii.gz"] = folder / "empty.nii.gz"
    files["empty.nii.gz"].write_bytes(b"")
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 2), np.float32), _affine()),
             folder / "four_d.nii.gz")
    files["four_d.nii.gz"] = folder / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5), np.float32), np.eye(4)), folder / "two_d.nii")
    files["two_d.nii"] = folder / "two_d.nii"
    with_nan = volume_data.copy()
    with_nan[3, 4, 5] = np.nan
    with_nan[0, 0, 0] = np.inf
    files["nan.nii.gz"] = io.save_volume(folder / "nan.nii.gz", with_nan, _affine())
    files["unsupported.png"] = folder / "unsupported.png"
    files["unsupported.png"].write_bytes(b"\x89PNG")
    files["missing.nii.gz"] = folder / "missing.nii.gz"
    files["a_folder.nii.gz"] = folder / "a_folder.nii.gz"
    files["a_folder.nii.gz"].mkdir()
    try:
        import SimpleITK as sitk
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)),
                        str(folder / "two_d.mha"))
        files["two_d.mha"] = folder / "two_d.mha"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32),
                                               isVector=True), str(folder / "vector.mha"))
        files["vector.mha"] = folder / "vector.mha"
    except ImportError:
        pass
    return files


@pytest.mark.parametrize("name, problem", [
    ("missing.nii.gz", "not found"),
    ("a_folder.nii.gz", "not a file"),
    ("truncated.nii.gz", "truncated"),
    ("truncated.nii", "truncated"),
    ("garbage.nii.gz", "unreadable"),
    ("garbage.nii", "unreadable"),
    ("bad_datatype.nii", "unreadable"),
    ("empty.nii.gz", "unreadable"),
    ("garbage.mha", "unreadable"),
    ("four_d.nii.gz", "3D"),
    ("two_d.nii", "3D"),
    ("two_d.mha", "3D"),
    ("vector.mha", "3D"),
    ("nan.nii.gz", "2 non-finite"),
    ("unsupported.png", "unsupported"),
])
def test_bad_input_is_one_data_error_naming_the_file(bad_files, name, problem):
    if name not in bad_files:
        pytest.skip("SimpleITK not installed")
    path = bad_files[name]
    message = _single_line_error_naming(path, lambda: io.load_volume(path))
    assert problem in message


def test_non_finite_check_can_be_turned_off(bad_files):
    vol = io.load_volume(bad_files["nan.nii.gz"], check_finite=False)
    assert np.isnan(vol.data[3, 4, 5]) and np.isinf(vol.data[0, 0, 0])



# ------------------------------------------- affine, decompression bombs, stale temps


@pytest.mark.parametrize("affine, problem", [
    (np.zeros((4, 4)), "zero voxel size"),
    (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN or Inf"),
    (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]), "singular"),
])
def test_unusable_affine_is_one_data_error(affine, problem):
    with pytest.raises(DataError, match=problem) as info:
        io.check_affine("mr.nii.gz", affine)
    assert str(info.value).startswith("mr.nii.gz: ") and "\n" not in str(info.value)
    io.check_affine("mr.nii.gz", _affine())  # oblique, anisotropic: fine


def test_compressible_beyond_the_bomb_ratio_is_refused_before_reading(tmp_path):
    """Declared > 256 MiB at > 100x the file size: refused, saying what is declared;
    the same declared size in a file that could hold it is not a bomb."""
    path = tmp_path / "z.nii.gz"
    path.write_bytes(b"x" * 100_000)
    declared = (448, 448, 400)  # float32: 306 MiB, 3211x the file
    with pytest.raises(DataError, match=r"declares 448 x 448 x 400 voxels = 306 MiB "
                                        r"uncompressed from a 98 KiB file \(3211x"):
        io.check_declared_size(path, declared, 4, 352, compressed=True)
    path.write_bytes(b"x" * 4_000_000)  # 80x: a plausible (if very smooth) volume
    io.check_declared_size(path, declared, 4, 352, compressed=True)
    small = (256, 256, 256)  # 64 MiB declared at 671x: below the floor, allowed
    path.write_bytes(b"x" * 100_000)
    io.check_declared_size(path, small, 4, 352, compressed=True)


def test_default_voxel_cap_is_a_clinical_volume():
    assert io.DEFAULT_MAX_VOXELS == 2**27 >= 512 * 512 * 400


def test_atomic_temp_names_the_output_and_only_its_leftovers_are_removed(tmp_path):
    out = tmp_path / "sct.nii.gz"
    with io.atomic_path(out, suffix=".nii.gz") as tmp:
        assert tmp.name.startswith(".tmp-sct.nii.gz.") and tmp.name.endswith(".nii.gz")
        assert [p.name for p in io.stale_temps(out, ".nii.gz")] == [tmp.name]
        tmp.write_bytes(b"x")
    assert out.read_bytes() == b"x" and io.stale_temps(out, ".nii.gz") == []
    stale = tmp_path / ".tmp-sct.nii.gz.k3j_9zq0.nii.gz"
    others = [tmp_path / ".tmp-sct.nii.gz.k3j_9zq0.nii", tmp_path / ".tmp-xsct.nii.gz.k3j_9zq0"
              ".nii.gz", tmp_path / ".tmp-sct.nii.gz.K3J_9ZQ0.nii.gz", tmp_path / "sct.nii.gz.bak"]
    for path in [stale, *others]:
        path.write_bytes(b"half")
    assert io.remove_stale_temps(out, ".nii.gz") == [stale]
    assert not stale.exists() and all(p.exists() for p in others)
