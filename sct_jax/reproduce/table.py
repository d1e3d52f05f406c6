"""Rows of a seed reproduction -> one markdown and one CSV table (mean ± std over seeds).

A row is a dict with ``method: str``, ``seed: int | None`` (``None`` for a baseline),
``mae``, ``psnr``, ``ssim``, ``ms_ssim``, ``bone_mae``, ``bone_dice``, ``bone_hd95``,
``air_dice``, ``air_hd95`` (floats, NaN when not applicable; the evaluation's metrics,
see :data:`sct_jax.reproduce.baselines.ROW_METRICS`), ``wall_s`` and ``note: str``; with
``sct-reproduce --dose`` also the :data:`DOSE_COLUMNS` (:mod:`sct_jax.reproduce.dose`),
which the tables show when some row has them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sct_jax.reproduce.ablate import format_cell as _cell
from sct_jax.data.io import atomic_write_text

# (row key, markdown heading, format)
COLUMNS = (("mae", "MAE [HU]", ".1f"), ("psnr", "PSNR [dB]", ".2f"), ("ssim", "SSIM", ".3f"),
           ("ms_ssim", "MS-SSIM", ".3f"),
           ("bone_mae", "bone MAE [HU]", ".1f"), ("bone_dice", "bone Dice", ".3f"),
           ("bone_hd95", "bone HD95 [mm]", ".1f"),
           ("air_dice", "air Dice", ".3f"), ("air_hd95", "air HD95 [mm]", ".1f"),
           ("wepl_distal", "dWEPL [mm]", ".2f"), ("wall_s", "wall [s]", ".0f"))
# Dose columns (sct-reproduce --dose), after the image metrics and before the wall time.
DOSE_COLUMNS = (("dose_mae_photon", "photon dose MAE [% Rx]", ".2f"),
                ("gamma_photon", "photon gamma 2%/2mm [%]", ".1f"),
                ("dose_mae_proton", "proton dose MAE [% Rx]", ".2f"),
                ("gamma_proton", "proton gamma 2%/2mm [%]", ".1f"))
ROW_KEYS = ("method", "seed") + tuple(key for key, _, _ in COLUMNS) + ("note",)


def _finite(values) -> list[float]:
    return [float(v) for v in values
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


def columns(entries: list[dict]) -> tuple:
    """:data:`COLUMNS`, with the :data:`DOSE_COLUMNS` before the wall time when some
    entry has a dose value."""
    if not any(math.isfinite(e.get(f"{key}_mean", math.nan))
               for e in entries for key, _, _ in DOSE_COLUMNS):
        return COLUMNS
    return COLUMNS[:-1] + DOSE_COLUMNS + COLUMNS[-1:]


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per method (first-seen order): ``n`` runs, ``<key>_mean``/``<key>_std``
    (sample std over seeds; NaN with fewer than 2) and the distinct notes joined. The
    dose columns are optional per row (NaN where a row has none)."""
    order, groups = [], {}
    for row in rows:
        missing = set(ROW_KEYS) - set(row)
        if missing:
            raise ValueError(f"row of {row.get('method')!r} lacks {sorted(missing)}")
        if row["method"] not in groups:
            order.append(row["method"])
            groups[row["method"]] = []
        groups[row["method"]].append(row)
    out = []
    for method in order:
        group = groups[method]
        entry = {"method": method, "baseline": all(r["seed"] is None for r in group),
                 "n": sum(r["seed"] is not None for r in group)}
        for key, _, _ in COLUMNS + DOSE_COLUMNS:
            values = _finite(r.get(key) for r in group)
            entry[f"{key}_mean"] = float(np.mean(values)) if values else math.nan
            entry[f"{key}_std"] = (float(np.std(values, ddof=1)) if len(values) > 1
                                   else math.nan)
        notes = []
        for r in group:
            if r["note"] and r["note"] not in notes:
                notes.append(r["note"])
        entry["note"] = "; ".join(notes)
        out.append(entry)
    return out


def markdown(entries: list[dict], title: str = "") -> str:
    """The aggregated entries as a markdown table (``seeds`` is ``-`` for baselines)."""
    shown = columns(entries)
    head = ["method", "seeds"] + [h for _, h, _ in shown] + ["note"]
    lines = [f"{title}\n" if title else "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for e in entries:
        cells = [e["method"], "-" if e["baseline"] else str(e["n"])]
        cells += [_cell(e[f"{k}_mean"], e[f"{k}_std"], f) for k, _, f in shown]
        cells.append(e["note"].replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line != "") + "\n"


def csv_text(entries: list[dict]) -> str:
    """The aggregated entries as CSV: method, seeds, <key>_mean, <key>_std ..., note."""
    keys = ["method", "seeds"] + [f"{k}_{s}" for k, _, _ in columns(entries)
                                  for s in ("mean", "std")]
    lines = [",".join(keys + ["note"])]
    for e in entries:
        cells = [f'"{e["method"]}"', "" if e["baseline"] else str(e["n"])]
        for key in keys[2:]:
            v = e[key]
            cells.append("" if math.isnan(v) else repr(float(v)))
        cells.append('"' + e["note"].replace('"', "'") + '"')
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def write_tables(out_dir: str | Path, rows: list[dict], title: str = "") -> tuple[Path, Path]:
    """Writes ``table.md`` and ``table.csv`` (both built first, each atomically)."""
    entries = aggregate(rows)
    md, csv = markdown(entries, title), csv_text(entries)
    out_dir = Path(out_dir)
    return atomic_write_text(out_dir / "table.md", md), atomic_write_text(out_dir / "table.csv", csv)
