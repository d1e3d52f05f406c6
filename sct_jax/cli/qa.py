"""Fidelity checks of one synthetic CT without a reference CT: a JSON report and a PNG.

Check a case (exit status 0: pass or warn, 1: fail, 2: bad input)::

    python -m sct_jax.cli.qa --mr mr.nii.gz --sct sct.nii.gz [--mask mask.nii.gz] \\
        --region pelvis --report qa/1PA001.json [--png qa/1PA001.png] \\
        [--reference profile.json] [--samples s1.nii.gz s2.nii.gz ...] \\
        [--cycle-mr mr_from_sct.nii.gz]

Build the reference profile ("training distribution") from training cases (folders with
``ct`` and ``mask`` volumes, e.g. ``data/phantom/Task1/pelvis/1PA001``)::

    python -m sct_jax.cli.qa --build-reference profile.json --cases DIR [DIR ...] [--region R]

The checks are in :mod:`sct_jax.evaluation.qa`, the figure in
:mod:`sct_jax.evaluation.qa_report`; this module reads the files and writes the outputs
atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from sct_jax.data.alignment import load_case_arrays
from sct_jax.data.io import Volume, atomic_write_text, load_volume
from sct_jax import guard
from sct_jax.errors import DataError
from sct_jax.evaluation import qa
# Re-exported: the figure this CLI writes, drawn by the prediction folders' QA as well.
from sct_jax.evaluation.qa_report import save_qa_figure
from sct_jax.io_guard import refuse_overwrite

# Below this |det| / (product of the voxel sizes) the axes span no volume.
_MIN_VOLUME_RATIO = 1e-6


def _measurable_grid(path, volume: Volume) -> Volume:
    """Refuses a grid the checks cannot measure millimetres on (they divide by the
    voxel size): a zero or non-finite voxel size, a non-finite or singular affine."""
    affine = np.asarray(volume.affine, np.float64)
    spacing = np.asarray(volume.spacing)
    finite = bool(np.all(np.isfinite(affine)))
    # |det| / product of the voxel sizes: 1 for orthogonal axes, 0 for a flat grid.
    volume_ratio = (abs(float(np.linalg.det(affine[:3, :3]))) / float(np.prod(spacing))
                    if finite and np.all(spacing > 0) else 0.0)
    if volume_ratio < _MIN_VOLUME_RATIO:
        sizes = ", ".join(f"{s:g}" for s in spacing)
        why = ("a non-finite affine" if not finite else "a zero voxel size"
               if not np.all(spacing > 0) else "axes that span no volume (singular affine)")
        raise DataError(f"{path}: unusable voxel grid (voxel size {sizes} mm: {why}); "
                        "fix the header's affine")
    return volume


def _same_grid(path, volume: Volume, mr: Volume) -> Volume:
    if volume.shape != mr.shape or not np.allclose(volume.affine, mr.affine, atol=1e-3):
        raise DataError(f"{path}: grid (shape {volume.shape}) differs from the MR's "
                        f"{mr.shape} or its affine; resample onto the MR grid first")
    return volume


def run_files(mr_path, sct_path, report_path, *, mask_path=None, png_path=None, region=None,
              reference_path=None, sample_paths=(), cycle_mr_path=None,
              input_kind: str = "mr") -> qa.QAResult:
    """Loads the volumes, runs :func:`sct_jax.evaluation.qa.run_qa`, writes JSON and PNG.

    Args:
      mr_path, sct_path: the MR and the sCT (same grid).
      report_path: the JSON report to write.
      mask_path: optional body mask; else one is derived from the MR.
      png_path: the figure; default ``report_path`` with ``.png``.
      region: ``"pelvis"``/``"brain"`` for the built-in ranges.
      reference_path: a profile JSON from ``--build-reference``.
      sample_paths: sCT samples of a stochastic method (>= 2 for the spread check).
      cycle_mr_path: G_CT->MR(sCT), computed elsewhere, for the cycle check.
      input_kind: ``"mr"``, or ``"cbct"`` when ``mr_path`` is a CBCT in HU.

    Returns:
      The :class:`sct_jax.evaluation.qa.QAResult`.
    """
    mr = _measurable_grid(mr_path, load_volume(mr_path))
    # Non-finite sCT voxels are a finding of the hu_range check, not a read error.
    sct = _same_grid(sct_path, load_volume(sct_path, check_finite=False), mr)
    mask = _same_grid(mask_path, load_volume(mask_path), mr).data if mask_path else None
    reference = None
    if reference_path:
        try:
            reference = json.loads(Path(reference_path).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{reference_path}: cannot read the reference profile "
                            f"({type(e).__name__})") from e
        reference = qa.validate_profile(reference, str(reference_path))
    samples = [_same_grid(p, load_volume(p), mr).data for p in sample_paths] or None
    ct_to_mr = None
    if cycle_mr_path:
        mr_hat = _same_grid(cycle_mr_path, load_volume(cycle_mr_path), mr).data
        ct_to_mr = lambda _sct: mr_hat  # noqa: E731 (computed by the generator elsewhere)
    result = qa.run_qa(mr.data, sct.data, mask, spacing=mr.spacing, region=region,
                       reference=reference, ct_to_mr=ct_to_mr, samples=samples,
                       input_kind=input_kind)
    result.report["inputs"] = {input_kind: str(mr_path), "sct": str(sct_path),
                               "mask": str(mask_path) if mask_path else None,
                               "reference": str(reference_path) if reference_path else None,
                               "samples": [str(p) for p in sample_paths],
                               "cycle_mr": str(cycle_mr_path) if cycle_mr_path else None}
    atomic_write_text(report_path, json.dumps(result.report, indent=1) + "\n")
    png_path = Path(png_path) if png_path else Path(report_path).with_suffix(".png")
    save_qa_figure(png_path, sct.data, result, mr.spacing, title=Path(sct_path).name)
    return result


def build_reference_file(out_path, case_dirs: Sequence[str], region: str | None = None) -> dict:
    """Writes the reference profile of the ``ct``/``mask`` volumes in ``case_dirs``."""
    profile = qa.build_reference_profile(
        (load_case_arrays(d)[1:] for d in case_dirs), region=region)
    profile["cases"] = [str(d) for d in case_dirs]
    atomic_write_text(out_path, json.dumps(profile, indent=1) + "\n")
    return profile


def _parse_args(argv):
    parser = guard.ArgumentParser(prog="python -m sct_jax.cli.qa", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 pass or warn; 1 fail; 2 bad input (one line naming the file, "
               "nothing written); 3 internal error (a bug: please report the traceback)")
    parser.add_argument("--mr", help="MR volume")
    parser.add_argument("--cbct", help="instead of --mr: the CBCT (HU) of a CBCT model's sCT "
                        "(CBCT outline; its field-of-view truncation is reported)")
    parser.add_argument("--sct", help="synthetic CT on the MR grid (HU)")
    parser.add_argument("--mask", help="body mask (default: derived from the MR)")
    parser.add_argument("--region", choices=sorted(qa.BUILTIN_RANGES),
                        help="built-in ranges to use without --reference")
    parser.add_argument("--reference", metavar="PROFILE.json", help="reference profile")
    parser.add_argument("--samples", nargs="+", default=[], metavar="S",
                        help="sCT samples (>= 2) of a stochastic method: per-voxel spread")
    parser.add_argument("--cycle-mr", metavar="MRHAT", help="G_CT->MR(sCT), for cycle consistency")
    parser.add_argument("--report", metavar="JSON", help="the JSON report to write")
    parser.add_argument("--png", help="the figure (default: the report path with .png)")
    parser.add_argument("--build-reference", metavar="OUT.json",
                        help="instead of checking a case, write the profile of --cases")
    parser.add_argument("--cases", nargs="+", default=[], metavar="DIR",
                        help="training case folders with ct and mask volumes")
    args = parser.parse_args(argv)
    if args.build_reference:
        if not args.cases:
            parser.error("--build-reference needs --cases DIR [DIR ...]")
    else:
        if args.mr and args.cbct:
            parser.error("--mr and --cbct: give one input")
        missing = [f"--{k}" for k in ("mr", "sct", "report") if not getattr(args, k)
                   and not (k == "mr" and args.cbct)]
        if missing:
            parser.error(f"missing {', '.join(missing)}")
        if not args.region and not args.reference:
            parser.error("give --region (built-in ranges) or --reference PROFILE.json")
        if len(args.samples) == 1:
            parser.error("--samples needs at least 2 volumes")
    return args


def check_outputs(args) -> None:
    """Refuses a --report/--png/--build-reference path that is one of the inputs."""
    inputs = [args.mr, args.cbct, args.sct, args.mask, args.reference, args.cycle_mr, *args.samples,
              *args.cases]
    if args.build_reference:
        refuse_overwrite(args.build_reference, inputs, what="--build-reference")
        return
    png = args.png or str(Path(args.report).with_suffix(".png"))
    refuse_overwrite(args.report, inputs, what="--report")
    refuse_overwrite(png, inputs + [args.report], what="--png")


def _main(args) -> int:
    check_outputs(args)
    if args.build_reference:
        profile = build_reference_file(args.build_reference, args.cases, args.region)
        print(f"wrote {args.build_reference} ({profile['n_cases']} cases)")
        return guard.EXIT_OK
    result = run_files(args.cbct or args.mr, args.sct, args.report, mask_path=args.mask,
                       png_path=args.png, region=args.region,
                       reference_path=args.reference, sample_paths=args.samples,
                       cycle_mr_path=args.cycle_mr, input_kind="cbct" if args.cbct else "mr")
    print(qa.format_report(result.report))
    return guard.EXIT_FAIL if result.status == "fail" else guard.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 pass/warn, 1 fail, 2 bad
    input, 3 internal error)."""
    args = _parse_args(argv)
    return guard.run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
