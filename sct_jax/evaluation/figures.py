"""PNG panels for a person to judge an sCT: MR | CT | sCT | |error|, axial and coronal."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sct_jax.data.io import atomic_path


def _aspect(spacing: Sequence[float], axes: tuple[int, int]) -> float:
    # imshow rows run along the first axis shown; aspect = row spacing / column spacing.
    return float(spacing[axes[0]]) / float(spacing[axes[1]])


def save_case_panel(path: str | Path, mr: np.ndarray, ct: np.ndarray | None, sct: np.ndarray,
                    mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    title: str = "", input_kind: str = "mr") -> Path:
    """Writes a 2-row panel (axial at the body's centre slice, coronal) atomically.

    Args:
      path: the PNG to write.
      mr: ``(X, Y, Z)`` MR (any units; shown with robust percentiles).
      ct: ``(X, Y, Z)`` reference CT in HU, or ``None`` (then no CT/error columns).
      sct: ``(X, Y, Z)`` synthetic CT in HU.
      mask: ``(X, Y, Z)`` body mask.
      spacing: voxel size in mm, for the displayed aspect ratio.
      title: figure title (case id, metrics).
      input_kind: ``"mr"``, or ``"cbct"`` (``mr`` is then a CBCT, shown in the CT's
        HU window so its offset and cupping show against the CT).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    mask = mask > 0
    zs = np.nonzero(mask.any(axis=(0, 1)))[0]
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    z = int(zs[len(zs) // 2]) if len(zs) else mr.shape[2] // 2
    y = int(ys[len(ys) // 2]) if len(ys) else mr.shape[1] // 2
    lo, hi = np.percentile(mr[mask] if mask.any() else mr, [0.5, 99.5])

    columns = [("MR", mr, "gray", (lo, hi)) if input_kind != "cbct"
               else ("CBCT (HU)", mr, "gray", (-1000, 1500))]
    if ct is not None:
        columns.append(("CT (HU)", ct, "gray", (-1000, 1500)))
    columns.append(("sCT (HU)", sct, "gray", (-1000, 1500)))
    if ct is not None:
        columns.append(("|sCT - CT| (HU)", np.abs(sct - ct) * mask, "magma", (0, 500)))

    views = [("axial", lambda a: a[:, :, z].T, (1, 0)), ("coronal", lambda a: a[:, y, :].T, (2, 0))]
    fig, axes = plt.subplots(len(views), len(columns), figsize=(3.2 * len(columns), 6.4),
                             squeeze=False)
    for r, (view, cut, ax_pair) in enumerate(views):
        for c, (name, vol, cmap, (vmin, vmax)) in enumerate(columns):
            ax = axes[r, c]
            im = ax.imshow(cut(vol), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower",
                           aspect=_aspect(spacing, ax_pair), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(view)
            if c == len(columns) - 1:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)
    return path
