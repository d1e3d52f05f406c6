"""Score synthetic CTs as a treatment plan sees them: photon and proton dose, gamma, DVH, WEPL.

    sct-dose --ct ct.nii.gz --sct sct_a.nii.gz [sct_b.nii.gz ...] --mask mask.nii.gz \\
        [--target ptv.nii.gz | --target-center X Y Z --target-radius 25] \\
        [--organs rectum.nii.gz bladder.nii.gz] [--modality photon,proton] [--rx 2.0] \\
        --out results/dose

A plan is optimised on the CT per modality (cached in OUT/plan_<modality>/ and reused
while the CT, masks and settings are the same), and its beams and weights are recomputed
on each sCT. Written to OUT: dose_metrics.json (per sCT and modality: dose MAE where the
CT dose >= 90 % of Rx, target D98/D2/Dmean and organ D2/Dmean differences, all in % of
Rx; gamma pass rates at 2 %/2 mm and 1 %/1 mm, global, of the CT dose maximum, 10 %
low-dose cut-off; and the WEPL differences per beam angle in mm), the doses on the CT
grid (dose_ct_<modality>.nii.gz, dose_<sct stem>_<modality>.nii.gz, Gy), a DVH figure
(dvh_<sct stem>_<modality>.png) and a dose-difference figure
(dose_diff_<sct stem>_<modality>.png).

The WEPL proxy needs nothing optional (``--modality wepl``); photon/proton need the
``[dose]`` extra, and without it the command reports WEPL alone and prints how to
install it.

Exit status: 0 done; 1 a modality failed in pyradplan (the others, WEPL and the file are
still written; the error is in the file); 2 bad input, nothing written; 3 a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from sct_jax import guard
from sct_jax.data.io import Volume, atomic_write_text, load_volume, volume_suffix
from sct_jax.dose import compare, engine, wepl
from sct_jax.errors import DataError, RunFailed
from sct_jax.io_guard import refuse_overwrite

PROG = "sct-dose"
KNOWN_MODALITIES = ("photon", "proton", "wepl")
GAMMA_CUTOFF_PERCENT = compare.GAMMA_CUTOFF_PERCENT


def _parse_args(argv):
    parser = guard.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=guard.EXIT_STATUS_HELP)
    parser.add_argument("--ct", required=True, help="the planning CT (HU)")
    parser.add_argument("--sct", required=True, nargs="+", help="synthetic CTs on the CT grid")
    parser.add_argument("--mask", required=True, help="body mask (air outside, in both)")
    parser.add_argument("--target", help="target mask (default: a sphere, see --target-radius)")
    parser.add_argument("--target-center", nargs=3, type=float, metavar=("X", "Y", "Z"),
                        help="default target's centre, RAS+ mm (default: the body's "
                             "centre of mass)")
    parser.add_argument("--target-radius", type=float, default=25.0,
                        help="default target's radius in mm (default 25)")
    parser.add_argument("--organs", nargs="+", default=[], metavar="MASK",
                        help="organ masks (named after their files)")
    parser.add_argument("--modality", default="photon,proton",
                        help="comma list of photon, proton, wepl (default photon,proton; "
                             "WEPL is always reported)")
    parser.add_argument("--rx", type=float, default=2.0,
                        help="prescription in Gy: the target's mean dose on the CT (default 2)")
    parser.add_argument("--beams", choices=sorted(engine.BEAM_SETS["photon"]),
                        default=engine.DEFAULT_BEAM_SET["photon"],
                        help="photon beam set (protons: two lateral fields)")
    parser.add_argument("--dose-grid", type=float, default=3.0, metavar="MM",
                        help="dose grid voxel size in mm (default 3)")
    parser.add_argument("--out", required=True,
                        help="output folder (not an input's folder, nor in the CT's)")
    args = parser.parse_args(argv)
    args.modalities = [m.strip() for m in args.modality.split(",") if m.strip()]
    unknown = sorted(set(args.modalities) - set(KNOWN_MODALITIES))
    if unknown or not args.modalities:
        parser.error(f"--modality: unknown {', '.join(unknown) or '(empty)'}; expected a comma "
                     f"list of {', '.join(KNOWN_MODALITIES)}")
    if not args.rx > 0:
        parser.error(f"--rx: {args.rx:g} Gy; the prescription must be > 0")
    if not args.target_radius > 0 or not args.dose_grid > 0:
        parser.error("--target-radius and --dose-grid must be > 0")
    if args.target and args.target_center:
        parser.error("give --target or --target-center, not both")
    return args


def _inputs(args) -> list[str]:
    return [args.ct, *args.sct, args.mask, args.target, *args.organs]


def check_out(args) -> Path:
    """Refuses a missing input, and an --out that is an input, holds one (the folder of
    one), or lies in the case folder of the CT or the body mask (the case's own data)."""
    for item in filter(None, _inputs(args)):
        if not Path(item).is_file():
            raise DataError(f"{item}: file not found")
    out = Path(args.out)
    refuse_overwrite(out, _inputs(args), folder=True, what="--out")
    resolved = out.resolve()
    for item in (args.ct, args.mask):
        if resolved.is_relative_to(Path(item).resolve().parent):
            raise DataError(f"{out}: --out lies in the case folder of {item}; write "
                            "elsewhere")
    return resolved


def _stem(path: str) -> str:
    name = Path(path).name
    return name[: len(name) - len(volume_suffix(name))] if volume_suffix(name) else name


def load_inputs(args) -> dict:
    """Reads every volume and checks it lies on the CT's grid (nothing is written)."""
    ct = load_volume(args.ct)

    def same_grid(path: str, check_finite: bool = True) -> Volume:
        volume = load_volume(path, check_finite=check_finite)
        if volume.shape != ct.shape or not np.allclose(volume.affine, ct.affine, atol=1e-3):
            raise DataError(f"{path}: grid (shape {volume.shape}) differs from the CT's "
                            f"{ct.shape} or its affine; resample onto the CT grid first")
        return volume

    stems = [_stem(p) for p in args.sct]
    if len(set(stems)) != len(stems):
        raise DataError(f"{args.sct[0]}: the sCT file names must differ (their stems name "
                        "the outputs)")
    body = same_grid(args.mask).data > 0
    if not body.any():
        raise DataError(f"{args.mask}: empty body mask")
    organs = {_stem(p): same_grid(p).data > 0 for p in args.organs}
    if len(organs) != len(args.organs):
        raise DataError(f"{args.organs[0]}: the organ file names must differ")
    if args.target:
        target = same_grid(args.target).data > 0
        if not (target & body).any():
            raise DataError(f"{args.target}: the target holds no body voxel")
        target_note = f"target mask {args.target}"
    else:
        target = engine.default_target(body, ct.affine, args.target_radius, args.target_center)
        where = (f"{args.target_center} mm" if args.target_center
                 else "the body's centre of mass")
        target_note = f"sphere of radius {args.target_radius:g} mm at {where}"
    scts = {stem: same_grid(p).data for stem, p in zip(stems, args.sct)}
    return {"ct": ct, "body": body, "target": target & body, "organs": organs, "scts": scts,
            "target_note": target_note}


def _wepl(args, data) -> dict:
    affine = data["ct"].affine
    if args.target:
        target = wepl.mask_target(data["target"], affine)
    else:
        centre = (args.target_center if args.target_center
                  else wepl.body_center_mm(data["body"], affine))
        target = wepl.sphere_target(centre, args.target_radius)
    return {stem: wepl.wepl_differences(data["ct"].data, sct, data["body"], affine,
                                        target=target)
            for stem, sct in data["scts"].items()}


def _main(args) -> int:
    out = check_out(args)
    data = load_inputs(args)
    modalities = [m for m in args.modalities if m in engine.MODALITIES]
    note = None
    if modalities and not engine.has_pyradplan():
        note = f"photon/proton dose skipped, WEPL only: {engine.INSTALL_HINT}"
        print(f"note: {note}", file=sys.stderr, flush=True)
        modalities = []
    report = {"inputs": {"ct": args.ct, "scts": args.sct, "mask": args.mask,
                         "target": args.target, "organs": args.organs},
              "rx_gy": args.rx, "target": data["target_note"], "modalities": modalities,
              "dose_grid_mm": args.dose_grid, "note": note,
              "conventions": {
                  "differences": "sCT - CT, % of rx", "dose_mae": "CT dose >= 90 % of rx",
                  "gamma": f"global, % of the CT dose maximum, {GAMMA_CUTOFF_PERCENT:g} % "
                           "low-dose cut-off",
                  "normalisation": "plan scaled so the target's mean CT dose is rx",
                  "wepl": "mm, sCT - CT, beam angles IEC (0 anterior, 90 patient's left)"},
              "wepl": _wepl(args, data), "dose": {}}
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for modality in modalities:
        try:
            report["dose"][modality] = compare.run_modality(
                data["ct"], data["scts"], data["body"], data["target"], data["organs"],
                modality, args.rx, out, beams=args.beams, dose_grid_mm=args.dose_grid)
        except RunFailed as e:  # the other modalities and WEPL are still worth having
            report["dose"][modality] = {"error": str(e)}
            failed.append(modality)
            print(f"warning: {e}", file=sys.stderr, flush=True)
    atomic_write_text(out / "dose_metrics.json", json.dumps(report, indent=1) + "\n")
    print(format_summary(report))
    print(f"wrote {out / 'dose_metrics.json'}")
    if failed:
        raise RunFailed(f"{out / 'dose_metrics.json'}: the {' and '.join(failed)} dose failed "
                        "(its error is in the file); the rest was written")
    return guard.EXIT_OK


def format_summary(report: dict) -> str:
    """One line per sCT and modality."""
    lines = []
    for stem, w in report["wepl"].items():
        lines.append(f"{stem} wepl: mean |dWEPL| distal {w['mean_abs_diff_distal']:.2f} mm, "
                     f"max {w['max_abs_diff_distal']:.2f} mm")
    for modality, result in report["dose"].items():
        for stem, m in result.get("scts", {}).items():
            lines.append(f"{stem} {modality}: dose MAE {m['dose_mae_percent_rx']:.2f} % Rx, "
                         f"gamma 2%/2mm {m['gamma_pass_2pct_2mm']:.1f} %, 1%/1mm "
                         f"{m['gamma_pass_1pct_1mm']:.1f} %, target D98 "
                         f"{m['target']['D98']['diff_percent_rx']:+.2f} % Rx")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 2 bad input, 3 bug)."""
    args = _parse_args(argv)
    return guard.run_main(lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
