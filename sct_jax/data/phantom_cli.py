"""The phantom's command line (``python -m sct_jax.data.phantom``) and its preview panel.

    python -m sct_jax.data.phantom --out data/phantom --region pelvis --cases 20 --seed 0 \\
        [--task 2] [--misalign 4] [--anatomy-variation 0.2] [--shape 256 160 64] \\
        [--panel docs/images/phantom_pelvis.png] [--overwrite]

What the cases hold: :mod:`sct_jax.data.phantom`. A folder that already holds a dataset
made with other settings is refused (one ``error:`` line, exit 2) unless ``--overwrite``,
which replaces it as a whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sct_jax import guard
from sct_jax.data.io import atomic_path, load_volume
from sct_jax.data.phantom import (DEFAULT_SHAPE, MIN_SHAPE, REGIONS, TASKS, case_id,
                                  write_dataset)
from sct_jax.errors import DataError


def save_phantom_panel(case_dir, out_png) -> Path:
    """Saves a figure of one case: MR (task 2: CBCT) | CT | mask, axial (top) and coronal
    (bottom).

    Args:
      case_dir: a case folder with ``mr`` (or ``cbct``), ``ct`` and ``mask`` volumes.
      out_png: the PNG to write (atomically).

    Returns:
      The written path.
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    case_dir, out_png = Path(case_dir), Path(out_png)
    image = "cbct" if (case_dir / "cbct.nii.gz").is_file() else "mr"
    names = (image, "ct", "mask")
    vols = {name: load_volume(case_dir / f"{name}.nii.gz") for name in names}
    spacing = vols["ct"].spacing
    mask = vols["mask"].data > 0
    mr_top = (float(np.percentile(vols[image].data[mask], 99.5))
              if image == "mr" and mask.any() else None)
    # The CBCT is in HU too: the CT's window shows its shading and offsets as such.
    style = {"mr": dict(cmap="gray", vmin=0.0, vmax=mr_top),
             "cbct": dict(cmap="gray", vmin=-300.0, vmax=1200.0),
             "ct": dict(cmap="gray", vmin=-300.0, vmax=1200.0),
             "mask": dict(cmap="gray", vmin=0.0, vmax=1.0)}
    labels = {"mr": "MR (T1)", "cbct": "CBCT [-300, 1200] HU", "ct": "CT [-300, 1200] HU",
              "mask": "mask"}
    x, y, z = (n // 2 for n in vols["ct"].shape)
    views = [("axial", lambda a: a[:, :, z].T, spacing[1] / spacing[0]),
             ("coronal", lambda a: a[:, y, :].T, spacing[2] / spacing[0])]
    fig = Figure(figsize=(10.0, 7.0), dpi=110)
    axes = fig.subplots(2, 3)
    for row, (view, cut, aspect) in enumerate(views):
        for col, name in enumerate(names):
            ax = axes[row, col]
            ax.imshow(cut(vols[name].data), origin="lower", aspect=aspect,
                      interpolation="nearest", **style[name])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{labels[name]}, {view}", fontsize=9)
    fig.suptitle(f"phantom case {case_dir.name}", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return out_png


def _parse_args(argv):

    parser = guard.ArgumentParser(
        prog="python -m sct_jax.data.phantom",
        description="Write the built-in phantom dataset in the SynthRAD2023 layout: MR/CT "
                    "pairs (task 1) or CBCT/CT pairs (task 2).",
        epilog=guard.EXIT_STATUS_HELP)
    parser.add_argument("--out", required=True, help="dataset root folder")
    parser.add_argument("--region", choices=REGIONS, default="pelvis")
    parser.add_argument("--task", type=int, choices=TASKS, default=1,
                        help="1: MR -> CT, writes Task1/<region>/<id>/{mr,ct,mask}; 2: CBCT "
                             "-> CT, writes Task2/<region>/<id>/{cbct,ct,mask} (default 1)")
    parser.add_argument("--cases", type=int, default=20, help="number of cases (1..999)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (>= 0)")
    parser.add_argument("--misalign", type=float, default=0.0, metavar="MM",
                        help="MR/CT misalignment scale in mm (task 2: the residual "
                             "CBCT/CT motion; 0 = aligned)")
    parser.add_argument("--anatomy-variation", type=float, default=1.0, metavar="V",
                        help="how much anatomy varies between cases: 1 the full "
                             "population (default), 0.2 atlas-registered data (shapes and "
                             "positions pulled to the population's middle), 0 one anatomy")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="volume size in voxels (default: pelvis 256 160 64, "
                             "brain 128 160 128)")
    parser.add_argument("--panel", metavar="PNG",
                        help="also save a figure of the first case (MR or CBCT | CT | mask)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset made with other settings (as a "
                             "whole: never a mix of two datasets)")
    args = parser.parse_args(argv)
    if not 1 <= args.cases <= 999:
        parser.error(f"--cases {args.cases}: must be in 1..999")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: must be >= 0")
    if not (np.isfinite(args.misalign) and 0.0 <= args.misalign <= 50.0):
        parser.error(f"--misalign {args.misalign}: must be in [0, 50] mm")
    if not (np.isfinite(args.anatomy_variation) and 0.0 <= args.anatomy_variation <= 1.0):
        parser.error(f"--anatomy-variation {args.anatomy_variation}: must be in [0, 1]")
    if args.shape is not None and any(n < m for n, m in zip(args.shape, MIN_SHAPE)):
        parser.error(f"--shape {' '.join(map(str, args.shape))}: each size must be at least "
                     f"{' '.join(map(str, MIN_SHAPE))}")
    return args


def existing_dataset_differences(region_dir: Path, region: str, cases: int, seed: int,
                                 misalign_mm: float, shape, task: int = 1,
                                 anatomy_variation: float = 1.0) -> list[str]:
    """How the dataset already in ``region_dir`` differs from the requested one.

    Returns:
      ``["seed 0 -> 1", ...]``; empty when there is no dataset or it has these settings.
      A folder with case files but no readable manifest is reported as such.
    """
    if not region_dir.is_dir() or not any(region_dir.iterdir()):
        return []
    try:
        manifest = json.loads((region_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return ["the folder holds files but no readable manifest.json"]
    want = {"task": int(task), "region": region, "cases": int(cases), "seed": int(seed),
            "misalign_mm": float(misalign_mm),
            "shape": list(DEFAULT_SHAPE[region] if shape is None else map(int, shape)),
            "anatomy_variation": float(anatomy_variation)}
    have = {"task": manifest.get("task", 1), "region": manifest.get("region"),
            "cases": len(manifest.get("cases", [])),
            "seed": manifest.get("seed"), "misalign_mm": manifest.get("misalign_mm"),
            "shape": manifest.get("shape"),
            "anatomy_variation": manifest.get("anatomy_variation", 1.0)}
    return [f"{k} {have[k]} -> {want[k]}" for k in want if have[k] != want[k]]


def _replace_dataset(args, region_dir: Path) -> Path:
    """Writes the dataset beside ``region_dir`` and swaps it in as a whole."""
    import shutil

    staging = region_dir.parent / f".{region_dir.name}.new-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = write_dataset(staging, args.region, args.cases, args.seed, args.misalign,
                                args.shape, task=args.task,
                                anatomy_variation=args.anatomy_variation)
        old = region_dir.parent / f".{region_dir.name}.old-{os.getpid()}"
        os.replace(region_dir, old)
        os.replace(written, region_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return region_dir


def _main(args) -> int:

    region_dir = Path(args.out) / f"Task{args.task}" / args.region
    differences = existing_dataset_differences(region_dir, args.region, args.cases,
                                               args.seed, args.misalign, args.shape,
                                               args.task, args.anatomy_variation)
    if differences and not args.overwrite:
        raise DataError(f"{region_dir}: holds a dataset made with other settings "
                        f"({'; '.join(differences)}); pass --overwrite to replace it as a "
                        "whole, or choose another --out")
    if differences:
        region_dir = _replace_dataset(args, region_dir)
    else:
        region_dir = write_dataset(args.out, args.region, args.cases, args.seed,
                                   args.misalign, args.shape, task=args.task,
                                   anatomy_variation=args.anatomy_variation)
    print(f"wrote {args.cases} {args.region} cases to {region_dir}")
    if args.panel:
        first = case_id(args.region, 0, args.task)[0]
        print(f"wrote {save_phantom_panel(region_dir / first, args.panel)}")
    return guard.EXIT_OK


def main(argv=None) -> int:
    """Command line entry point; returns the exit status (0 ok, 2 bad input or a
    dataset with other settings in --out, 3 internal error)."""

    args = _parse_args(argv)
    return guard.run_main(lambda: _main(args))
