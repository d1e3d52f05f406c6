"""What ``sct-predict -i`` accepts, and where each sCT goes.

An input is one MR volume file (``.nii``, ``.nii.gz``, ``.mha``), a folder holding one
DICOM MR series, or a folder of MR volume files. :func:`plan` resolves it into
``(name, source, output)`` jobs and refuses, before anything is read or written, an
output that would land on an input.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from sct_jax.data.io import (NIFTI_SUFFIXES, VOLUME_SUFFIXES, Volume, load_volume,
                            lps_to_ras, volume_suffix)
from sct_jax.errors import DataError

# Relative slice-gap variation tolerated in a DICOM series.
_SLICE_GAP_TOLERANCE = 1e-3
# What must be one value in a DICOM series folder, and what it counts.
_ONE_SERIES_TAGS = (("PatientID", "patients"), ("SeriesInstanceUID", "series"))


@dataclasses.dataclass(frozen=True)
class Job:
    """One MR to predict: ``source`` (file or DICOM folder) -> ``output`` NIfTI."""

    name: str
    source: Path
    output: Path
    dicom: bool = False

    @property
    def std_output(self) -> Path:
        """Where the per-voxel standard deviation of ``--samples K`` goes."""
        suffix = volume_suffix(self.output)
        return self.output.with_name(self.output.name[:-len(suffix)] + "_std" + suffix)


def _stem(path: Path) -> str:
    suffix = volume_suffix(path)
    return path.name[:-len(suffix)] if suffix else path.name


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def plan(input_path: str | os.PathLike, output: str | os.PathLike) -> list[Job]:
    """Resolves ``-i`` and ``-o`` into jobs.

    Args:
      input_path: an MR file, a DICOM series folder or a folder of MR files.
      output: a ``.nii``/``.nii.gz`` file (single input only) or a folder that
        receives ``<name>_sct.nii.gz`` per input.

    Raises:
      DataError: a missing or unusable input, or an output that resolves to an input
        (or, for folder inputs, into the input folder).
    """
    src, out = Path(input_path), Path(output)
    if not src.exists():
        raise DataError(f"{src}: input not found")
    out_is_file = volume_suffix(out) in NIFTI_SUFFIXES
    if volume_suffix(out) and not out_is_file:
        raise DataError(f"{out}: the sCT is written as NIfTI (.nii or .nii.gz), or give "
                        "a folder")
    if src.is_file():
        if not volume_suffix(src):
            raise DataError(f"{src}: unsupported file type (expected one of "
                            f"{', '.join(VOLUME_SUFFIXES)}, or a DICOM series folder)")
        jobs = [Job(_stem(src), src, out if out_is_file else out / f"{_stem(src)}_sct.nii.gz")]
    elif src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        volumes = [p for p in files if volume_suffix(p)]
        dicoms = [p for p in files if not volume_suffix(p) and _is_dicom_file(p)]
        if volumes and dicoms:
            raise DataError(f"{src}: holds both MR volume files and DICOM files; give one "
                            "file, a DICOM series folder or a folder of MR files")
        if dicoms:
            jobs = [Job(src.name, src, out if out_is_file else out / f"{src.name}_sct.nii.gz",
                        dicom=True)]
        elif volumes:
            if out_is_file and len(volumes) > 1:
                raise DataError(f"{out}: {len(volumes)} MR files in {src} need an output "
                                "folder, not a file")
            jobs = [Job(_stem(p), p, out if out_is_file else out / f"{_stem(p)}_sct.nii.gz")
                    for p in volumes]
        else:
            raise DataError(f"{src}: no MR volume ({', '.join(VOLUME_SUFFIXES)}) or DICOM "
                            "file found")
        if not out_is_file and out.resolve() == src.resolve():
            raise DataError(f"{out}: is the input folder; give another output folder")
    else:
        raise DataError(f"{src}: not a file or folder")
    inputs = {j.source.resolve() for j in jobs}
    for job in jobs:
        target = job.output.resolve()
        if target in inputs or any(target.is_relative_to(i) for i in inputs if i.is_dir()):
            raise DataError(f"{job.output}: would overwrite or write into the input "
                            f"{job.source}; choose another output")
    names = [j.output for j in jobs]
    if len(set(names)) != len(names):
        raise DataError(f"{src}: two inputs map to the same output name")
    return jobs


def load_job(job: Job) -> Volume:
    """The job's MR as a :class:`Volume` (DICOM: voxel order (columns, rows, slices))."""
    if job.dicom:
        return load_dicom_series(job.source)
    return load_volume(job.source)


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


def load_dicom_series(folder: str | os.PathLike) -> Volume:
    """Reads one DICOM MR series (pydicom) into ``(X, Y, Z)`` with a RAS+ affine.

    X follows the row direction (DICOM columns), Y the column direction, Z the slices
    sorted along the slice normal; rescale slope/intercept are applied.

    Raises:
      DataError: pydicom missing, unreadable files, several series or patients
        (:func:`check_one_series`), non-uniform slice gaps, missing geometry tags.
    """
    folder = Path(folder)
    try:
        import pydicom
    except ImportError as err:
        raise DataError(f"{folder}: reading DICOM needs pydicom "
                        "(pip install 'sct_jax[dicom]')") from err
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and _is_dicom_file(p)):
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
    return Volume(np.stack(planes, axis=-1), lps_to_ras(lps), None)
