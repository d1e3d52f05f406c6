"""``sct-reproduce seed02|seed03|synthrad_task2 [--seeds N] [--tiny] [--out DIR]
[--data ROOT [--region R] | --atlas] [--dose [--dose_rx GY]] [--samplers]``: one seed's
table, on the built-in phantom (``--atlas``: its atlas-like anatomy) or on a SynthRAD-layout
dataset, optionally with the dose columns (:mod:`sct_jax.reproduce.dose`) and (seed03) the
LDMs sampled with other samplers and step counts."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from sct_jax.config_utils import ATLAS_ANATOMY_VARIATION
from sct_jax.data.synthrad import REGIONS
from sct_jax.dose import engine
from sct_jax.errors import SctError
from sct_jax.reproduce import table

# seed -> (what it compares, the phantom it runs on without --data)
SEEDS = {"seed02": ("pGAN family under MR/CT misalignment", "pelvis phantom"),
         "seed03": ("brain LDM (each conditioning) vs pix2pix", "brain phantom"),
         "synthrad_task2": ("CBCT -> CT (SynthRAD Task 2): brain LDM and pix2pix on CBCT input",
                            "brain phantom's CBCTs")}


def _load(seed: str):
    try:
        return importlib.import_module(f"sct_jax.reproduce.{seed}")
    except ModuleNotFoundError as err:
        if err.name != f"sct_jax.reproduce.{seed}":
            raise
        return None


def default_out(seed: str, tiny: bool, data: str | None, region: str | None,
                atlas: bool = False) -> Path:
    """``runs/reproduce/<seed>[_<data folder>[_<region>]][_atlas][_tiny]``: a table of a
    user's dataset never lands in (or reuses the runs of) the phantom's folder, nor one of
    another dataset, region or phantom anatomy."""
    name = seed
    if data:
        name += f"_{Path(data).expanduser().resolve().name}" + (f"_{region}" if region else "")
    name += "_atlas" if atlas else ""
    return Path("runs/reproduce") / f"{name}{'_tiny' if tiny else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sct-reproduce", description="Train a seed paper's methods on the phantom "
        "(or --data), score the held-out cases and write table.md and table.csv (mean ± "
        "std over seeds).")
    parser.add_argument("seed", choices=sorted(SEEDS), help="which table: a seed paper's, or SynthRAD Task 2 (CBCT -> CT)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--tiny", action="store_true",
                        help="each config's tiny variant: seconds, a smoke test only")
    parser.add_argument("--out", help="output folder (default runs/reproduce/<seed>[_tiny]; "
                        "with --data runs/reproduce/<seed>_<data folder>[_<region>][_tiny])")
    parser.add_argument("--data", metavar="ROOT",
                        help="a SynthRAD-layout dataset (ROOT/<region>/<id>/{mr,ct,mask}.nii.gz "
                        "or ROOT/Task1/<region>/...; synthrad_task2: {cbct,ct,mask}, "
                        "ROOT/Task2/<region>/...) instead of the phantom; the configs' "
                        "data.split gives the test cases")
    parser.add_argument("--region", help=f"with --data: the region to use "
                        f"({', '.join(REGIONS)}; default: the seed's own)")
    parser.add_argument("--vgg16", help="seed02: VGG-16 .npz for the perceptual term")
    parser.add_argument("--vgg19", help="seed02: VGG-19 .npz for CTX-pGAN")
    parser.add_argument("--only", help="train only these methods (run folder names, "
                        "comma-separated, e.g. seed02: pgan,meta_pgan_slice; seed03 and "
                        "synthrad_task2: ldm_concat,pix2pix; seed03 also ldm_concat_flow); the others are reported from "
                        "their "
                        "finished runs")
    parser.add_argument("--dose", action="store_true",
                        help="also score every row by dose: photon and proton plans on each "
                        "test CT (cached in <out>/dose/), recomputed on each sCT; adds dose "
                        "MAE and gamma 2%%/2mm columns (needs the [dose] extra; minutes per "
                        "row and test case on a CPU)")
    parser.add_argument("--atlas", action="store_true",
                        help="the phantom with atlas-like anatomy (data.phantom."
                        "anatomy_variation=0.2, the configs' atlas word): every case near a "
                        "common anatomy, where the mean training CT is a strong baseline")
    parser.add_argument("--dose_rx", type=float, default=2.0,
                        help="with --dose: the prescription in Gy (default 2)")
    parser.add_argument("--samplers", action="store_true",
                        help="seed03: also sample each finished LDM (MR concat) run, "
                        "v-prediction and rectified flow, with other samplers and step "
                        "counts (DDIM 50; Euler 10, 20; DPM-Solver++(2M) 10, 20, 30): one "
                        "row each, with its seconds per sample")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.exit(2, f"error: --seeds {args.seeds}: need at least 1\n")
    for flag in ("vgg16", "vgg19"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.exit(2, f"error: {path}: --{flag} weights file not found\n")
    if args.region is not None and not args.data:
        parser.exit(2, f"error: --region {args.region}: needs --data (the phantom's region "
                       "is the seed's own)\n")
    if args.region is not None and args.region not in REGIONS:
        parser.exit(2, f"error: --region {args.region}: unknown region (expected one of "
                       f"{', '.join(REGIONS)})\n")
    if not args.dose_rx > 0:
        parser.exit(2, f"error: --dose_rx {args.dose_rx:g}: need a prescription above 0 Gy\n")
    if args.dose:
        try:
            engine.require_pyradplan()
        except SctError as err:
            parser.exit(2, f"error: --dose: {err}\n")
    if args.samplers and args.seed != "seed03":
        parser.exit(2, f"error: --samplers: only seed03 has sampler rows (not {args.seed})\n")
    if args.atlas and args.data:
        parser.exit(2, f"error: --atlas: sets the phantom's anatomy; with --data {args.data} "
                       "there is no phantom\n")
    if args.data and not Path(args.data).expanduser().is_dir():
        parser.exit(2, f"error: {args.data}: --data folder not found\n")
    out = Path(args.out) if args.out else default_out(args.seed, args.tiny, args.data,
                                                      args.region, args.atlas)
    if out.exists() and not out.is_dir():
        parser.exit(2, f"error: {out}: --out is a file, expected a folder\n")
    module = _load(args.seed)
    if module is None:
        parser.exit(2, f"error: sct_jax/reproduce/{args.seed}.py: {args.seed} is not "
                       "available in this version of sct_jax\n")
    extra = {"only": None if args.only is None else
             tuple(s.strip() for s in args.only.split(",") if s.strip()),
             # Absolute: the runs' config.json (and digests) name the data wherever
             # the command is run from.
             "data_root": str(Path(args.data).expanduser().absolute()) if args.data else None,
             "region": args.region, "dose_rx": args.dose_rx if args.dose else None,
             "anatomy_variation": ATLAS_ANATOMY_VARIATION if args.atlas else 1.0}
    if args.seed == "seed02":
        extra.update(vgg16=args.vgg16, vgg19=args.vgg19)
    if args.seed == "seed03":
        extra.update(samplers=args.samplers)
    t0 = time.perf_counter()
    try:
        rows = module.run(out, args.seeds, args.tiny, **extra)
    except SctError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    compared, phantom = SEEDS[args.seed]
    data = (f"{args.data}" + (f" ({args.region})" if args.region else "")) if args.data \
        else phantom + (" with atlas-like anatomy" if args.atlas else "")
    title = (f"{args.seed}: {compared}, {data}; mean ± std over {args.seeds} seed(s)"
             f"{' (tiny: smoke test, not a result)' if args.tiny else ''}")
    md_path, csv_path = table.write_tables(out, rows, title)
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
