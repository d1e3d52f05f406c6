"""Water-equivalent path length: analytic boxes and slabs, orientation, the body mask."""

import numpy as np
import pytest

from sct_jax.dose import wepl
from sct_jax.errors import DataError

SPACING = 3.0
SHAPE = (40, 40, 12)
AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])


def water_box():
    """Water (0 HU) in voxels 5..34 along X and Y: its edges lie at index 4.5 and 34.5
    (between the last water and the first air voxel, where linear interpolation puts them)."""
    ct = np.full(SHAPE, -1000.0, np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[5:35, 5:35, :] = True
    ct[mask] = 0.0
    return ct, mask


def test_rsp_table_nodes_and_water():
    assert wepl.hu_to_rsp(np.array([0.0]))[0] == pytest.approx(1.0)
    for hu, rsp in wepl.HU_TO_RSP:
        assert wepl.hu_to_rsp(np.array([hu]))[0] == pytest.approx(rsp, rel=1e-6)
    assert wepl.hu_to_rsp(np.array([-5000.0, 9000.0])).tolist() == pytest.approx(
        [wepl.HU_TO_RSP[0, 1], wepl.HU_TO_RSP[-1, 1]])
    with pytest.raises(DataError, match="increasing HU"):
        wepl.hu_to_rsp(np.zeros(3), table=np.array([[0.0, 1.0], [-10.0, 0.9]]))


def test_water_box_path_is_the_geometric_distance():
    ct, mask = water_box()
    centre_index = np.array([19.5, 19.5, 5.5])
    target = wepl.sphere_target(centre_index * SPACING, 9.0)
    rsp = wepl.rsp_volume(ct, mask)
    for angle in wepl.DEFAULT_ANGLES:
        to_centre, to_distal = wepl.wepl_to_target(rsp, AFFINE, target, angle)
        assert to_centre == pytest.approx(15 * SPACING, abs=0.05)  # 34.5 - 19.5 voxels
        assert to_distal == pytest.approx(15 * SPACING + 9.0, abs=0.05)


def test_a_bone_slab_shifts_wepl_by_stopping_power_times_thickness():
    ct, mask = water_box()
    sct = ct.copy()
    sct[:, 26:33, :] = np.where(mask[:, 26:33, :], 500.0, -1000.0)  # 7 voxels, anterior
    sct[6:11, 5:26, :] = 1500.0  # 5 voxels on the patient's left (RAS+: low X)
    thickness = 7 * SPACING
    extra = (wepl.hu_to_rsp(np.array([500.0]))[0] - 1.0) * thickness
    extra_left = (wepl.HU_TO_RSP[-2, 1] - 1.0) * 5 * SPACING
    target = wepl.sphere_target(np.array([19.5, 19.5, 5.5]) * SPACING, 9.0)
    result = wepl.wepl_differences(ct, sct, mask, AFFINE, target=target)
    angles = result["angles"]
    assert angles[0.0]["diff_center"] == pytest.approx(extra, abs=0.1)  # from anterior
    assert angles[90.0]["diff_center"] == pytest.approx(extra_left, abs=0.1)  # from left
    for angle in (180.0, 270.0):  # rays that miss the slabs before the centre
        assert abs(angles[angle]["diff_center"]) < 1e-6
    assert extra > 5.0  # the slab matters: 5.5 mm of proton range
    assert result["max_abs_diff_distal"] == pytest.approx(extra_left, abs=0.1)


def test_world_orientation_not_array_order_decides_the_beam():
    """The same patient stored with Y reversed (affine flipped) gives the same WEPLs."""
    ct, mask = water_box()
    sct = ct.copy()
    sct[:, 26:33, :] = np.where(mask[:, 26:33, :], 500.0, -1000.0)
    target = wepl.sphere_target(np.array([19.5, 19.5, 5.5]) * SPACING, 9.0)
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = SHAPE[1] - 1  # index j' = 39 - j
    flipped_affine = AFFINE @ flip
    a = wepl.wepl_differences(ct, sct, mask, AFFINE, target=target)
    b = wepl.wepl_differences(ct[:, ::-1], sct[:, ::-1], mask[:, ::-1], flipped_affine,
                              target=target)
    for angle in wepl.DEFAULT_ANGLES:
        assert b["angles"][angle]["diff_center"] == pytest.approx(
            a["angles"][angle]["diff_center"], abs=1e-6)


def test_outside_the_body_counts_as_air_in_both():
    ct, mask = water_box()
    sct = ct.copy()
    sct[~mask] = 2000.0  # a couch, a mask, noise: not the patient
    result = wepl.wepl_differences(ct, sct, mask, AFFINE)
    assert result["max_abs_diff_distal"] < 1e-6
    assert "sphere of radius 25 mm" in result["target"]


def test_mask_target_distal_edge_and_centre():
    ct, mask = water_box()
    grid = np.indices(SHAPE).astype(np.float64)
    centre = np.array([19.0, 22.0, 6.0])
    target = (((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= 4 ** 2)
    t = wepl.mask_target(target, AFFINE)
    np.testing.assert_allclose(t.center_mm, centre * SPACING, atol=1e-6)
    for angle in wepl.DEFAULT_ANGLES:  # the far face of the last voxel: 4.5 voxels away
        assert t.distal_mm[angle] == pytest.approx(4.5 * SPACING, abs=0.5 + 1e-9)
    with pytest.raises(DataError, match="empty target"):
        wepl.mask_target(np.zeros(SHAPE, bool), AFFINE)
