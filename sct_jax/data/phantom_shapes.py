"""Shape primitives of the phantom anatomy (:mod:`sct_jax.data.phantom_anatomy`).

The design-millimetre :class:`Grid`, smooth random fields (:func:`smooth_noise`),
rotations, and the two shapes every structure is made of: an (optionally bent and
rotated) :func:`ellipsoid` and an :func:`ellipse_stack` of per-slice (super)ellipses,
each evaluated inside its bounding box only and painted into a label map with
:func:`paint`. Axes follow RAS+ (``x`` left-right, ``y`` posterior -> anterior, ``z``
inferior -> superior).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates in design millimetres, centred on the volume.

    Attributes:
      x, y, z: ``(X,)``, ``(Y,)``, ``(Z,)`` float32 coordinates.
      voxel: ``(3,)`` voxel edge lengths in design mm.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    voxel: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    def min_shell(self, thickness: float) -> float:
        """``thickness`` raised to 1.2 in-plane voxels, so thin shells survive sampling."""
        return max(float(thickness), 1.2 * float(max(self.voxel[0], self.voxel[1])))

    def full(self, axis: int, sl: tuple[slice, ...] | None = None) -> np.ndarray:
        """The coordinate along ``axis`` shaped to broadcast over a (sub-)volume."""
        coords = (self.x, self.y, self.z)[axis]
        if sl is not None:
            coords = coords[sl[axis]]
        shape = [1, 1, 1]
        shape[axis] = len(coords)
        return coords.reshape(shape)


def smooth_noise(rng: np.random.Generator, shape, cell_vox) -> np.ndarray:
    """A smooth random field with unit standard deviation.

    White noise on a coarse lattice (one node per ``cell_vox`` voxels), blurred and
    trilinearly upsampled: cost is one pass over the full volume.

    Args:
      rng: the generator to draw from.
      shape: ``(X, Y, Z)`` output shape.
      cell_vox: per-axis correlation length in voxels (>= 1).

    Returns:
      ``(X, Y, Z)`` float32 field, mean 0, std 1.
    """
    coarse = tuple(max(3, int(np.ceil(n / max(c, 1.0))) + 1) for n, c in zip(shape, cell_vox))
    field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 0.6)
    for axis in np.argsort(shape):  # separable, smallest axis first: the last pass is cheapest
        field = _upsample_linear(field, int(axis), shape[axis])
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _upsample_linear(field: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear interpolation of ``field`` to ``size`` samples along ``axis`` (ends aligned)."""
    positions = np.linspace(0.0, field.shape[axis] - 1.0, size)
    lower = np.minimum(positions.astype(np.int64), field.shape[axis] - 2)
    weight = (positions - lower).astype(np.float32).reshape(
        [-1 if a == axis else 1 for a in range(field.ndim)])
    low, high = np.take(field, lower, axis), np.take(field, lower + 1, axis)
    return low + weight * (high - low)


