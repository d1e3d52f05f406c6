"""Reading and writing medical volumes with their geometry.

NIfTI (``.nii``/``.nii.gz``) goes through nibabel; MetaImage (``.mha``/``.mhd``,
SynthRAD2025) through SimpleITK when it is installed. Arrays are kept in the file's
voxel order (NIfTI: ``(X, Y, Z)``, ``Z`` axial) together with the 4x4 voxel-to-world
affine in RAS+ millimetres, so a prediction can be written back on the MR's grid.

Every failure raises :class:`sct_jax.errors.DataError` with a one-line message that
names the file. Saving is atomic: the volume is written to a temporary file in the
target folder and renamed, so a crash never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from sct_jax.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + METAIMAGE_SUFFIXES
# World axes: the affines here are NIfTI's RAS+; ITK (.mha) and DICOM use LPS+. One
# flip of the first two world axes turns either into the other (it is its own inverse).
_RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """A ``(4, 4)`` voxel -> RAS+ mm affine as voxel -> LPS+ mm (float64)."""
    return _RAS_LPS_FLIP @ np.asarray(affine, dtype=np.float64)


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """A ``(4, 4)`` voxel -> LPS+ mm affine as voxel -> RAS+ mm (float64)."""
    return _RAS_LPS_FLIP @ np.asarray(affine, dtype=np.float64)


@dataclasses.dataclass
class Volume:
    """A 3D image with its geometry.

    Attributes:
      data: ``(X, Y, Z)`` array in file voxel order (CT in HU, MR in scanner units).
      affine: ``(4, 4)`` float64 voxel-index -> RAS+ world (mm) transform.
      header: the source nibabel header (kept so a saved prediction carries the MR's
        header fields), or ``None``.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def with_data(self, data: np.ndarray) -> "Volume":
        """The same geometry around another array of the same spatial shape."""
        if tuple(data.shape[:3]) != self.shape[:3]:
            raise ValueError(f"shape {data.shape} does not match volume {self.shape}")
        return Volume(data, self.affine.copy(), self.header)


