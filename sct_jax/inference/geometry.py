"""The grid a model was trained on, and the way a new MR is brought onto it and back.

A network learns its anatomy in one voxel order and at one voxel size: the training
cases' orientation (nibabel axis codes of the MR affine, e.g. ``("R", "A", "S")``) and
spacing (mm). :class:`sct_jax.data.geometry.TrainingGeometry` records them (with the
region) in ``<workdir>/geometry.json`` when training starts. At prediction time
:func:`to_model_grid` reorients an MR to the training axis codes (a lossless
permutation and flips of the voxel array, nibabel's orientation tools), resamples it
linearly (``scipy.ndimage.map_coordinates``) to the training spacing when the two differ
by more than :data:`SPACING_TOLERANCE`, and :meth:`ModelGrid.to_input` maps a result
back onto the input's exact voxel grid. Reorientation alone is exact both ways;
resampling is linear interpolation (voxel edges of the two grids coincide at the ends,
so the field of view is kept).

An oblique MR (voxel axes rotated from the scanner axes) is reoriented by its nearest
axes, not resliced: the network sees the slices as acquired, so the anatomy is tilted
by :func:`oblique_degrees` relative to the training data, and the sCT lands exactly on
the MR's grid. :attr:`ModelGrid.oblique_degrees` says by how much.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from sct_jax.data.geometry import TrainingGeometry
from sct_jax.errors import DataError

# Relative spacing difference above which an MR is resampled to the training spacing.
SPACING_TOLERANCE = 0.05
# Rotations below this (degrees) are float noise of converters, not an oblique scan.
OBLIQUE_TOLERANCE_DEG = 0.1


@dataclasses.dataclass(frozen=True)
class ModelGrid:
    """How one input MR maps onto the model's grid and back.

    Attributes:
      input_shape: ``(X, Y, Z)`` of the input volume.
      input_ornt: nibabel orientation of the input's axes (``io_orientation``).
      model_ornt: the training axis codes as a nibabel orientation.
      oriented_shape: shape after reorientation.
      model_shape: shape after resampling (== ``oriented_shape`` when not resampled).
      oriented_spacing: voxel size after reorientation (mm).
      model_spacing: voxel size on the model grid (mm).
      oblique_degrees: rotation of the input's voxel axes from the nearest scanner axes
        (:func:`oblique_degrees`); the grid is reoriented by those nearest axes.
    """

    input_shape: tuple[int, int, int]
    input_ornt: np.ndarray
    model_ornt: np.ndarray
    oriented_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    oriented_spacing: tuple[float, float, float]
    model_spacing: tuple[float, float, float]
    oblique_degrees: float = 0.0

    @property
    def oblique(self) -> bool:
        return self.oblique_degrees > OBLIQUE_TOLERANCE_DEG

    @property
    def resampled(self) -> bool:
        return self.model_shape != self.oriented_shape

    @property
    def reoriented(self) -> bool:
        return not np.array_equal(self.input_ornt, self.model_ornt)

    def to_grid(self, data: np.ndarray, order: int = 1) -> np.ndarray:
        """``input_shape`` array -> ``model_shape`` (``order`` 0 for masks)."""
        transform = orientations.ornt_transform(self.input_ornt, self.model_ornt)
        oriented = np.ascontiguousarray(orientations.apply_orientation(data, transform))
        if not self.resampled:
            return oriented
        return _resample(oriented, self.model_shape, order)

    def to_input(self, data: np.ndarray, order: int = 1) -> np.ndarray:
        """``model_shape`` array -> ``input_shape``, on the input's exact voxel grid."""
        if tuple(data.shape) != self.model_shape:
            raise ValueError(f"shape {data.shape} is not the model grid {self.model_shape}")
        if self.resampled:
            data = _resample(data, self.oriented_shape, order)
        transform = orientations.ornt_transform(self.model_ornt, self.input_ornt)
        return np.ascontiguousarray(orientations.apply_orientation(data, transform))


def to_model_grid(affine: np.ndarray, shape: Sequence[int], geometry: TrainingGeometry,
                  tolerance: float | None = None) -> ModelGrid:
    """Plans the mapping of a volume ``(shape, affine)`` onto the training grid.

    Args:
      affine: ``(4, 4)`` voxel -> RAS+ mm of the input.
      shape: ``(X, Y, Z)`` of the input.
      geometry: the model's training geometry.
      tolerance: relative spacing difference above which the volume is resampled
        (default :data:`SPACING_TOLERANCE`).
    """
    tolerance = SPACING_TOLERANCE if tolerance is None else float(tolerance)
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, np.float64)
    input_ornt = orientations.io_orientation(affine)
    model_ornt = orientations.axcodes2ornt(geometry.axcodes)
    transform = orientations.ornt_transform(input_ornt, model_ornt)
    # Input axis i goes to output axis transform[i, 0].
    oriented_shape = [0, 0, 0]
    spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
    oriented_spacing = [0.0, 0.0, 0.0]
    for i, (axis, _) in enumerate(transform):
        oriented_shape[int(axis)] = shape[i]
        oriented_spacing[int(axis)] = float(spacing_in[i])
    target = np.asarray(geometry.spacing, np.float64)
    relative = np.abs(np.asarray(oriented_spacing) - target) / target
    if np.any(relative > tolerance):
        # Keep the physical extent: n' voxels of the training spacing span n * s mm.
        model_shape = tuple(max(1, int(round(n * s / t)))
                            for n, s, t in zip(oriented_shape, oriented_spacing, target))
        model_spacing = tuple(n * s / m for n, s, m in
                              zip(oriented_shape, oriented_spacing, model_shape))
    else:
        model_shape = tuple(oriented_shape)
        model_spacing = tuple(oriented_spacing)
    return ModelGrid(shape, input_ornt, model_ornt, tuple(oriented_shape), tuple(model_shape),
                     tuple(oriented_spacing), tuple(float(s) for s in model_spacing),
                     oblique_degrees(affine))


def oblique_degrees(affine: np.ndarray) -> float:
    """How far (degrees) a volume's voxel axes are rotated from the nearest scanner axes.

    The rotation angle of ``D P^T``, where ``D`` holds the affine's unit axis
    directions and ``P`` the nearest axis-aligned directions (nibabel's
    ``io_orientation``): 0 for an axis-aligned volume, 30 for a slab tilted 30 degrees
    about one axis.
    """
    linear = np.asarray(affine, np.float64)[:3, :3]
    directions = linear / np.linalg.norm(linear, axis=0)
    nearest = np.zeros((3, 3))
    for i, (axis, sign) in enumerate(orientations.io_orientation(affine)):
        nearest[int(axis), i] = sign
    rotation = directions @ nearest.T
    cosine = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cosine)))


def _resample(data: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resamples ``data`` onto ``shape`` voxels spanning the same extent.

    Voxel ``j`` of the output has its centre at input coordinate
    ``(j + 0.5) * n_in / n_out - 0.5`` along each axis (edges aligned); values beyond the
    first/last voxel centre take the edge value.
    """
    coords = np.meshgrid(*[(np.arange(m) + 0.5) * (n / m) - 0.5
                           for n, m in zip(data.shape, shape)], indexing="ij", sparse=True)
    coords = np.broadcast_arrays(*coords)
    return ndimage.map_coordinates(np.asarray(data, np.float32), coords, order=order,
                                   mode="nearest").astype(np.float32)
