"""The bone in 3D: marching-cubes surfaces of CT/sCT bone in mm and their PNG."""

import struct

import numpy as np
import pytest

from sct_jax.evaluation import bone3d

pytest.importorskip("skimage")


def _ball(shape, spacing, radius_mm, centre_mm=None):
    """A CT whose HU fall linearly through 250 at ``radius_mm`` from the centre (in mm),
    so the 250 HU surface is a sphere of that radius; soft tissue far from it."""
    spacing = np.asarray(spacing, np.float64)
    coords = [np.arange(n) * s for n, s in zip(shape, spacing)]
    centre = ((np.asarray(shape) - 1) * spacing / 2 if centre_mm is None
              else np.asarray(centre_mm, np.float64))
    grid = np.meshgrid(*coords, indexing="ij")
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    return np.clip(250.0 + 100.0 * (radius_mm - dist), 40.0, 1200.0).astype(np.float32)


def _area(verts, faces):
    tri = verts[faces].astype(np.float64)
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]),
                                axis=1).sum()


def _closed(faces):
    """Every edge is shared by exactly two triangles: a watertight surface."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return bool(np.all(counts == 2))


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 1.5, 2.0)])
def test_sphere_mesh_is_in_mm(spacing):
    """The mesh of a ball is a sphere of its radius, in mm, wherever the spacing."""
    radius = 8.0 * min(spacing)  # inside the 24 voxels along the finest axis
    ct = _ball((24, 24, 24), spacing, radius)
    mask = np.ones(ct.shape, bool)
    verts, faces = bone3d.bone_surface(ct, mask, spacing)
    centre = (np.array(ct.shape) - 1) * np.asarray(spacing) / 2
    dist = np.linalg.norm(verts - centre, axis=1)
    # Marching cubes interpolates linearly along voxel edges: the vertices lie on the
    # sphere up to a fraction of a voxel.
    assert np.all(np.abs(dist - radius) < 0.15 * max(spacing)), (dist.min(), dist.max())
    np.testing.assert_allclose(verts.min(axis=0), centre - radius, atol=0.2 * max(spacing))
    np.testing.assert_allclose(verts.max(axis=0), centre + radius, atol=0.2 * max(spacing))
    assert _area(verts, faces) == pytest.approx(4 * np.pi * radius**2, rel=0.03)
    assert faces.min() >= 0 and faces.max() < len(verts) and _closed(faces)


def test_cube_extent_doubles_with_spacing_and_mask_cuts_bone():
    """A bone cube's mesh spans the cube's voxel centres in mm; bone outside the body
    mask is not bone, even touching the body's."""
    ct = np.full((24, 24, 24), 40.0, np.float32)
    ct[4:20, 6:18, 8:20] = 1000.0
    mask = np.zeros(ct.shape, bool)
    mask[:12] = True  # the body ends through the cube: x >= 12 is outside
    # The 250 HU level lies 0.75 of the way from a bone voxel (1000 HU) to a soft-tissue
    # one (40 HU), and 0.37 of the way to a voxel outside the body (-1024 HU).
    below = (1000.0 - 250.0) / (1000.0 - 40.0)
    outside = (1000.0 - 250.0) / (1000.0 + 1024.0)
    extents = []
    for spacing in ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)):
        verts, faces = bone3d.bone_surface(ct, mask, spacing)
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        s = np.asarray(spacing)
        np.testing.assert_allclose(lo, (np.array([4, 6, 8]) - below) * s, atol=1e-3 * s.max())
        np.testing.assert_allclose(hi, (np.array([11 + outside, 17 + below, 19 + below])) * s,
                                   atol=1e-3 * s.max())
        assert _closed(faces)
        extents.append(hi - lo)
    np.testing.assert_allclose(extents[1], 2 * extents[0], rtol=1e-5)


