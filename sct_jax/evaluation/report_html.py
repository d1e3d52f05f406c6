"""``report.html``: one self-contained page per evaluation, readable offline.

Written next to the metrics JSON/CSV by ``evaluate.py``: first the verdict (does the
model beat the best baseline in MAE and in SSIM; a warning naming the baseline and both
numbers when it does not), then the case table (the columns of
``scoring.SCORED_METRICS``: SynthRAD2023's metrics and ours, SynthRAD2025's PSNR and
MS-SSIM, bone and air Dice and HD95; and the QA verdict when QA ran), the mean and
standard deviation over the cases, one row per baseline scored (constant soft tissue,
intensity lookup, mean training CT, and the perfect-model floor where the data have
one), then per case its panel (MR | CT | sCT | |error|), the bone surface (> 250 HU)
of CT and sCT in 3D (:mod:`sct_jax.evaluation.bone3d`) and, for sampling runs
(``--samples K``), the map of the per-voxel standard deviation of the samples. Every
image is embedded as base64 PNG and the page has no script or external resource, so it
can be mailed or archived as one file.

The numbers use the formats of the printed table (``scoring.format_table``).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sct_jax.data.io import atomic_write_text
from sct_jax.evaluation.dose_eval import SUMMARY, label
from sct_jax.evaluation.scoring import SCORED_METRICS, TABLE_COLUMNS, ScoreReport

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.summary td { font-weight: bold; background: #f2f2f2; }
tr.baseline td { font-style: italic; background: #fafafa; }
p.verdict { font-weight: bold; } p.warning { color: #a11; font-weight: bold; }
td.pass { color: #17692b; } td.warn { color: #8a5a00; } td.fail { color: #a11; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; }
"""


