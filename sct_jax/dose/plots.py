"""Figures of a dose comparison: the DVH (CT solid, sCT dashed) and a dose-difference panel.

Drawn with matplotlib's object API (``Figure``: the Agg canvas, no display, no pyplot
state) and written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from sct_jax.data.io import atomic_path
from sct_jax.dose.dvh import cumulative_dvh


def save_dvh_figure(path: str | Path, ct_dose: np.ndarray, sct_dose: np.ndarray,
                    structures: Mapping[str, np.ndarray], rx: float, title: str = "") -> Path:
    """Cumulative DVHs of each structure: CT dose solid, sCT dose dashed, same colour.

    Args:
      path: the PNG to write.
      ct_dose, sct_dose: ``(X, Y, Z)`` doses (Gy) on one grid.
      structures: name -> ``(X, Y, Z)`` mask (empty masks are left out).
      rx: the prescription (Gy), drawn as a vertical line.
      title: the figure's title.
    """
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    top = float(max(np.max(ct_dose), np.max(sct_dose))) * 1.02 + 1e-6
    colours = ["C0", "C3", "C2", "C1", "C4", "C5", "C6", "C7", "C8", "C9"]
    for i, (name, mask) in enumerate(m for m in structures.items() if np.any(m[1])):
        colour = colours[i % len(colours)]
        for dose, style, who in ((ct_dose, "-", "CT"), (sct_dose, "--", "sCT")):
            levels, volume = cumulative_dvh(dose, mask, bin_gy=top / 400.0, max_gy=top)
            ax.plot(levels, volume, style, color=colour, lw=1.4, label=f"{name} ({who})")
    ax.axvline(rx, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, 102.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def save_dose_difference_figure(path: str | Path, ct_hu: np.ndarray, ct_dose: np.ndarray,
                                sct_dose: np.ndarray, rx: float, target: np.ndarray,
                                spacing: Sequence[float] = (1.0, 1.0, 1.0),
                                title: str = "") -> Path:
    """Axial and coronal cuts through the target's centre: CT dose, sCT dose (on the CT,
    10-110 % of ``rx``) and the difference sCT - CT in % of ``rx`` (blue: less, red: more).

    Args:
      path: the PNG to write.
      ct_hu: ``(X, Y, Z)`` CT (HU), the grey background.
      ct_dose, sct_dose: ``(X, Y, Z)`` doses (Gy).
      rx: the prescription (Gy).
      target: ``(X, Y, Z)`` target mask (its centre picks the cuts; its outline is drawn).
      spacing: voxel size (mm), for the aspect ratio.
      title: the figure's title.
    """
    centre = np.argwhere(np.asarray(target) > 0).mean(axis=0).round().astype(int)
    diff = 100.0 * (np.asarray(sct_dose, np.float64) - ct_dose) / rx
    limit = max(1.0, float(np.percentile(np.abs(diff), 99.9)))
    cuts = [("axial", lambda a: a[:, :, centre[2]].T, spacing[1] / spacing[0]),
            ("coronal", lambda a: a[:, centre[1], :].T, spacing[2] / spacing[0])]
    fig = Figure(figsize=(11.0, 7.0), dpi=100)
    for row, (name, cut, aspect) in enumerate(cuts):
        panels = [("CT dose (Gy)", ct_dose), ("sCT dose (Gy)", sct_dose),
                  ("sCT - CT (% of Rx)", diff)]
        for col, (label, volume) in enumerate(panels):
            ax = fig.add_subplot(2, 3, 3 * row + col + 1)
            ax.imshow(cut(ct_hu), cmap="gray", vmin=-400, vmax=600, origin="lower",
                      aspect=aspect)
            if col < 2:
                shown = np.ma.masked_less(cut(volume), 0.1 * rx)
                image = ax.imshow(shown, cmap="jet", vmin=0.1 * rx, vmax=1.1 * rx, alpha=0.6,
                                  origin="lower", aspect=aspect)
            else:
                image = ax.imshow(cut(volume), cmap="bwr", vmin=-limit, vmax=limit,
                                  origin="lower", aspect=aspect)
            ax.contour(cut(np.asarray(target, np.float32)), levels=[0.5], colors="k",
                       linewidths=0.7)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{name}: {label}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
