"""A results table in Markdown from an evaluation's ``metrics.json``: the model (mean ±
std over the cases) and every baseline of the report, in the report's order.

  python -m sct_jax.evaluation.markdown runs/pix2pix_pelvis_small/predictions/metrics.json \
      [--label "pix2pix small"]

The README's results tables are made this way, not typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

# (metric key, heading, format): what the README's tables show.
COLUMNS = (("mae", "MAE [HU]", ".1f"), ("psnr", "PSNR [dB]", ".2f"), ("ssim", "SSIM", ".3f"),
           ("ms_ssim", "MS-SSIM", ".3f"), ("mae_bone", "bone MAE [HU]", ".1f"),
           ("dice_bone", "bone Dice", ".3f"), ("hd95_bone", "bone HD95 [mm]", ".2f"),
           ("dice_air", "air Dice", ".3f"), ("lpips", "LPIPS", ".4f"),
           ("wepl_center", "dWEPL centre [mm]", ".2f"),
           ("wepl_distal", "dWEPL distal [mm]", ".2f"),
           ("slice_step_excess", "z-step excess [HU]", ".1f"),
           ("high_freq_excess", "HF excess [HU]", ".1f"))


def _number(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"  # strict JSON writes NaN (a metric not computed) as null
    if isinstance(value, str):
        return value  # "inf" / "-inf", as strict JSON writes them
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(float(value), fmt)


def table(doc: Mapping, label: str = "model",
          columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    """The Markdown table of a ``metrics.json`` document (see the module docstring)."""
    lines = ["| | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    cells = []
    for key, _, fmt in columns:
        stats = doc["metrics"].get(key, {})
        mean, std = stats.get("mean"), stats.get("std")
        text = _number(mean, fmt)
        if stats.get("n", 0) > 1 and isinstance(mean, (int, float)) and math.isfinite(mean) \
                and isinstance(std, (int, float)):
            text += f" ± {_number(std, fmt)}"
        cells.append(text)
    lines.append(f"| {label} ({doc['n_scored']} cases) | " + " | ".join(cells) + " |")
    for baseline in doc.get("baselines", {}).values():
        lines.append(f"| {baseline['label']} | " + " | ".join(
            _number(baseline["mean"].get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sct_jax.evaluation.markdown",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics_json", help="an evaluation's metrics.json")
    parser.add_argument("--label", default="model", help="the model row's label")
    args = parser.parse_args(argv)
    path = Path(args.metrics_json)
    try:
        doc = json.loads(path.read_text())
        text = table(doc, args.label)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {path}: not an evaluation's metrics.json ({err})", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