def format_value(name: str, value: float | None) -> str:
    """A metric as the table shows it (``n/a`` for NaN, ``inf`` for a perfect PSNR)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return TABLE_COLUMNS[name][1].format(value)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def std_map_png(std: np.ndarray, mask: np.ndarray, title: str = "") -> bytes:
    """The axial slice at the body's centre of a ``(X, Y, Z)`` std map (HU), as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    zs = np.flatnonzero(np.asarray(mask).any(axis=(0, 1)))
    z = int(zs[len(zs) // 2]) if zs.size else std.shape[2] // 2
    plane = np.asarray(std[:, :, z], np.float32).T
    fig, ax = plt.subplots(figsize=(4.2, 4.2 * plane.shape[0] / max(plane.shape[1], 1) + 0.4))
    im = ax.imshow(plane, cmap="magma", origin="lower", vmin=0.0,
                   vmax=max(float(np.percentile(plane, 99.5)), 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"sample std (HU), axial slice {z}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=90)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _cells(values: Mapping[str, float | None]) -> str:
    return "".join(f'<td data-metric="{n}">{html.escape(format_value(n, values.get(n)))}</td>'
                   for n in SCORED_METRICS)


def render(report: ScoreReport, *, title: str,
           baselines: Sequence[tuple[str, str, Mapping[str, float]]] = (),
           verdict: Mapping | None = None, qa: Mapping[str, str] | None = None,
           panels: Mapping[str, bytes] | None = None,
           std_maps: Mapping[str, bytes] | None = None,
           dose: Mapping | None = None,
           bone3d: Mapping[str, bytes] | None = None,
           notes: tuple[str, ...] = ()) -> str:
    """The page's HTML text.

    Args:
      report: the scored cases.
      title: the page's heading (run name).
      baselines: ``(name, label, mean metrics)`` of each baseline scored, one row each
        (``data-case="baseline:<name>"``).
      verdict: :func:`sct_jax.evaluation.baselines.verdict`'s result: its line is the
        page's first line, its warnings follow.
      qa: case id -> overall QA status (``pass``/``warn``/``fail``), when QA ran.
      panels: case id -> PNG bytes of its panel.
      std_maps: case id -> PNG bytes of its sample std map.
      bone3d: case id -> PNG bytes of its bone surfaces, CT left, sCT right
        (:func:`sct_jax.evaluation.bone3d.save_bone3d`).
      notes: lines shown under the title (checkpoint, samples, data).
      dose: :func:`sct_jax.evaluation.dose_eval.dose_scores`'s result: a dose table
        (model and baselines, per modality) and each case's DVH plots.
    """
    qa = dict(qa or {})
    header = "".join(f"<th>{html.escape(TABLE_COLUMNS[n][0])}</th>" for n in SCORED_METRICS)
    qa_header = "<th>QA</th>" if qa else ""
    rows = []
    for case in report.cases:
        status = qa.get(case.id, "")
        qa_cell = (f'<td class="{html.escape(status)}" data-metric="qa">'
                   f"{html.escape(status or 'n/a')}</td>") if qa else ""
        rows.append(f'<tr data-case="{html.escape(case.id)}"><td>{html.escape(case.id)}</td>'
                    f"{_cells(case.metrics)}{qa_cell}</tr>")
    summary = report.summary()
    empty_qa = "<td></td>" if qa else ""
    for stat in ("mean", "std"):
        rows.append(f'<tr class="summary" data-case="{stat}"><td>{stat}</td>'
                    f"{_cells({n: summary[n][stat] for n in SCORED_METRICS})}{empty_qa}</tr>")
    for name, label, values in baselines:
        rows.append(f'<tr class="baseline" data-case="baseline:{html.escape(name)}"><td>'
                    f"{html.escape(label)}</td>{_cells(values)}{empty_qa}</tr>")
    verdict_lines = []
    if verdict:
        verdict_lines.append(f'<p class="verdict" id="verdict">{html.escape(verdict["line"])}</p>')
        verdict_lines += [f'<p class="warning">{html.escape(w)}</p>'
                          for w in verdict["warnings"]]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}: sCT evaluation</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *verdict_lines,
        *[f"<p>{html.escape(line)}</p>" for line in notes],
        "<p>SynthRAD2023 metrics inside the body mask: MAE and ME in HU, PSNR in dB, "
        "SSIM; MAE per tissue class of the CT (air &lt; -200 HU, soft tissue, bone &gt; "
        "250 HU) and the Dice of bone (&gt; 250 HU) in CT and sCT. SynthRAD2025: PSNR25 "
        "over [-1024, 3071] HU and the masked 5-level MS-SSIM. Geometry: Dice and "
        "95th-percentile Hausdorff distance (mm) of bone (&gt; 250 HU) and air (&lt; "
        "-400 HU) inside the body, CT vs sCT (HD95 inf: the sCT has none). LPIPS (VGG-16, "
        "v0.1 heads) averaged over the axial slices holding body, n/a when no weights "
        "were given (see the note above). dWEPL c / d: the proton-range proxy, mean "
        "|WEPL(sCT) - WEPL(CT)| in mm over 4 axial beams (0, 90, 180, 270 deg) to the "
        "centre and the distal edge of a 25 mm sphere at the body's centre of mass "
        "(HU to stopping power: sct_jax/dose/wepl.py). Baselines (italic, "
        "means over the same cases): every body voxel at 40 HU; HU looked up from the "
        "normalised MR intensity (64 bins, fitted on the training pairs); the mean of "
        "the training CTs on each case's body bounding box; and, where the data have "
        "one, the noise-free CT (a perfect model's floor).</p>",
        f'<table id="metrics"><thead><tr><th>case</th>{header}{qa_header}</tr></thead>',
        "<tbody>", *rows, "</tbody></table>",
        *_dose_table(dose),
    ]
    panels, std_maps, bone3d = dict(panels or {}), dict(std_maps or {}), dict(bone3d or {})
    for case in report.cases:
        figures = []
        if case.id in panels:
            figures.append(f'<figure><img alt="{html.escape(case.id)} panel" '
                           f'src="{png_data_uri(panels[case.id])}"><figcaption>MR, CT, sCT '
                           "and |sCT - CT|, axial and coronal</figcaption></figure>")
        if case.id in bone3d:
            figures.append(f'<figure data-figure="bone3d"><img alt="{html.escape(case.id)} '
                           f'bone surface" src="{png_data_uri(bone3d[case.id])}"><figcaption>'
                           "bone surface (&gt; 250 HU), CT left, sCT right</figcaption></figure>")
        for modality, png in ((dose or {}).get("dvh_png", {}).get(case.id, {})).items():
            figures.append(f'<figure data-figure="dvh_{html.escape(modality)}"><img alt="'
                           f'{html.escape(case.id)} {html.escape(modality)} DVH" '
                           f'src="{png_data_uri(Path(png).read_bytes())}"><figcaption>'
                           f"{html.escape(modality)} DVH, CT solid, sCT dashed"
                           "</figcaption></figure>")
            diff = Path(png).with_name(f"dose_diff_model_{modality}.png")
            if diff.is_file():
                figures.append(f'<figure data-figure="dose_diff_{html.escape(modality)}">'
                               f'<img alt="{html.escape(case.id)} {html.escape(modality)} '
                               f'dose difference" src="{png_data_uri(diff.read_bytes())}">'
                               f"<figcaption>{html.escape(modality)} dose on the CT and "
                               "sCT - CT</figcaption></figure>")
        if case.id in std_maps:
            figures.append(f'<figure><img alt="{html.escape(case.id)} sample std" '
                           f'src="{png_data_uri(std_maps[case.id])}"><figcaption>per-voxel '
                           "standard deviation of the samples (HU)</figcaption></figure>")
        if figures:
            parts += [f'<section data-case="{html.escape(case.id)}">'
                      f"<h2>{html.escape(case.id)}</h2>", *figures, "</section>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _dose_table(dose: Mapping | None) -> list[str]:
    """The dose section: per modality, the model's and each baseline's mean metrics."""
    if not dose:
        return []
    head = "".join(f"<th>{html.escape(text)}</th>" for text, _ in SUMMARY.values())
    rows = []
    for modality, by_name in dose["summary"].items():
        for name, values in by_name.items():
            css = "" if name == "model" else ' class="baseline"'
            cells = "".join(f'<td data-metric="{k}">{values[k]:.2f}</td>' for k in SUMMARY)
            rows.append(f'<tr{css} data-case="dose:{html.escape(modality)}:{html.escape(name)}">'
                        f"<td>{html.escape(modality)}</td><td>{html.escape(label(name))}</td>"
                        f"{cells}</tr>")
    return ["<h2>Dose</h2>",
            f"<p>Plans optimised on the CT ({html.escape(dose['target'])}, Rx "
            f"{dose['rx_gy']:g} Gy), recomputed on each sCT; means over the cases. Dose MAE "
            "where the CT dose is &ge; 90% of Rx; gamma global, 10% low-dose cut-off; "
            "target D98 of sCT - CT.</p>",
            f'<table id="dose"><thead><tr><th>modality</th><th>sCT</th>{head}</tr></thead>',
            "<tbody>", *rows, "</tbody></table>",
            *[f'<p class="warning">dose failed: {html.escape(e)}</p>' for e in dose["errors"]]]


def path_for(json_path: str | os.PathLike) -> Path:
    """Where the page goes: ``report.html`` beside ``metrics.json`` (the default
    summary), ``<stem>.html`` beside any other summary path."""
    json_path = Path(json_path)
    name = "report.html" if json_path.name == "metrics.json" else json_path.stem + ".html"
    return json_path.with_name(name)


def write(path: str | os.PathLike, report: ScoreReport, **kwargs) -> Path:
    """Renders :func:`render` and writes it atomically to ``path``."""
    return atomic_write_text(Path(path), render(report, **kwargs))