def volume_suffix(path: str | os.PathLike) -> str:
    """The recognised suffix of ``path`` (``.nii.gz`` counts as one), or ``""``."""
    name = str(path).lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def load_volume(path: str | os.PathLike, *, dtype=np.float32, ndim: int = 3,
                check_finite: bool = True) -> Volume:
    """Loads a volume and checks it is usable.

    Args:
      path: a ``.nii``, ``.nii.gz``, ``.mha`` or ``.mhd`` file.
      dtype: dtype of the returned array (scaling slope/intercept applied).
      ndim: required number of dimensions (a trailing singleton 4th axis is dropped).
      check_finite: reject NaN/Inf voxels.

    Returns:
      The :class:`Volume`.

    Raises:
      DataError: missing, unreadable or truncated file, a header declaring more than
        the voxel cap or an implausibly compressible file (:func:`check_declared_size`),
        an unusable affine (:func:`check_affine`), wrong dimensionality, non-finite
        voxels. The message names ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        data, affine, header = _load_nifti(path, dtype)
    elif suffix in METAIMAGE_SUFFIXES:
        data, affine, header = _load_metaimage(path, dtype)
    else:
        raise DataError(f"{path}: unsupported file type (expected one of "
                        f"{', '.join(VOLUME_SUFFIXES)})")
    check_affine(path, affine)
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}D volume, got shape {data.shape}")
    if check_finite and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise DataError(f"{path}: {bad} non-finite (NaN/Inf) voxels")
    return Volume(data, affine, header)


# The most a DEFLATE stream can expand (zlib's documented limit is 1032:1): a compressed
# file of N bytes can never hold more than N * 1032 bytes of voxels.
_MAX_DEFLATE_RATIO = 1032
# Default voxel cap: 2^27 = 134 M voxels (512 x 512 x 512; 512 MiB as float32). A clinical
# MR or CT is below it (a 512 x 512 x 400 pelvis CT is 1.0e8); a larger volume is
# almost always a corrupt or hostile header, and prediction holds several float32
# copies of a volume, so the cap bounds its memory. SCT_JAX_MAX_VOXELS raises it.
DEFAULT_MAX_VOXELS = 2**27
# A compressed file that declares more than this many bytes of voxels ...
BOMB_FLOOR_BYTES = 256 * 2**20
# ... and more than this many times its own size is refused as a decompression bomb: a
# real MR or CT compresses 2-10x; only a volume that is almost all one value compresses
# 100x, and at that size it is a hostile or broken file (re-save a real one as .nii).
BOMB_RATIO = 100


def max_voxels() -> int:
    """The voxel cap of :func:`load_volume`: ``$SCT_JAX_MAX_VOXELS`` or 2^27."""
    value = os.environ.get("SCT_JAX_MAX_VOXELS", "")
    try:
        return int(float(value)) if value else DEFAULT_MAX_VOXELS
    except ValueError as e:
        raise DataError(f"SCT_JAX_MAX_VOXELS={value!r}: not a number") from e


def check_declared_size(path: Path, shape, itemsize: int, data_offset: int,
                        compressed: bool, cap_only: bool = False) -> None:
    """Refuses a header that declares more voxels than the file can hold or the cap.

    Runs before any voxel is read, so a tiny file declaring 1000^3 voxels fails at once
    instead of allocating gigabytes.

    Args:
      path: the file (named in the message).
      shape: the declared array shape.
      itemsize: bytes per voxel on disk.
      data_offset: bytes before the voxels (NIfTI ``vox_offset``).
      compressed: the file is gzip/zlib-compressed (bounded by the DEFLATE ratio, and
        refused above :data:`BOMB_FLOOR_BYTES` declared at more than :data:`BOMB_RATIO`
        times its size).
      cap_only: check only the voxel cap (the voxels live in another file).

    Raises:
      DataError: a declared size the file cannot hold, more voxels than the cap, or a
        decompression bomb; the message says what the header declares.
    """
    n_voxels = int(np.prod([int(n) for n in shape], dtype=object))
    cap = max_voxels()
    dims = " x ".join(str(int(n)) for n in shape)
    if n_voxels > cap:
        raise DataError(f"{path}: header declares {dims} = {n_voxels} voxels, more than the "
                        f"cap of {cap} (raise it with SCT_JAX_MAX_VOXELS if this is real)")
    if cap_only:
        return
    need = n_voxels * int(itemsize)
    size = path.stat().st_size
    if compressed and need > BOMB_FLOOR_BYTES and need > BOMB_RATIO * max(size, 1):
        raise DataError(f"{path}: header declares {dims} voxels = {need / 2**20:.0f} MiB "
                        f"uncompressed from a {size / 2**10:.0f} KiB file "
                        f"({need / max(size, 1):.0f}x; refused above {BOMB_RATIO}x for over "
                        f"{BOMB_FLOOR_BYTES // 2**20} MiB): a decompression bomb or a "
                        "corrupt header (re-save a real volume uncompressed, .nii)")
    can_hold = size * _MAX_DEFLATE_RATIO if compressed else size - int(data_offset)
    if need > can_hold:
        what = "compressed to" if compressed else "but the file holds"
        raise DataError(f"{path}: header declares {dims} voxels ({need} bytes) {what} "
                        f"{size} bytes: truncated or corrupt header")


def check_affine(path: str | os.PathLike, affine: np.ndarray) -> None:
    """Refuses a voxel-to-world affine no geometry can be computed from.

    A zero, NaN or singular affine (a header with zero pixdims and no qform/sform, a
    broken converter) would otherwise fail deep in the orientation code with a
    traceback, or put the sCT nowhere.

    Args:
      path: the file (named in the message).
      affine: its ``(4, 4)`` voxel -> world affine.

    Raises:
      DataError: non-finite entries, a zero voxel size, or axes that are not
        independent (a singular matrix).
    """
    linear = np.asarray(affine, np.float64)[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: the voxel-to-world affine holds NaN or Inf (a broken "
                        "header: qform/sform or pixdim)")
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise DataError(f"{path}: the voxel-to-world affine gives a zero voxel size "
                        f"({' x '.join(f'{s:g}' for s in spacing)} mm): a broken header "
                        "(pixdim, qform/sform)")
    # |det| relative to the product of the axis lengths: 1 for orthogonal axes, 0 for
    # axes that lie in one plane (no 3D grid).
    if abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(spacing)):
        raise DataError(f"{path}: the voxel-to-world affine is singular (its voxel axes "
                        "are not independent): a broken header (qform/sform)")


def _load_nifti(path: Path, dtype):
    try:
        img = nib.load(str(path))
        header = img.header
        offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
        # Before the voxels are read: a broken geometry needs no gigabytes to be found.
        check_affine(path, img.affine)
        check_declared_size(path, header.get_data_shape(), header.get_data_dtype().itemsize,
                            offset,
                            compressed=str(path).lower().endswith(".gz"))
        data = np.asarray(img.dataobj, dtype=dtype)
    except (OSError, EOFError, ValueError, OverflowError, MemoryError, zlib.error,
            gzip.BadGzipFile, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as e:
        # A corrupt header raises HeaderDataError (bad data code), OverflowError (negative
        # dims) or MemoryError (absurd dims): all are "this file is broken" to the user.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: unreadable or truncated NIfTI ({first_line})") from e
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def _load_metaimage(path: Path, dtype):
    try:
        import SimpleITK as sitk
    except ImportError as e:
        raise DataError(f"{path}: reading .mha/.mhd needs SimpleITK "
                        "(pip install 'sct_jax[mha]')") from e
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        # Bounded as if compressed (at least 1 byte per voxel): the header alone does
        # not say whether it is. A .mhd keeps its voxels in another file: only the cap.
        check_declared_size(path, reader.GetSize(), 1, 0, compressed=True,
                            cap_only=path.suffix.lower() == ".mhd")
        img = reader.Execute()
    except RuntimeError as e:
        raise DataError(f"{path}: unreadable MetaImage") from e
    # The axis and direction handling below assumes a scalar 3D image; anything else
    # (2D, 4D, vector pixels) is reported instead of failing in a transpose.
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a 3D scalar volume, got a {img.GetDimension()}D "
                        f"image of size {img.GetSize()} with "
                        f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    # SimpleITK arrays are (Z, Y, X); transpose to the NIfTI-like (X, Y, Z).
    data = np.asarray(sitk.GetArrayFromImage(img), dtype=dtype).transpose(2, 1, 0)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = img.GetOrigin()
    return data, lps_to_ras(lps), None


def save_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
                header: Any = None, dtype=None) -> Path:
    """Writes ``data`` with ``affine`` (and the fields of ``header``) atomically.

    Args:
      path: target ``.nii``/``.nii.gz`` (or ``.mha`` with SimpleITK).
      data: ``(X, Y, Z)`` array.
      affine: ``(4, 4)`` voxel -> RAS+ mm.
      header: a nibabel header to copy fields from (e.g. the MR's), or ``None``.
      dtype: on-disk dtype; default: that of ``data`` (bool is written as uint8).

    Returns:
      The written path.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    # .mhd is left out: its voxels go to a separate .raw file named after the temporary
    # header, which the atomic rename would leave behind under the temporary name.
    writable = NIFTI_SUFFIXES + (".mha",)
    if suffix not in writable:
        raise DataError(f"{path}: unsupported output type (expected one of "
                        f"{', '.join(writable)})")
    data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    if data.dtype == bool:  # NIfTI has no boolean type: a mask is stored as uint8
        data = data.astype(np.uint8)
    # The full suffix (.nii.gz): nibabel picks the format from the file name.
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix in NIFTI_SUFFIXES:
            hdr = header.copy() if isinstance(header, nib.Nifti1Header) else None
            # An explicit dtype: nibabel refuses int64 data without one.
            img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=hdr,
                                  dtype=data.dtype)
            # Write raw values: a copied header's scl_slope would rescale them again.
            img.header.set_slope_inter(1.0, 0.0)
            if hdr is not None and np.allclose(hdr.get_best_affine(), affine, rtol=0,
                                               atol=1e-5):
                # The reference's own grid: keep its qform and sform and their codes.
                img.set_qform(hdr.get_qform(), code=int(hdr["qform_code"]))
                img.set_sform(hdr.get_sform(), code=int(hdr["sform_code"]))
            else:
                img.set_qform(affine, code=1)
                img.set_sform(affine, code=1)
            nib.save(img, tmp)
        else:
            _save_metaimage(path, tmp, data, affine)
    return path


