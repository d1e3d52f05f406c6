"""The bone in 3D: the surface of CT and sCT bone, side by side, as one small PNG.

Bone is what the metrics call bone (:mod:`sct_jax.metrics.geometry`): ``> 250 HU``
inside the body mask. :func:`bone_surface` meshes it with scikit-image's marching cubes
at the 250 HU level of the CT's own values (so the surface sits between voxels where
the HU cross 250, not on the voxel staircase), in mm. :func:`save_bone3d` draws the CT's
and the sCT's surfaces with matplotlib from one view, on the same axes.

Cost is bounded whatever the volume: the bone's bounding box is max-pooled to at most
:data:`MAX_GRID` voxels along its longest side (max pooling keeps a thin cortex that a
strided subsample would drop), one slab at a time, and coarsened further until the mesh
has at most ``max_faces`` triangles, since matplotlib draws every triangle itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from skimage.measure import marching_cubes

from sct_jax.data.io import atomic_path
from sct_jax.metrics import BONE_ABOVE

MAX_GRID = 128  # voxels along the bone box's longest side before meshing
MAX_FACES = 40_000  # triangles per mesh (matplotlib draws ~10k/s on one core)
_OUTSIDE_HU = -1024.0  # what a voxel outside the body counts as: never bone
_BONE_RGB = (0.91, 0.87, 0.76)
EMPTY_CAPTION = "no bone > 250 HU"


def _pooled(ct: np.ndarray, mask: np.ndarray, box: tuple[slice, ...],
            factors: Sequence[int]) -> np.ndarray:
    """The HU of ``box`` (outside the body: :data:`_OUTSIDE_HU`), max-pooled by
    ``factors`` per axis (a last, partial block is pooled over what there is).

    Returns:
      ``(ceil(nx/fx), ceil(ny/fy), ceil(nz/fz))`` float32.
    """
    fx, fy, fz = factors
    starts = [np.arange(s.start, s.stop, f) - s.start for s, f in zip(box, factors)]
    out = np.empty([len(s) for s in starts], np.float32)
    # Slab by slab along Z: the masked copy is never the whole volume.
    for k, z0 in enumerate(range(box[2].start, box[2].stop, fz)):
        zs = slice(z0, min(z0 + fz, box[2].stop))
        slab = ct[box[0], box[1], zs]
        # NaN (a broken sCT) would win every max: it counts as no bone, like outside.
        slab = np.where((mask[box[0], box[1], zs] > 0) & ~np.isnan(slab), slab, _OUTSIDE_HU)
        plane = slab.max(axis=2)
        plane = np.maximum.reduceat(plane, starts[0], axis=0)
        out[:, :, k] = np.maximum.reduceat(plane, starts[1], axis=1)
    return out


def bone_surface(ct: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                 threshold_hu: float = BONE_ABOVE, max_faces: int = MAX_FACES,
                 max_grid: int = MAX_GRID) -> tuple[np.ndarray, np.ndarray]:
    """The surface of the bone (``ct > threshold_hu`` inside ``mask``) as a mesh in mm.

    Args:
      ct: ``(X, Y, Z)`` volume in HU (a CT or an sCT).
      mask: ``(X, Y, Z)`` body mask (``> 0`` is body).
      spacing: voxel size in mm per axis.
      threshold_hu: the bone level (default the metrics' 250 HU).
      max_faces: at most this many triangles: the grid is coarsened until it holds.
      max_grid: at most this many (pooled) voxels along the bone box's longest side.

    Returns:
      ``verts`` ``(V, 3)`` float32 in mm, voxel ``(0, 0, 0)``'s centre at the origin and
      axis ``i`` at ``index * spacing[i]``; ``faces`` ``(F, 3)`` int indices into
      ``verts``. Both have no rows when there is no bone.
    """
    spacing = np.asarray(spacing, np.float64)
    empty = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    bone = (ct > threshold_hu) & (mask > 0)
    if not bone.any():
        return empty
    # The bone's box plus one voxel each side: the HU just outside the bone place the
    # surface, and the pooled grid is padded to close the surface at the volume's edge.
    box = tuple(slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n))
                for i, n in zip(np.nonzero(bone), ct.shape))
    del bone
    extent = np.array([s.stop - s.start for s in box]) * spacing
    # A near-isotropic pooled voxel: the longest side gets max_grid voxels at most.
    size = max(float(spacing.min()), float(extent.max()) / max_grid)
    for _ in range(6):
        factors = [max(1, int(round(size / s))) for s in spacing]
        grid = np.pad(_pooled(ct, mask, box, factors), 1, constant_values=_OUTSIDE_HU)
        verts, faces, _, _ = marching_cubes(grid, level=threshold_hu, allow_degenerate=False)
        if len(faces) <= max_faces or max(grid.shape) <= 4:  # fits, or cannot coarsen
            break
        # Triangles scale with the surface over the voxel face: grow the voxel by the root.
        size *= max(math.sqrt(len(faces) / max_faces) * 1.1, 1.2)
    if len(faces) > max_faces:  # never reached for real anatomy; a bound is a bound
        faces = faces[np.linspace(0, len(faces) - 1, max_faces).astype(np.int64)]
    # Pooled voxel j (after the pad) covers voxels start + (j-1)*f ... + f - 1: its
    # centre is start + (j-1)*f + (f-1)/2 in voxels of the input (a last, partial block
    # is placed as a full one: off by less than half a pooled voxel, at the box's edge).
    f = np.asarray(factors, np.float64)
    start = np.array([s.start for s in box], np.float64)
    verts = (start + (verts - 1.0) * f + (f - 1.0) / 2.0) * spacing
    return verts.astype(np.float32), faces.astype(np.int64)


def _limits(meshes: Sequence[np.ndarray], fallback: np.ndarray) -> np.ndarray:
    """``(3, 2)`` min/max in mm over every mesh's vertices (``fallback`` if none)."""
    points = [v for v in meshes if len(v)]
    if not points:
        return fallback
    stacked = np.concatenate(points)
    lo, hi = stacked.min(axis=0), stacked.max(axis=0)
    hi = np.maximum(hi, lo + 1.0)  # a flat mesh still gets a box to draw in
    return np.stack([lo, hi], axis=1)


def save_bone3d(path: str | Path, ct: np.ndarray, sct: np.ndarray, mask: np.ndarray,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "",
                threshold_hu: float = BONE_ABOVE, max_faces: int = MAX_FACES,
                elev: float = 15.0, azim: float = -60.0) -> Path:
    """Draws the bone surface of CT (left) and sCT (right) and writes the PNG atomically.

    Both panels share the view and the axis limits (the union of the two meshes' boxes)
    with equal mm per unit along X, Y and Z (Z, superior-inferior, up), so a bone the
    sCT misses or adds shows as a difference between the panels. A side without bone
    says :data:`EMPTY_CAPTION`. The figure is 8 x 4 in at 100 dpi (800 x 400 px).

    Args:
      path: the PNG to write.
      ct: ``(X, Y, Z)`` reference CT in HU.
      sct: ``(X, Y, Z)`` synthetic CT in HU.
      mask: ``(X, Y, Z)`` body mask.
      spacing: voxel size in mm.
      title: figure title (the case id).
      threshold_hu, max_faces: as :func:`bone_surface`.
      elev, azim: the view (degrees, matplotlib's convention).

    Returns:
      The written path.
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.colors import LightSource
    from matplotlib.figure import Figure
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    path = Path(path)
    meshes = [bone_surface(vol, mask, spacing, threshold_hu, max_faces) for vol in (ct, sct)]
    volume_box = np.stack([np.zeros(3), (np.array(ct.shape) - 1) * np.asarray(spacing)], 1)
    limits = _limits([v for v, _ in meshes], volume_box)
    light = LightSource(azdeg=azim + 90.0, altdeg=45.0)
    fig = Figure(figsize=(8.0, 4.0), dpi=100)
    for i, (name, (verts, faces)) in enumerate(zip(("CT", "sCT"), meshes)):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        if len(faces):
            # Not antialiased: antialiased edges leave light seams between triangles.
            ax.add_collection3d(Poly3DCollection(
                verts[faces], facecolors=_BONE_RGB, linewidths=0.0, antialiased=False,
                shade=True, lightsource=light))
        else:
            ax.text2D(0.5, 0.5, EMPTY_CAPTION, transform=ax.transAxes, ha="center",
                      va="center", fontsize=10, color="#a11")
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        ax.set_zlim(*limits[2])
        ax.set_box_aspect(tuple(limits[:, 1] - limits[:, 0]))  # equal mm on every axis
        ax.view_init(elev=elev, azim=azim)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=6, pad=0)
        for axis, label in zip((ax.xaxis, ax.yaxis, ax.zaxis), ("x", "y", "z")):
            axis.set_label_text(f"{label} (mm)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.0, right=0.96, bottom=0.02, top=0.9, wspace=0.1)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
