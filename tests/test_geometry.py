"""Bringing an MR onto the training grid and back: orientation, spacing, the record."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sct_jax.config_utils import base_config
from sct_jax.data.io import Volume, load_volume
from sct_jax.errors import DataError
from sct_jax.data import geometry as recorded
from sct_jax.inference import geometry
from sct_jax.inference import predict as predict_lib

FIXTURE_MR = Path(__file__).parent / "fixtures" / "porcine" / "porcine01" / "mr.nii.gz"
RAS = recorded.TrainingGeometry(("R", "A", "S"), (1.0, 1.0, 2.5), "pelvis", 16)


def permuted_and_flipped(volume: Volume) -> Volume:
    """The same image stored as (Z, X, Y) with the stored X axis reversed; the affine
    follows, so every voxel keeps its world position."""
    data = np.flip(volume.data.transpose(2, 0, 1), axis=1)
    # new index (k, i', j) -> old index (i, j, k) with i = X - 1 - i'.
    n_x = volume.shape[0]
    new_to_old = np.array([[0, -1, 0, n_x - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
                          float)
    return Volume(np.ascontiguousarray(data), volume.affine @ new_to_old, None)


def test_permuted_and_flipped_axes_reach_the_same_model_grid():
    mr = load_volume(FIXTURE_MR)
    other = permuted_and_flipped(mr)
    assert nib.aff2axcodes(other.affine) != nib.aff2axcodes(mr.affine)
    # The stored voxel [a, b, c] of `other` sits where the original's does (world check).
    np.testing.assert_allclose(other.affine @ [3, 5, 7, 1],
                               mr.affine @ [mr.shape[0] - 1 - 5, 7, 3, 1])
    grid_a = geometry.to_model_grid(mr.affine, mr.shape, RAS)
    grid_b = geometry.to_model_grid(other.affine, other.shape, RAS)
    assert grid_a.reoriented and grid_b.reoriented and not grid_a.resampled
    model_a, model_b = grid_a.to_grid(mr.data), grid_b.to_grid(other.data)
    np.testing.assert_array_equal(model_a, model_b)
    # nibabel's own reorientation of the original gives the same array, in RAS.
    img = nib.Nifti1Image(mr.data, mr.affine)
    ras = img.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(mr.affine), nib.orientations.axcodes2ornt("RAS")))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(model_a, np.asarray(ras.dataobj))
    # Back onto each input grid exactly.
    np.testing.assert_array_equal(grid_b.to_input(model_b), other.data)
    np.testing.assert_array_equal(grid_a.to_input(model_a), mr.data)


def test_predict_mr_is_independent_of_the_stored_axis_order():
    """A stand-in model that is not orientation-equivariant (cumulative sum along the
    first model axis): the sCT of the permuted MR is the permuted sCT of the MR."""
    mr = load_volume(FIXTURE_MR)
    other = permuted_and_flipped(mr)

    def directional(unit):
        return np.tanh(np.cumsum(unit, axis=0) / 10.0)

    config = base_config()  # only the input's normalisation (MR percentiles) is read
    sct = predict_lib.predict_mr(directional, config, mr, None, RAS)
    sct_other = predict_lib.predict_mr(directional, config, other, None, RAS)
    expected = np.flip(sct.transpose(2, 0, 1), axis=1)
    np.testing.assert_allclose(sct_other, expected, rtol=0, atol=1e-3)  # HU, float32
    assert sct.shape == mr.shape and np.ptp(sct) > 100


def test_resampling_plans_the_training_spacing_and_keeps_the_extent():
    mr = load_volume(FIXTURE_MR)
    fine = mr.affine.copy()
    fine[:3, :3] *= 0.7
    grid = geometry.to_model_grid(fine, (91, 91, 17), RAS)
    assert grid.resampled
    # 91 voxels of 0.7 mm span 63.7 mm -> 64 voxels of ~1 mm; 17 x 1.75 -> 12 x 2.5.
    assert grid.model_shape == (64, 64, 12)
    np.testing.assert_allclose(grid.model_spacing, (63.7 / 64, 63.7 / 64, 29.75 / 12))
    # A linear ramp along an axis survives the round trip inside the volume (linear
    # interpolation is exact on linear functions; the edges clamp).
    ramp = np.broadcast_to(np.arange(91, dtype=np.float32)[:, None, None] * 3.0,
                           (91, 91, 17))
    model = grid.to_grid(ramp)
    # L -> R reverses the first axis: the ramp descends on the model grid.
    np.testing.assert_allclose(np.diff(model[2:-2, 0, 0]), -3.0 * 91 / 64, rtol=1e-4)
    back = grid.to_input(model)
    assert back.shape == (91, 91, 17)
    np.testing.assert_allclose(back[3:-3], ramp[3:-3], atol=1e-3)
    # Within the tolerance nothing is resampled.
    near = mr.affine.copy()
    near[:3, :3] *= 1.0 + geometry.SPACING_TOLERANCE / 2
    assert not geometry.to_model_grid(near, mr.shape, RAS).resampled


def test_geometry_record_round_trip_and_errors(tmp_path):
    recorded.save(RAS, tmp_path)
    assert recorded.load(tmp_path) == RAS
    assert recorded.load(tmp_path / "nothing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / recorded.GEOMETRY_FILE).write_text("{}")
    with pytest.raises(DataError, match="geometry.json"):
        recorded.load(tmp_path / "bad")
    mixed = recorded.from_mr_files([FIXTURE_MR] * 3, region="pelvis")
    assert mixed.axcodes == ("L", "P", "S") and mixed.spacing == (1.0, 1.0, 2.5)
    assert mixed.cases == 3


@pytest.mark.parametrize("degrees", [0.0, 12.5, 30.0, 44.0])
def test_oblique_angle_is_the_rotation_from_the_nearest_axes(degrees):
    """A slab tilted about Z by ``degrees``, stored in any axis order: the model grid
    names the tilt (it is reoriented by the nearest axes, not resliced)."""
    t = np.radians(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    affine = rotation @ np.diag([0.8, 0.8, 3.0, 1.0])
    mr = Volume(np.zeros((8, 6, 4), np.float32), affine, None)
    for volume in (mr, permuted_and_flipped(mr)):
        grid = geometry.to_model_grid(volume.affine, volume.shape, RAS)
        assert grid.oblique_degrees == pytest.approx(degrees, abs=1e-6)
        assert grid.oblique == (degrees > geometry.OBLIQUE_TOLERANCE_DEG)
        assert grid.oriented_shape == (8, 6, 4)