def rotation_from_axis(long_axis, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """A rotation whose first column is ``long_axis`` and whose third is nearest ``up``.

    Returns:
      ``(3, 3)`` matrix with the local axes as columns.
    """
    ex = np.asarray(long_axis, dtype=np.float64)
    ex /= np.linalg.norm(ex)
    up = np.asarray(up, dtype=np.float64)
    ey = np.cross(up, ex)
    if np.linalg.norm(ey) < 1e-6:  # long axis parallel to up: pick any perpendicular
        ey = np.cross((1.0, 0.0, 0.0), ex)
    ey /= np.linalg.norm(ey)
    return np.stack([ex, ey, np.cross(ex, ey)], axis=1)


def _box(grid: Grid, center, half) -> tuple[slice, ...] | None:
    """Index slices of the grid points within ``center +- half``; None if empty."""
    slices = []
    for coords, c, h in zip((grid.x, grid.y, grid.z), center, half):
        lo, hi = np.searchsorted(coords, [c - h, c + h])
        if hi <= lo:
            return None
        slices.append(slice(int(lo), int(hi)))
    return tuple(slices)


def ellipsoid(grid: Grid, center, radii, rotation=None, bend: float = 0.0):
    """Voxels inside an ellipsoid, optionally rotated and bent.

    Args:
      grid: the design grid.
      center: ``(3,)`` centre in design mm.
      radii: ``(3,)`` semi-axes along the local axes.
      rotation: ``(3, 3)`` local axes as columns (identity when None).
      bend: curvature (1/mm): the local y coordinate is taken relative to the parabola
        ``bend * x_local**2``, so both ends curve towards local ``+y``.

    Returns:
      ``(slices, inside)`` with ``inside`` a boolean array over ``grid[slices]``, or
      None when the ellipsoid misses the grid.
    """
    radii = np.maximum(np.asarray(radii, dtype=np.float64), 1e-3)
    reach = radii.max() + abs(bend) * radii[0] ** 2
    sl = _box(grid, center, (reach, reach, reach))
    if sl is None:
        return None
    d = [grid.full(a, sl) - np.float32(center[a]) for a in range(3)]
    rot = np.eye(3) if rotation is None else np.asarray(rotation)
    local = [sum(np.float32(rot[a, k]) * d[a] for a in range(3)) for k in range(3)]
    if bend:
        local[1] = local[1] - np.float32(bend) * local[0] ** 2
    q = sum((loc / np.float32(r)) ** 2 for loc, r in zip(local, radii))
    return sl, q <= 1.0


def ellipse_stack(grid: Grid, z_range, cx, cy, a, b, b_back=None, angle_deg: float = 0.0,
                  bend: float = 0.0, power: float = 2.0):
    """Voxels inside a stack of axial (super)ellipses whose parameters vary with ``z``.

    Args:
      grid: the design grid.
      z_range: ``(z_lo, z_hi)`` extent in design mm.
      cx, cy, a, b: centre and semi-axes, each a scalar or a function of the ``(K,)``
        slice coordinates ``z``; semi-axes <= 0 leave a slice empty.
      b_back: semi-axis on the local ``-y`` side (default ``b``), for flattened backs.
      angle_deg: in-plane rotation of the local ``x`` axis from ``+x`` towards ``+y``.
      bend: curvature of the local ``x`` axis towards local ``+y`` (1/mm).
      power: superellipse exponent (2 = ellipse, larger = boxier).

    Returns:
      ``(slices, inside, local_y)``: boolean ``inside`` over ``grid[slices]`` and the
      local ``y`` offset from the centre (before bending), or None when empty.
    """
    k_lo, k_hi = np.searchsorted(grid.z, z_range)
    if k_hi <= k_lo:
        return None
    z = grid.z[k_lo:k_hi]

    def per_slice(v):
        v = v(z) if callable(v) else np.full_like(z, v)
        return np.asarray(v, dtype=np.float32).reshape(1, 1, -1)

    cx, cy, a, b = (per_slice(v) for v in (cx, cy, a, b))
    b_back = b if b_back is None else per_slice(b_back)
    reach = float(np.max([a.max(), b.max(), b_back.max()]))
    reach += abs(bend) * float(a.max()) ** 2
    x_lo, x_hi = np.searchsorted(grid.x, [cx.min() - reach, cx.max() + reach])
    y_lo, y_hi = np.searchsorted(grid.y, [cy.min() - reach, cy.max() + reach])
    if x_hi <= x_lo or y_hi <= y_lo:
        return None
    sl = (slice(int(x_lo), int(x_hi)), slice(int(y_lo), int(y_hi)), slice(int(k_lo), int(k_hi)))
    dx = grid.full(0, sl) - cx
    dy = grid.full(1, sl) - cy
    c, s = np.float32(np.cos(np.radians(angle_deg))), np.float32(np.sin(np.radians(angle_deg)))
    u, v = c * dx + s * dy, c * dy - s * dx
    v_bent = v - np.float32(bend) * u ** 2 if bend else v
    half_b = np.where(v_bent >= 0, b, b_back)
    tiny = np.float32(1e-3)
    q = ((np.abs(u) / np.maximum(a, tiny)) ** power
         + (np.abs(v_bent) / np.maximum(half_b, tiny)) ** power)
    inside = (q <= 1.0) & (a > 0) & (half_b > 0)
    return sl, inside, v


def paint(labels: np.ndarray, tissue: int, shape) -> None:
    """Sets ``labels`` to ``tissue`` inside ``shape`` (an ellipsoid/stack result)."""
    if shape is not None:
        labels[shape[0]][shape[1]] = tissue