def _save_metaimage(path: Path, tmp: str, data: np.ndarray, affine: np.ndarray) -> None:
    try:
        import SimpleITK as sitk
    except ImportError as e:
        raise DataError(f"{path}: writing .mha needs SimpleITK") from e
    lps = ras_to_lps(affine)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.asarray(data).transpose(2, 1, 0))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing[None, :]).ravel()))
    img.SetOrigin(tuple(float(v) for v in lps[:3, 3]))
    sitk.WriteImage(img, tmp, True)


def save_like(path: str | os.PathLike, data: np.ndarray, reference: Volume,
              dtype=None) -> Path:
    """Writes ``data`` on the grid (affine and header) of ``reference``."""
    if tuple(data.shape) != reference.shape:
        raise DataError(f"{path}: shape {tuple(data.shape)} differs from the reference "
                        f"grid {reference.shape}")
    return save_volume(path, data, reference.affine, reference.header, dtype=dtype)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes a text file (CSV, JSON, HTML) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


# tempfile.mkstemp's random part: 8 of these characters (CPython's _RandomNameSequence).
_TEMP_RANDOM = "[a-z0-9_]{8}"
# Output names longer than this are cut in the temporary name (NAME_MAX is 255 bytes).
_TEMP_NAME_CHARS = 128


