"""What ``sct-predict -i`` accepts, where each sCT goes, and what is refused up front.

An input is one MR volume file (``.nii``, ``.nii.gz``, ``.mha``), a folder holding one
DICOM MR series (:mod:`sct_jax.inference.dicom`), or a folder of MR volume files.
:func:`plan` resolves it into ``(name, source, output)`` jobs and refuses, before
anything is read or written, every output (sCT, std map, report) that would land on or
in an input: an MR, the mask, a SynthRAD case folder (an MR with its CT or mask), the
model's files, a run's checkpoints; or that cannot be written (an existing folder
where a file is meant, a path under a file, a folder without write permission).
:func:`check_grid_size` and :func:`load_mask` are the per-input checks that need the
MR's header or voxels; the command runs them for every input before the model loads.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sct_jax.data.io import (NIFTI_SUFFIXES, VOLUME_SUFFIXES, Volume, load_volume,
                            max_voxels, volume_suffix)
from sct_jax.errors import ConfigError, DataError
from sct_jax.inference.dicom import is_dicom_file, load_dicom_series
from sct_jax.inference.geometry import ModelGrid
from sct_jax.io_guard import refuse_overwrite

# Name endings of what sct-predict writes (``<name>_sct.nii.gz``, ``<name>_std.nii.gz``,
# ``<name>_sct_std.nii.gz``): such files in a folder of MRs are an earlier run's
# outputs, never MRs to predict.
OWN_OUTPUT_ENDINGS = ("_sct", "_std")


@dataclasses.dataclass(frozen=True)
class Job:
    """One MR to predict: ``source`` (file or DICOM folder) -> ``output`` NIfTI."""

    name: str
    source: Path
    output: Path
    dicom: bool = False

    @property
    def std_output(self) -> Path:
        """Where the per-voxel standard deviation of ``--samples K``, ``--tta`` or an
        ensemble goes."""
        return std_path(self.output)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved command.

    Attributes:
      jobs: the inputs to predict, in order.
      done: with ``resume``, the inputs whose sCT already exists (not predicted again).
      skipped: files of an input folder that are earlier sct-predict outputs
        (``*_sct``, ``*_std``), left out of the jobs.
    """

    jobs: list[Job]
    done: list[Job]
    skipped: list[Path]


def std_path(output: Path) -> Path:
    """``<name>_std<suffix>`` beside an sCT ``<name><suffix>``."""
    suffix = volume_suffix(output)
    return output.with_name(output.name[:-len(suffix)] + "_std" + suffix)


def _stem(path: Path) -> str:
    suffix = volume_suffix(path)
    return path.name[:-len(suffix)] if suffix else path.name


def is_own_output(path: Path) -> bool:
    """Whether a volume file's name is one sct-predict writes (``*_sct``, ``*_std``)."""
    return bool(volume_suffix(path)) and _stem(path).endswith(OWN_OUTPUT_ENDINGS)


def _jobs(src: Path, out: Path, out_is_file: bool) -> tuple[list[Job], list[Path]]:
    """The jobs of ``-i src -o out`` and the earlier outputs skipped in a folder."""
    if src.is_file():
        if not volume_suffix(src):
            raise DataError(f"{src}: unsupported file type (expected one of "
                            f"{', '.join(VOLUME_SUFFIXES)}, or a DICOM series folder)")
        return [Job(_stem(src), src, out if out_is_file else out / f"{_stem(src)}_sct.nii.gz")], []
    if not src.is_dir():
        raise DataError(f"{src}: not a file or folder")
    if not out_is_file and out.resolve() == src.resolve():
        raise DataError(f"{out}: is the input folder; give another output folder")
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    skipped = [p for p in files if is_own_output(p)]
    volumes = [p for p in files if volume_suffix(p) and p not in skipped]
    dicoms = [p for p in files if not volume_suffix(p) and is_dicom_file(p)]
    if volumes and dicoms:
        raise DataError(f"{src}: holds both MR volume files and DICOM files; give one "
                        "file, a DICOM series folder or a folder of MR files")
    if dicoms:
        return [Job(src.name, src, out if out_is_file else out / f"{src.name}_sct.nii.gz",
                    dicom=True)], skipped
    if not volumes:
        earlier = f" (only {len(skipped)} earlier sct-predict outputs)" if skipped else ""
        raise DataError(f"{src}: no MR volume ({', '.join(VOLUME_SUFFIXES)}) or DICOM "
                        f"file found{earlier}")
    if out_is_file and len(volumes) > 1:
        raise DataError(f"{out}: {len(volumes)} MR files in {src} need an output folder, "
                        "not a file")
    return [Job(_stem(p), p, out if out_is_file else out / f"{_stem(p)}_sct.nii.gz")
            for p in volumes], skipped