def test_large_volume_is_pooled_to_bounded_faces():
    """A volume past the grid bound is max-pooled: the faces stay under the bound, the
    surface stays closed and in mm, and one-voxel-thin bone survives along every axis
    (a strided subsample would step over each of these)."""
    spacing = (1.0, 1.0, 2.5)
    ct = np.full((160, 40, 12), 40.0, np.float32)
    ct[20:141, 22, 6] = 1500.0  # a rod along X, one voxel in Y and Z
    ct[81, 5:35, 2:10] = 1500.0  # a plate one voxel thin in X
    mask = np.ones(ct.shape, bool)
    # The box is 122 x 32 x 10 voxels: pooled by (4, 4, 2) to fit 32 voxels.
    verts, faces = bone3d.bone_surface(ct, mask, spacing, max_grid=32)
    assert len(faces) and _closed(faces)
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    assert hi[0] - lo[0] > 115.0  # the rod, its whole length
    assert hi[1] - lo[1] > 25.0 and hi[2] - lo[2] > 15.0  # the plate
    # Within a pooled voxel (4 x 4 x 5 mm) of the bone, inside the volume's mm.
    np.testing.assert_array_less(np.array([20.0, 5.0, 5.0]) - [4, 4, 5], lo)
    np.testing.assert_array_less(hi, np.array([140.0, 34.0, 22.5]) + [4, 4, 5])
    # Fewer faces allowed: a coarser grid, still closed (not triangles dropped).
    ct[10:150, 5:35, 3:9] = 800.0
    verts, faces = bone3d.bone_surface(ct, mask, spacing, max_faces=300, max_grid=32)
    assert 0 < len(faces) <= 300 and _closed(faces)
    assert verts[:, 0].max() - verts[:, 0].min() > 130.0


def test_pooled_ball_stays_centred():
    """Pooled voxels sit at the centre of the voxels they pool: the mesh of a pooled
    ball is centred on the ball, in mm."""
    shape, spacing = (80, 60, 30), (1.0, 1.0, 2.5)
    ct = _ball(shape, spacing, 22.0)
    verts, faces = bone3d.bone_surface(ct, np.ones(shape, bool), spacing, max_grid=20)
    centre = (np.array(shape) - 1) * np.asarray(spacing) / 2
    np.testing.assert_allclose((verts.min(axis=0) + verts.max(axis=0)) / 2, centre, atol=0.1)
    # Pooled by 2 or more per axis: the radius grows by no more than a pooled voxel.
    dist = np.linalg.norm(verts - centre, axis=1)
    assert np.all(dist > 22.0 - 0.5) and np.all(dist < 22.0 + 5.0) and _closed(faces)


def test_empty_bone_is_an_empty_mesh_and_a_png_still(tmp_path):
    ct = _ball((24, 24, 24), (1.0, 1.0, 1.0), 6.0)
    mask = np.ones(ct.shape, bool)
    soft = np.full(ct.shape, 40.0, np.float32)
    for vol, m in ((soft, mask), (ct, np.zeros(ct.shape, bool))):  # no HU / no body
        verts, faces = bone3d.bone_surface(vol, m, (1.0, 1.0, 1.0))
        assert verts.shape == (0, 3) and faces.shape == (0, 3)
    path = bone3d.save_bone3d(tmp_path / "case" / "bone3d.png", ct, soft, mask,
                              spacing=(1.0, 1.0, 2.0), title="1PA001")
    assert path == tmp_path / "case" / "bone3d.png"
    assert _png_size(path) == (800, 400)
    assert [p.name for p in path.parent.iterdir()] == ["bone3d.png"]  # no temporary left


def _bone_pixels(path):
    """Pixels of the bone's tint (shaded bone keeps r >= g > b; grey panes and the red
    caption do not)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(path)[..., :3]
    return (rgb[..., 1] - rgb[..., 2] > 0.04) & (rgb[..., 0] >= rgb[..., 1])


def test_png_draws_both_sides(tmp_path):
    """CT left, sCT right: a side without bone has no bone pixel, the other has many."""
    ct = _ball((24, 24, 24), (1.0, 1.0, 1.0), 8.0)
    mask = np.ones(ct.shape, bool)
    soft = np.full(ct.shape, 40.0, np.float32)
    bone = _bone_pixels(bone3d.save_bone3d(tmp_path / "a.png", ct, soft, mask))
    assert bone[:, :400].sum() > 5000 and bone[:, 400:].sum() == 0
    bone = _bone_pixels(bone3d.save_bone3d(tmp_path / "b.png", soft, ct, mask))
    assert bone[:, :400].sum() == 0 and bone[:, 400:].sum() > 5000
    # The same axis limits on both sides: a ball of half the radius covers about a
    # quarter of the pixels (each side scaled to its own mesh, it would fill as many).
    small = _ball((24, 24, 24), (1.0, 1.0, 1.0), 4.0)
    bone = _bone_pixels(bone3d.save_bone3d(tmp_path / "c.png", ct, small, mask))
    assert 0.15 < bone[:, 400:].sum() / bone[:, :400].sum() < 0.35
