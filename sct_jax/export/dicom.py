"""Writing a synthetic CT as a DICOM CT Image Storage series (one file per axial slice).

A treatment planning system imports DICOM, not NIfTI. The series:

- Pixel data: signed 16-bit, ``stored = round(HU) + 1024`` with RescaleSlope 1 and
  RescaleIntercept -1024 (RescaleType HU), as CT scanners write it. HU are rounded to
  integers and clipped to [-1024, 31743] (the int16 range above the intercept): below
  -1024 is not a physical CT number, and stored values stay >= 0.
- Geometry from the NIfTI affine, turned from RAS+ to DICOM's LPS (x and y negated).
  Slice ``k`` is the NIfTI plane ``data[:, :, k]``; its pixel array is that plane
  transposed, ``(Rows, Columns) = (Y, X)``: DICOM columns run along NIfTI ``i`` (the
  first ImageOrientationPatient triplet is the affine's first column, normalised), rows
  along ``j`` (second triplet). PixelSpacing is ``[row spacing, column spacing] =
  [|a_j|, |a_i|]``; ImagePositionPatient of slice k is ``affine @ (0, 0, k)`` in LPS;
  SliceThickness = SpacingBetweenSlices = ``|a_k|``. InstanceNumber counts k from 1.
  The affine must have orthogonal in-plane axes and a slice axis along their normal
  (no shear, no gantry tilt); a left-handed affine (slice axis against the normal) is
  valid, readers then stack the slices in the opposite order, same positions.
- Identity: new Study/Series/SOP Instance/Frame of Reference UIDs, Modality CT, and the
  series marked as synthetic in SeriesDescription ("SYNTHETIC CT ..."), ImageType
  ``DERIVED\\SECONDARY\\AXIAL``, DerivationDescription and ImageComments.
- With a reference MR series (``like``), the patient and study tags are copied from it
  (the sCT joins the MR's study). The folder must hold one series of one patient (the
  MR reader's check, :func:`sct_jax.inference.dicom.check_one_series`): the identity
  stamped is the one patient of the source, or the export is refused. FrameOfReferenceUID is copied only when the series'
  slices (count, orientation, spacing, every position) match the sCT's grid
  (:func:`like_geometry_mismatch`): the sCT then shares the MR's patient coordinate
  system and a planning system overlays the two without a registration. Otherwise the
  sCT gets its own Frame of Reference, and a warning says why.

The folder is written atomically: files go to a temporary folder next to ``out`` that
is renamed when complete; an existing non-empty ``out`` is refused.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from sct_jax import __version__
from sct_jax.data.io import Volume, ras_to_lps
from sct_jax.errors import ConfigError, DataError
from sct_jax.inference.dicom import check_one_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024
HU_STORED_RANGE = (-1024, 32767 + RESCALE_INTERCEPT)
# Copied from the reference MR series: who and which study, and its coordinate system.
# PatientPosition (HFS, FFS, ...) too, because it is a property of the MR's patient frame.
LIKE_TAGS = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
             "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
             "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
             "FrameOfReferenceUID", "PatientPosition")
log = logging.getLogger(__name__)
_ORTHOGONALITY_TOLERANCE = 1e-4
# What the user gives is checked against its DICOM value representation (PS3.5 6.2), so
# no series carries a value a planning system may reject. SeriesNumber is an IS: at
# most 12 characters, a signed 32-bit integer (kept >= 0: it orders series in a study).
SERIES_NUMBER_RANGE = (0, 2**31 - 1)
# ``source`` goes into SeriesDescription, an LO of at most 64 characters.
SERIES_DESCRIPTION_PREFIX = "SYNTHETIC CT from "
SOURCE_MAX_CHARS = 64 - len(SERIES_DESCRIPTION_PREFIX)


def series_number_problem(value: int) -> str | None:
    """Why ``value`` cannot be a SeriesNumber (IS), or ``None``."""
    low, high = SERIES_NUMBER_RANGE
    if not low <= value <= high:
        return f"{value} is out of range: a DICOM SeriesNumber (IS) is {low} to {high}"
    return None


def source_problem(source: str) -> str | None:
    """Why ``source`` cannot go into SeriesDescription (LO), or ``None``.

    LO: at most 64 characters (46 after :data:`SERIES_DESCRIPTION_PREFIX`), no
    backslash (the value separator), no control characters. Printable ASCII only: with
    ``like`` the series takes the MR's character set, which need not encode more.
    """
    if len(source) > SOURCE_MAX_CHARS:
        return (f"{len(source)} characters long; at most {SOURCE_MAX_CHARS} characters fit "
                f"(SeriesDescription holds 64 with {SERIES_DESCRIPTION_PREFIX!r})")
    if "\\" in source:
        return "a backslash separates values in DICOM; leave it out"
    if not all(" " <= ch <= "~" for ch in source):
        return "printable ASCII only (the series may take the MR's character set)"
    return None


def slice_geometry(affine: np.ndarray, shape: Sequence[int]) -> dict:
    """DICOM geometry of the axial slices of a NIfTI volume.

    Args:
      affine: ``(4, 4)`` voxel -> RAS+ mm.
      shape: ``(X, Y, Z)``.

    Returns:
      dict with ``orientation`` (6 floats: row then column direction cosines, LPS),
      ``pixel_spacing`` ``[row spacing, column spacing]`` mm, ``slice_spacing`` mm,
      ``positions`` ``(Z, 3)`` ImagePositionPatient per slice (LPS mm) and ``normal``
      (3,), the slice normal ``row x column``.

    Raises:
      DataError: a singular, sheared or tilted affine (DICOM slices cannot carry it).
    """
    lps = ras_to_lps(affine)
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(columns)) or np.any(spacing <= 0):
        raise DataError(f"affine has a zero or non-finite axis (voxel sizes {spacing})")
    cosines = columns / spacing
    normal = np.cross(cosines[:, 0], cosines[:, 1])
    if abs(float(cosines[:, 0] @ cosines[:, 1])) > _ORTHOGONALITY_TOLERANCE:
        raise DataError("affine: the in-plane axes are not orthogonal (sheared); DICOM "
                        "rows and columns must be perpendicular")
    if abs(abs(float(cosines[:, 2] @ normal)) - 1.0) > _ORTHOGONALITY_TOLERANCE:
        raise DataError("affine: the slice axis is not perpendicular to the slices "
                        "(gantry tilt or shear); resample to an orthogonal grid first")
    positions = lps[:3, 3][None, :] + np.arange(int(shape[2]))[:, None] * columns[:, 2][None, :]
    return {"orientation": [*cosines[:, 0], *cosines[:, 1]],
            "pixel_spacing": [float(spacing[1]), float(spacing[0])],
            "slice_spacing": float(spacing[2]), "positions": positions, "normal": normal}


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    """HU -> int16 stored values (``round(HU) + 1024``, clipped; see the module doc)."""
    hu = np.clip(np.rint(np.asarray(hu, np.float64)), *HU_STORED_RANGE)
    return (hu - RESCALE_INTERCEPT).astype(np.int16)


def read_like_series(like_dir: str | os.PathLike) -> list:
    """The DICOM headers in ``like_dir`` (recursive), checked to be one series of one
    patient (:func:`sct_jax.inference.dicom.check_one_series`, the MR reader's check):
    their identity is what the export stamps.

    Returns:
      The pydicom datasets (no pixel data) of the files with a SOPClassUID, by path.

    Raises:
      DataError: the folder is missing, holds no DICOM file, or holds files of two
        patients or two series (the message names the folder and both values).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    like_dir = Path(like_dir)
    if not like_dir.is_dir():
        raise DataError(f"{like_dir}: reference MR series folder not found")
    headers = []
    for path in sorted(p for p in like_dir.rglob("*") if p.is_file()):
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SOPClassUID" in ds:
            headers.append(ds)
    if not headers:
        raise DataError(f"{like_dir}: no DICOM file found for --like")
    check_one_series(like_dir, headers)
    return headers


def read_reference_tags(like_dir: str | os.PathLike) -> dict:
    """The :data:`LIKE_TAGS` of the one MR series in ``like_dir`` (:func:`read_like_series`).

    Raises:
      DataError: as :func:`read_like_series`.
    """
    return _like_tags(read_like_series(like_dir)[0])


def _like_tags(ds) -> dict:
    return {tag: ds[tag].value for tag in LIKE_TAGS if tag in ds}


def like_geometry_mismatch(headers: Sequence, sct: Volume) -> str | None:
    """Why the MR series ``headers`` is not on the sCT's grid, or ``None`` if it is.

    Compares slice count, orientation, pixel spacing and every slice position (LPS mm,
    0.01 mm tolerance) read from the DICOM headers (:func:`read_like_series`) with the
    sCT's :func:`slice_geometry`. The Frame of Reference UID may be shared only when
    they match: otherwise a planning system would overlay two images that are not in
    one coordinate system.
    """
    geometry = slice_geometry(sct.affine, sct.shape)
    headers = [ds for ds in headers
               if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds]
    if len(headers) != sct.shape[2]:
        return f"{len(headers)} MR slices, the sCT has {sct.shape[2]}"
    first = headers[0]
    if not np.allclose([float(v) for v in first.ImageOrientationPatient],
                       geometry["orientation"], atol=1e-4):
        return "slice orientation differs"
    if "PixelSpacing" in first and not np.allclose(
            [float(v) for v in first.PixelSpacing], geometry["pixel_spacing"], atol=1e-3):
        return "pixel spacing differs"
    if (int(first.get("Rows", sct.shape[1])), int(first.get("Columns", sct.shape[0]))) != (
            sct.shape[1], sct.shape[0]):
        return "rows/columns differ"
    mr_positions = np.array(sorted(([float(v) for v in ds.ImagePositionPatient]
                                    for ds in headers), key=lambda p: p @ geometry["normal"]))
    ours = np.array(sorted(geometry["positions"].tolist(),
                           key=lambda p: np.asarray(p) @ geometry["normal"]))
    if not np.allclose(mr_positions, ours, atol=0.01):
        return "slice positions differ"
    return None


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds
    # Snap rounding dust (-1.2e-17) to 0: cosines of an axis-aligned grid read as 0.
    return format_number_as_ds(0.0 if abs(value) < 1e-12 else float(value))


def _base_dataset(like: dict, source: str, source_file: str, series_number: int, now):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8; replaced by the MR's when copied
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = date, time, "", ""
    ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    for tag, value in like.items():
        setattr(ds, tag, value)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
    ds.SeriesDescription = f"{SERIES_DESCRIPTION_PREFIX}{source}"
    origin = f" (file {source_file})" if source_file else ""
    ds.DerivationDescription = (f"SYNTHETIC CT computed from {source} by sct_jax "
                                f"{__version__}{origin}; not an acquired CT image")[:1024]
    ds.ImageComments = "SYNTHETIC CT - not an acquired image"
    ds.Manufacturer = "sct_jax"
    ds.SoftwareVersions = __version__
    ds.BurnedInAnnotation = "NO"
    ds.KVP = ""
    ds.AcquisitionNumber = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(RESCALE_INTERCEPT), "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"  # soft-tissue window on opening
    return ds


def export_dicom_series(sct: Volume, out_dir: str | os.PathLike, *,
                        like_dir: str | os.PathLike | None = None, source: str = "MR",
                        source_file: str = "", series_number: int = 901,
                        now: datetime.datetime | None = None) -> list[Path]:
    """Writes ``sct`` as a CT Image Storage series, one file per axial slice.

    Args:
      sct: the synthetic CT, ``data`` ``(X, Y, Z)`` HU (finite), ``affine`` RAS+.
      out_dir: the folder to create (must not exist, or be empty).
      like_dir: a DICOM MR series to copy patient, study and frame-of-reference tags from
        (one series of one patient, :func:`read_like_series`).
      source: what the sCT was made from (goes into SeriesDescription, e.g. "MR pix2pix";
        :func:`source_problem` says what it may hold).
      source_file: the NIfTI's name, recorded in DerivationDescription.
      series_number: the SeriesNumber (:data:`SERIES_NUMBER_RANGE`).
      now: the date and time to record (default: now).

    Returns:
      The written files, ``out_dir/CT0001.dcm`` ... in slice order.

    Raises:
      DataError: not 3D, non-finite voxels, an unusable affine, a non-empty ``out_dir``,
        or a ``like_dir`` without DICOM or of several patients or series.
      ConfigError: a ``series_number`` or ``source`` DICOM cannot hold.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    for name, value, problem in (("series_number", series_number, series_number_problem),
                                 ("source", source, source_problem)):
        if problem(value):
            raise ConfigError(f"{name}={value!r}: {problem(value)}")
    out_dir = Path(out_dir)
    data = np.asarray(sct.data)
    if data.ndim != 3:
        raise DataError(f"{source_file or 'sct'}: expected a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{source_file or 'sct'}: non-finite (NaN/Inf) voxels")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not an empty folder; refusing to overwrite")
    geometry = slice_geometry(sct.affine, data.shape)
    like = {}
    if like_dir is not None:
        headers = read_like_series(like_dir)
        like = _like_tags(headers[0])
        mismatch = like_geometry_mismatch(headers, sct)
        if mismatch is not None:
            # Patient and study still apply; the coordinate system does not.
            like.pop("FrameOfReferenceUID", None)
            log.warning("%s: the MR series is not on the sCT's grid (%s): the sCT gets a "
                        "new Frame of Reference (patient and study tags copied)",
                        like_dir, mismatch)
        else:
            log.warning("%s: the MR series is on the sCT's grid: its Frame of Reference "
                        "is shared", like_dir)
    base = _base_dataset(like, source, source_file, series_number,
                         now or datetime.datetime.now())
    digits = max(4, len(str(data.shape[2])))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    names = []
    try:
        for k in range(data.shape[2]):
            ds = copy.deepcopy(base)  # Dataset.copy() is shallow: slices would share
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = geometry["positions"][k]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = [_ds(v) for v in geometry["orientation"]]
            ds.PixelSpacing = [_ds(v) for v in geometry["pixel_spacing"]]
            ds.SliceThickness = ds.SpacingBetweenSlices = _ds(geometry["slice_spacing"])
            ds.SliceLocation = _ds(float(position @ geometry["normal"]))
            # (Rows, Columns) = (Y, X): DICOM columns follow NIfTI i, rows follow j.
            ds.set_pixel_data(np.ascontiguousarray(hu_to_stored(data[:, :, k].T)),
                              photometric_interpretation="MONOCHROME2", bits_stored=16,
                              generate_instance_uid=False)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            name = f"CT{k + 1:0{digits}d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            names.append(name)
        os.chmod(tmp, 0o755)  # mkdtemp makes an owner-only folder
        os.replace(tmp, out_dir)  # replaces an empty out_dir; fails on a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / name for name in names]