def plan(input_path: str | os.PathLike, output: str | os.PathLike, *,
         mask: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
         samples: int = 1, std_maps: bool | None = None, resume: bool = False,
         model_files: Sequence[Path] = (), protect: Sequence[Path] = ()) -> Plan:
    """Resolves ``-i`` and ``-o`` into jobs and checks every output path.

    Args:
      input_path: an MR file, a DICOM series folder or a folder of MR files (earlier
        outputs in it, ``*_sct``/``*_std``, are skipped).
      output: a ``.nii``/``.nii.gz`` file (single input only) or a folder that
        receives ``<name>_sct.nii.gz`` per input.
      mask: the ``--mask`` file (an input; single input only).
      report: the ``--report`` file, or ``None``.
      samples: sCT samples per MR; with more than 1 the std maps are outputs too.
      std_maps: whether the std maps are outputs (default: ``samples > 1``; an
        ensemble or test-time augmentation writes them too).
      resume: put the inputs whose sCT exists in ``done`` instead of ``jobs``.
      model_files: the model's files (inputs: no output may replace one).
      protect: folders no output may land in (a run's checkpoints, an exported model).

    Raises:
      DataError: a missing or unusable input, or an output that resolves onto or into
        an input, into a case folder or a protected folder, or that cannot be written.
      ConfigError: ``--mask`` with several inputs.
    """
    src, out = Path(input_path), Path(output)
    if not src.exists():
        raise DataError(f"{src}: input not found")
    out_is_file = volume_suffix(out) in NIFTI_SUFFIXES
    if volume_suffix(out) and not out_is_file:
        raise DataError(f"{out}: the sCT is written as NIfTI (.nii or .nii.gz), or give "
                        "a folder")
    jobs, skipped = _jobs(src, out, out_is_file)
    if std_maps is None:
        std_maps = samples > 1
    if mask is not None and len(jobs) > 1:
        raise ConfigError("--mask: only with a single input MR")
    names = [j.output.resolve() for j in jobs]
    if len(set(names)) != len(names):
        raise DataError(f"{src}: two inputs map to the same output name")
    sources = [j.source for j in jobs]
    inputs = [*sources, mask, *model_files]
    folders = [s.resolve() for s in sources if s.is_dir()]
    outputs = []
    for job in jobs:
        targets = [(job.output, "-o")] + ([(job.std_output, f"the std map of {job.output}")]
                                          if std_maps else [])
        for path, what in targets:
            if any(path.resolve().is_relative_to(f) for f in folders):
                raise DataError(f"{path}: {what} would write into the input {job.source}; "
                                "choose another output")
            refuse_overwrite(path, inputs, what=what, case_folder=True, protect=protect)
            outputs.append(path)
    if report is not None:
        report = Path(report)
        clash = next((o for o in outputs if o.resolve() == report.resolve()), None)
        if clash is not None:
            raise DataError(f"{report}: --report is the output {clash}; give another name")
        refuse_overwrite(report, inputs, what="--report", case_folder=True, protect=protect)
    done = [j for j in jobs if resume and j.output.is_file()]
    return Plan([j for j in jobs if j not in done], done, skipped)


def load_job(job: Job) -> Volume:
    """The job's MR as a :class:`Volume` (DICOM: voxel order (columns, rows, slices))."""
    if job.dicom:
        return load_dicom_series(job.source)
    return load_volume(job.source)


def load_mask(path: str | os.PathLike, mr: Volume) -> np.ndarray:
    """The ``--mask`` file as ``(X, Y, Z)`` bool on the MR's grid.

    Raises:
      DataError: unreadable, on another grid (shape or affine), or empty.
    """
    volume = load_volume(path)
    if volume.shape != mr.shape or not np.allclose(volume.affine, mr.affine, atol=1e-3):
        raise DataError(f"{path}: the mask's grid {volume.shape} differs from the MR's "
                        f"{mr.shape} (shape or affine)")
    mask = volume.data > 0
    if not mask.any():
        raise DataError(f"{path}: empty mask (no voxel > 0)")
    return mask


def _dims(values, fmt: str = "d") -> str:
    return " x ".join(format(v, fmt) for v in values)


def check_grid_size(job: Job, mr: Volume, grid: ModelGrid) -> None:
    """Refuses an MR whose grid at the training spacing exceeds the voxel cap.

    A small, coarse MR (128 x 128 x 32 at 10 mm) resampled to a 1 x 1 x 2.5 mm
    training grid becomes 1280 x 1280 x 128 voxels: minutes and gigabytes for a
    200 KB file. The cap is the one on every volume read
    (:func:`sct_jax.data.io.max_voxels`, ``SCT_JAX_MAX_VOXELS``).

    Raises:
      DataError: the declared grid, the resampled grid, the cap and how to raise it.
    """
    n_voxels = int(np.prod(grid.model_shape, dtype=np.int64))
    cap = max_voxels()
    if n_voxels > cap:
        raise DataError(
            f"{job.source}: {_dims(mr.shape)} voxels of {_dims(mr.spacing, 'g')} mm become "
            f"{_dims(grid.model_shape)} = {n_voxels} voxels at the model's training spacing "
            f"{_dims(grid.model_spacing, '.3g')} mm, more than the cap of {cap} (raise it "
            "with SCT_JAX_MAX_VOXELS if this is real)")