def _temp_prefix(path: Path) -> str:
    return f".tmp-{path.name[:_TEMP_NAME_CHARS]}."


def _temp_suffix(path: Path, suffix: str | None) -> str:
    return path.suffix if suffix is None else suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` that becomes ``path`` when the block succeeds.

    Every output of the project is written this way, so a reader never sees a half
    file and a failed write leaves nothing behind::

        with atomic_path(out / "panel.png") as tmp:
            fig.savefig(tmp, format="png")

    The temporary file is ``.tmp-<name>.<8 random characters><suffix>`` (``<name>`` the
    final file name): a process killed outright (SIGKILL, power loss) cannot remove it,
    and the name lets :func:`remove_stale_temps` find exactly the leftovers of one
    output.

    Args:
      path: the final file (its folder is created).
      suffix: the temporary name's suffix (default ``path``'s last suffix); writers
        that choose the format from the name need the full one (``.nii.gz``).

    Yields:
      The temporary path (an empty file, readable by everyone once renamed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_temp_suffix(path, suffix),
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stale_temps(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Temporary files :func:`atomic_path` left beside ``path`` (a killed writer).

    Only names of exactly the pattern :func:`atomic_path` uses for this output (and
    this ``suffix``) are listed: no other file can match.
    """
    path = Path(path)
    pattern = re.compile(re.escape(_temp_prefix(path)) + _TEMP_RANDOM
                         + re.escape(_temp_suffix(path, suffix)) + r"\Z")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir()
                  if pattern.match(p.name) and p.is_file() and not p.is_symlink())


def remove_stale_temps(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Removes :func:`stale_temps` of ``path``; returns what was removed.

    Call it before writing ``path`` again. Two processes writing the same output at
    once are not supported (one could remove the other's temporary file).
    """
    removed = []
    for stale in stale_temps(path, suffix):
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
