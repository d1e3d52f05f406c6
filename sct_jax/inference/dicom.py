"""One DICOM MR series folder -> a :class:`~sct_jax.data.io.Volume` (pydicom).

:func:`load_dicom_series` reads every image of the series, sorts the slices along the
slice normal, checks they are evenly spaced and builds the RAS+ affine, so that an sCT
of a DICOM input lands on the series' exact grid (as a NIfTI).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sct_jax.data.io import Volume, check_affine, lps_to_ras
from sct_jax.errors import DataError

# Relative slice-gap variation tolerated in a DICOM series.
_SLICE_GAP_TOLERANCE = 1e-3
# What must be one value in a DICOM series folder, and what it counts.
_ONE_SERIES_TAGS = (("PatientID", "patients"), ("SeriesInstanceUID", "series"))


def check_one_series(folder: str | os.PathLike, datasets) -> None:
    """Refuses the DICOM files of a folder unless they are one series of one patient.

    The check every reader of a DICOM folder applies (the MR reader here, ``--like`` of
    the DICOM export): a folder of two series is two images, and the identity of a
    folder of two patients is no one's.

    Args:
      folder: the folder, named in the message.
      datasets: the pydicom datasets read from it (headers suffice).

    Raises:
      DataError: two PatientIDs or two SeriesInstanceUIDs (a missing tag counts as the
        empty value); the message names the folder and two of the values.
    """
    for tag, what in _ONE_SERIES_TAGS:
        values = sorted({str(ds.get(tag) or "") for ds in datasets})
        if len(values) > 1:
            shown = ", ".join(repr(v) for v in values[:2]) + (", ..." if len(values) > 2 else "")
            raise DataError(f"{folder}: holds DICOM files of {len(values)} {what} ({tag} "
                            f"{shown}); give one series of one patient per folder")


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM file (``.dcm``, or the ``DICM`` preamble marker)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def load_dicom_series(folder: str | os.PathLike) -> Volume:
    """Reads one DICOM MR series (pydicom) into ``(X, Y, Z)`` with a RAS+ affine.

    X follows the row direction (DICOM columns), Y the column direction, Z the slices
    sorted along the slice normal; rescale slope/intercept are applied.

    Raises:
      DataError: pydicom missing, unreadable files, several series or patients (:func:`check_one_series`), non-uniform
        slice gaps, missing geometry tags.
    """
    folder = Path(folder)
    try:
        import pydicom
    except ImportError as err:
        raise DataError(f"{folder}: reading DICOM needs pydicom "
                        "(pip install 'sct_jax[dicom]')") from err
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p)):
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:  # pydicom raises many kinds for a broken file
            raise DataError(f"{path}: unreadable DICOM ({type(err).__name__})") from err
        if "PixelData" not in ds:
            continue
        missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient",
                               "PixelSpacing") if t not in ds]
        if missing:
            raise DataError(f"{path}: DICOM image without {', '.join(missing)}")
        slices.append((path, ds))
    if not slices:
        raise DataError(f"{folder}: no DICOM image found")
    check_one_series(folder, [ds for _, ds in slices])
    first = slices[0][1]
    cosines = np.asarray(first.ImageOrientationPatient, np.float64).reshape(2, 3)
    normal = np.cross(cosines[0], cosines[1])
    slices.sort(key=lambda s: float(np.asarray(s[1].ImagePositionPatient, float) @ normal))
    positions = np.stack([np.asarray(ds.ImagePositionPatient, np.float64) for _, ds in slices])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if len(slices) > 1:
        gaps = np.diff(positions, axis=0)
        step = gaps.mean(axis=0)
        if np.linalg.norm(step) == 0 or np.any(
                np.linalg.norm(gaps - step, axis=1) > _SLICE_GAP_TOLERANCE * np.linalg.norm(step)
                + 1e-4):
            raise DataError(f"{folder}: slices are not evenly spaced (or duplicated)")
    else:
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = cosines[0] * col_spacing  # along a row: next column
    lps[:3, 1] = cosines[1] * row_spacing  # down a column: next row
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    planes = []
    for path, ds in slices:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:
            raise DataError(f"{path}: pixel data unreadable ({type(err).__name__})") from err
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        planes.append((pixels * slope + intercept).T)  # (Rows, Cols) -> (X, Y)
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices of different sizes {sorted(shapes)}")
    affine = lps_to_ras(lps)
    check_affine(folder, affine)
    return Volume(np.stack(planes, axis=-1), affine, None)
