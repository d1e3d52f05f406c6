"""Texture faults of an sCT that the voxel-wise metrics average away: stripes and checkerboards.

Both are the sCT's value minus the CT's, in HU, so 0 is "as the CT", positive is an
artefact the CT does not have, negative is smoothing the CT does not have.

**slice_step_excess** (3D consistency of 2D models): the mean of ``|sct[..., z+1] -
sct[..., z]|`` over the voxel pairs whose two voxels are both inside the body mask,
minus the same mean for the CT. A 2D model that predicts every axial slice on its own
adds steps between neighbouring slices (stripes in the coronal and sagittal views).

**high_freq_excess** (checkerboard): the RMS in HU of the in-plane frequencies at or
above :data:`HIGH_FREQ_CUTOFF` cycles per voxel (periods of 4 voxels or less, on either
axis) of the sCT, minus the CT's, over the axial slices that hold body. Computed from
each slice's 2-D DFT: the body's bounding box in the slice is cut out (so the air around
the body does not dilute it), its mean removed, a 2-D Hann window applied (without it the
cut's edges leak a smooth image's energy into every frequency), and the band's energy
divided by the window's (Parseval), so a pattern of amplitude ``a`` reads ``a``. A transposed convolution's uneven overlap (Odena et al. 2016) and noise raise
it, a blur lowers it.
"""

from __future__ import annotations

import numpy as np

from sct_jax.metrics import _check_inputs

# Cycles per voxel (Nyquist is 0.5): the band a checkerboard of period 2-4 voxels falls in.
HIGH_FREQ_CUTOFF = 0.25
TEXTURE_NAMES = ("slice_step_excess", "high_freq_excess")


def slice_steps(volume: np.ndarray, mask: np.ndarray) -> float:
    """Mean ``|volume[..., z+1] - volume[..., z]|`` over neighbours both in ``mask``.

    Args:
      volume: ``(X, Y, Z)`` HU.
      mask: ``(X, Y, Z)`` body mask.

    Returns:
      The mean step in HU; NaN when no two neighbouring voxels are both in the mask.
    """
    inside = (mask[..., 1:] > 0) & (mask[..., :-1] > 0)
    if not inside.any():
        return float("nan")
    steps = np.abs(np.diff(np.asarray(volume, np.float64), axis=-1))
    return float(steps[inside].mean())


def high_freq_rms(volume: np.ndarray, mask: np.ndarray,
                  cutoff: float = HIGH_FREQ_CUTOFF) -> float:
    """RMS in HU of the in-plane frequencies ``>= cutoff`` of ``volume``'s body slices.

    Args:
      volume: ``(X, Y, Z)`` HU.
      mask: ``(X, Y, Z)`` body mask; each axial slice is cut to its mask's bounding box.
      cutoff: cycles per voxel; a frequency is in the band when either of its two
        components is at or above it in magnitude.

    Returns:
      ``sqrt(band energy / window energy)`` summed over the slices with body (at least
      4 x 4 voxels of it); NaN when there is none.
    """
    energy, weight = 0.0, 0.0
    for z in range(volume.shape[-1]):
        rows, cols = np.nonzero(mask[..., z] > 0)
        if rows.size == 0 or np.ptp(rows) < 3 or np.ptp(cols) < 3:
            continue
        patch = np.asarray(volume[rows.min():rows.max() + 1, cols.min():cols.max() + 1, z],
                           np.float64)
        window = np.outer(np.hanning(patch.shape[0]), np.hanning(patch.shape[1]))
        spectrum = np.fft.fft2((patch - patch.mean()) * window)
        fx = np.abs(np.fft.fftfreq(patch.shape[0]))[:, None]
        fy = np.abs(np.fft.fftfreq(patch.shape[1]))[None, :]
        band = (fx >= cutoff) | (fy >= cutoff)
        # Parseval: sum |x w|^2 = sum |F|^2 / N for an N-point DFT.
        energy += float(np.sum(np.abs(spectrum[band]) ** 2)) / patch.size
        weight += float(np.sum(window ** 2))
    return float(np.sqrt(energy / weight)) if weight else float("nan")


def texture_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The :data:`TEXTURE_NAMES` of one case: the sCT's stripes and high frequencies
    beyond the CT's, in HU.

    Args:
      ct, sct: ``(X, Y, Z)`` HU on one grid.
      mask: ``(X, Y, Z)`` body mask.

    Raises:
      DataError: shape mismatch or an empty mask.
    """
    _check_inputs(ct, sct, mask)
    return {"slice_step_excess": slice_steps(sct, mask) - slice_steps(ct, mask),
            "high_freq_excess": high_freq_rms(sct, mask) - high_freq_rms(ct, mask)}
