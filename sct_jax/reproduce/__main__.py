"""``sct-reproduce seed02|seed03 [--seeds N] [--tiny] [--out DIR]``: one seed's table."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from sct_jax.errors import SctError
from sct_jax.reproduce import table

SEEDS = {"seed02": "pGAN family under MR/CT misalignment, pelvis phantom",
         "seed03": "brain LDM (each conditioning) vs pix2pix, brain phantom"}


def _load(seed: str):
    try:
        return importlib.import_module(f"sct_jax.reproduce.{seed}")
    except ModuleNotFoundError as err:
        if err.name != f"sct_jax.reproduce.{seed}":
            raise
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sct-reproduce", description="Train a seed paper's methods on the phantom, "
        "score the held-out cases and write table.md and table.csv (mean ± std over seeds).")
    parser.add_argument("seed", choices=sorted(SEEDS), help="which seed paper")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--tiny", action="store_true",
                        help="each config's tiny variant: seconds, a smoke test only")
    parser.add_argument("--out", help="output folder (default runs/reproduce/<seed>[_tiny])")
    parser.add_argument("--vgg16", help="seed02: VGG-16 .npz for the perceptual term")
    parser.add_argument("--vgg19", help="seed02: VGG-19 .npz for CTX-pGAN")
    parser.add_argument("--only", help="train only these methods (run folder names, "
                        "comma-separated, e.g. seed02: pgan,meta_pgan_slice; seed03: "
                        "ldm_concat,pix2pix); the others are reported from their "
                        "finished runs")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.exit(2, f"error: --seeds {args.seeds}: need at least 1\n")
    for flag in ("vgg16", "vgg19"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.exit(2, f"error: {path}: --{flag} weights file not found\n")
    out = Path(args.out or f"runs/reproduce/{args.seed}{'_tiny' if args.tiny else ''}")
    if out.exists() and not out.is_dir():
        parser.exit(2, f"error: {out}: --out is a file, expected a folder\n")
    module = _load(args.seed)
    if module is None:
        parser.exit(2, f"error: sct_jax/reproduce/{args.seed}.py: {args.seed} is not "
                       "available in this version of sct_jax\n")
    extra = {"only": None if args.only is None else
             tuple(s.strip() for s in args.only.split(",") if s.strip())}
    if args.seed == "seed02":
        extra.update(vgg16=args.vgg16, vgg19=args.vgg19)
    t0 = time.perf_counter()
    try:
        rows = module.run(out, args.seeds, args.tiny, **extra)
    except SctError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    title = (f"{args.seed}: {SEEDS[args.seed]}; mean ± std over {args.seeds} seed(s)"
             f"{' (tiny: smoke test, not a result)' if args.tiny else ''}")
    md_path, csv_path = table.write_tables(out, rows, title)
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
