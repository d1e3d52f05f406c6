"""Fast ablations: a grid of config overrides x seeds, each trained and scored; one table.

  sct-ablate --config configs/meta_pgan_pelvis.py:small \\
      --sweep meta.method=lookahead,jvp --seeds 3 --workdir runs/ablate_meta [--steps 500]

Every grid point (the product of the ``--sweep key=v1,v2`` lists) is trained with the
generic loop for each seed (``config.seed = base seed + k``) into
``ROOT/<point>/seed<k>`` and scored on the config's evaluation split with
:func:`sct_jax.evaluation.evaluate.evaluate_run` (no panels). The table has one row per grid point:
mean +- sample standard deviation over seeds of MAE, PSNR, SSIM, bone MAE and bone Dice
(SynthRAD2023 metrics) and of the seconds per training step, measured between the
timestamps of ``metrics.jsonl`` (median interval, so compilation, data set-up and
checkpoints are left out). It is printed and written atomically to
``ROOT/ablation.csv`` and ``ROOT/ablation.json``.

Re-running the same command skips finished runs (their result is cached in
``seed<k>/ablate_run.json`` next to the config it was made with); an interrupted run
resumes from its checkpoint.

Several methods under one budget: repeat ``--config`` (each config is crossed with the
grid; rows are labelled by the config's ``name``) and fix overrides for every run with
``--set key=value``, e.g. the pGAN-family comparison of seed 02 without VGG weights::

  sct-ablate --config configs/pgan_pelvis.py:small \
      --config configs/reg_pgan_pelvis.py:small --config configs/meta_pgan_pelvis.py:small \
      --set loss.perceptual_weight=0 --steps 1200 --workdir runs/pgan_family

Compilation: the loop compiles ``train_step`` ahead of time once per run. Runs whose
programs are identical (the seeds of one grid point: the seed only enters through the
key) share one compilation through JAX's persistent compilation cache, which this
module points at ``ROOT/.jit_cache`` (unless a cache directory is already configured).
By default each seed is its own loop run, so any method ablates without changes to
the loop. With ``--vmap`` the seeds of a grid point are trained as one program (a
leading seed axis on the state and the keys, each seed its own data order; see
:func:`sct_jax.training.loop.train_seeds`) into the same per-seed run directories, and scored
seed by seed as separate runs are; the s/step column is then the vmapped program's
step time divided by the number of seeds (seconds per seed-step)::

  sct-ablate --config configs/meta_pgan_pelvis.py:small \
      --sweep meta.method=lookahead,jvp --seeds 4 --vmap --workdir runs/ablate_meta
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from sct_jax.config_utils import load_config_file
from sct_jax.data.io import atomic_write_text
from sct_jax.errors import ConfigError
from sct_jax.evaluation.evaluate import evaluate_run
from sct_jax.training import loop

# (scoring metric name, table heading, format)
COLUMNS = (("mae", "MAE [HU]", ".1f"), ("psnr", "PSNR [dB]", ".2f"), ("ssim", "SSIM", ".4f"),
           ("mae_bone", "bone MAE [HU]", ".1f"), ("dice_bone", "bone Dice", ".3f"),
           ("s_per_step", "s/step", ".3g"))
RESULT_FILE = "ablate_run.json"


# ------------------------------------------------------------------------ the grid

def split_values(text: str) -> list[str]:
    """Splits ``"a,(1, 2),'x,y'"`` on the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_value(text: str) -> Any:
    """A Python literal (``50``, ``1e-4``, ``True``, ``(256, 160)``) or else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """``"meta.method=lookahead,jvp"`` -> ``("meta.method", ["lookahead", "jvp"])``."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError(f"--sweep {spec!r}: expected key=value1,value2,...")
    parsed = [parse_value(v) for v in split_values(values)]
    if any(v == "" for v in parsed):
        raise ConfigError(f"--sweep {spec!r}: empty value")
    return key, parsed


def set_override(config, key: str, value: Any) -> None:
    """Sets the existing field ``key`` (dotted) of ``config``; unknown keys fail."""
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise ConfigError(f"--sweep {key}: config has no field "
                              f"{'.'.join(parents[:i + 1])!r}")
        node = node[name]
    if not hasattr(node, "keys") or leaf not in node:
        raise ConfigError(f"--sweep {key}: config has no field {key!r}")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--sweep {key}={value!r}: {err}") from err


def grid_points(sweeps: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """The product of the sweeps, in command-line order (one empty point without any)."""
    keys = [k for k, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep: a key is swept twice in {keys}")
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in sweeps])]


def point_label(point: dict[str, Any], name: str = "") -> str:
    """``"meta.method=jvp"``; prefixed by the config's name when several are compared."""
    label = ",".join(f"{k}={v}" for k, v in point.items())
    return ",".join(p for p in (name, label) if p) or "base"


def point_dirname(point: dict[str, Any], name: str = "") -> str:
    """A file-system-safe folder name for a grid point (of the config called ``name``)."""
    def text(value):
        return "x".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

    label = "_".join([name] * bool(name) + [f"{k}-{text(v)}" for k, v in point.items()])
    return re.sub(r"[^A-Za-z0-9._=+-]+", "", (label or "base").replace(" ", ""))[:200] or "point"


def parse_set(spec: str) -> tuple[str, Any]:
    """``"loss.perceptual_weight=0"`` -> ``("loss.perceptual_weight", 0)``."""
    key, sep, value = spec.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ConfigError(f"--set {spec!r}: expected key=value")
    return key.strip(), parse_value(value.strip())


# ------------------------------------------------------------------------- one run

@dataclasses.dataclass
class RunResult:
    point: str
    seed: int
    workdir: str
    metrics: dict[str, float]  # evaluation means + s_per_step
    compile_s: float
    error: str = ""


def seconds_per_step(workdir: Path) -> float:
    """Median seconds per step between consecutive ``metrics.jsonl`` records (NaN if < 2).

    Robust to a resumed run: the one interval that spans the restart is an outlier.
    """
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return math.nan
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rates = [(b["time"] - a["time"]) / (b["step"] - a["step"])
             for a, b in zip(records, records[1:]) if b["step"] > a["step"]]
    return float(statistics.median(rates)) if rates else math.nan


# Keys added to every config after runs were cached: at these values they change
# nothing, so they are left out of the digest and earlier finished runs stay reusable.
DIGEST_NEUTRAL = {("data", "input"): "mr", ("data", "cbct_window"): [-1024.0, 3000.0],
                  ("data", "folds"): 0, ("data", "fold"): 0, ("data", "prior"): "",
                  ("data", "register_target"): False,
                  ("model", "gen", "upsample"): "transpose",
                  ("model", "gen", "calibration_bins"): 0,
                  ("loss", "body_mask"): False, ("loss", "body_mask_margin"): 0,
                  ("loss", "shift_tolerance"): 0,
                  ("data", "phantom", "anatomy_variation"): 1.0,
                  ("ldm", "objective"): "diffusion",
                  ("ldm", "flow_time_sampling"): "logit_normal", ("ldm", "flow_shift"): 1.0}


def config_digest(config) -> str:
    """The config's identity for the run caches (see :data:`DIGEST_NEUTRAL`)."""
    tree = json.loads(config.to_json_best_effort(sort_keys=True))
    for path, neutral in DIGEST_NEUTRAL.items():
        parent = tree
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and parent.get(path[-1], neutral) == neutral:
            parent.pop(path[-1], None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def refuse_stale_run(workdir: Path, record_name: str) -> None:
    """Refuses to train into a run directory that holds a finished run of another config.

    Called when ``workdir``'s cache missed: a record ``record_name`` there then belongs to
    a different config, and training would silently resume that run (same model, other
    steps or learning rate) and report it as this config's.
    """
    record = Path(workdir) / record_name
    if record.exists():
        raise ConfigError(f"{workdir}: holds a finished run of a different config "
                          f"({record_name}); remove it or use another output folder")


def run_one(config, workdir: Path, point: str, seed: int,
            echo: Callable[[str], None] = print) -> RunResult:
    """Trains ``config`` into ``workdir`` (or reuses a finished run) and scores it."""
    cached = cached_result(config, workdir)
    if cached is not None:
        echo(f"[ablate] {point} seed {seed}: reusing {workdir / RESULT_FILE}")
        return cached
    refuse_stale_run(workdir, RESULT_FILE)
    echo(f"[ablate] {point} seed {seed}: training {config.train.steps} steps in {workdir}")
    t0 = time.perf_counter()
    try:
        result = loop.train(config, workdir)
    except loop.TrainingDiverged as err:  # a legitimate ablation outcome: record it
        echo(f"[ablate] {point} seed {seed}: diverged ({err})")
        return RunResult(point, seed, str(workdir), {}, math.nan, error=str(err))
    train_s = time.perf_counter() - t0
    return score_run(config, workdir, point, seed, result.compile_s, train_s)


def score_run(config, workdir: Path, point: str, seed: int, compile_s: float,
              train_s: float, seeds_per_program: int = 1) -> RunResult:
    """Evaluates a trained run and caches its result next to it.

    Args:
      seeds_per_program: how many seeds the training program stepped together
        (``--vmap``): the step time is divided by it (seconds per seed-step).
    """
    speed = seconds_per_step(workdir)
    if math.isnan(speed):  # too few records: whole call minus compilation
        speed = max(train_s - compile_s, 0.0) / max(int(config.train.steps), 1)
    speed /= seeds_per_program
    report = evaluate_run(config, workdir, panels=False)
    summary = report.summary()
    metrics = {name: summary[name]["mean"] for name, _, _ in COLUMNS if name in summary}
    metrics["s_per_step"] = speed
    out = RunResult(point, seed, str(workdir), metrics, float(compile_s))
    atomic_write_text(Path(workdir) / RESULT_FILE, json.dumps({"config_digest":
                                                               config_digest(config),
                                          "result": dataclasses.asdict(out)},
                                         indent=2, default=_json_default))
    return out


# --------------------------------------------------------------------- the table

def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = float(np.mean(values))
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def summarize(results: list[RunResult], points: list[str]) -> list[dict[str, Any]]:
    """One row per grid point: ``{point, n_seeds, n_failed, <metric>_mean, <metric>_std}``."""
    rows = []
    for point in points:
        runs = [r for r in results if r.point == point]
        ok = [r for r in runs if not r.error]
        row: dict[str, Any] = {"point": point, "n_seeds": len(ok),
                               "n_failed": len(runs) - len(ok)}
        for name, _, _ in COLUMNS:
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(
                [r.metrics.get(name, math.nan) for r in ok])
        rows.append(row)
    return rows


def format_cell(mean: float, std: float, fmt: str) -> str:
    """``mean ± std`` (``mean`` alone for one run; ``n/a`` when there is none)."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{fmt}}" if math.isnan(std) else f"{mean:{fmt}} ± {std:{fmt}}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (mean ± std over seeds)."""
    header = ["point", "seeds"] + [title for _, title, _ in COLUMNS]
    lines = [header]
    for row in rows:
        seeds = str(row["n_seeds"]) + (f" ({row['n_failed']} failed)" if row["n_failed"] else "")
        lines.append([row["point"], seeds] + [
            format_cell(row[f"{name}_mean"], row[f"{name}_std"], fmt) for name, _, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def table_csv(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0]) if rows else ["point"]
    lines = [",".join(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row[k]
            cells.append(f'"{v}"' if isinstance(v, str) else
                         ("" if isinstance(v, float) and math.isnan(v) else repr(v)))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def write_outputs(root: Path, rows: list[dict[str, Any]], results: list[RunResult],
                  meta: dict[str, Any]) -> tuple[Path, Path]:
    """Writes ``ablation.csv`` and ``ablation.json`` (both texts built before writing)."""
    clean = lambda d: {k: _finite_or_none(v) for k, v in d.items()}  # NaN -> null
    payload = {**meta, "rows": [clean(r) for r in rows],
               "runs": [{**dataclasses.asdict(r), "metrics": clean(r.metrics),
                         "compile_s": _finite_or_none(r.compile_s)} for r in results]}
    json_text = json.dumps(payload, indent=2, default=_json_default, allow_nan=False)
    csv_text = table_csv(rows)
    csv_path = atomic_write_text(root / "ablation.csv", csv_text)
    json_path = atomic_write_text(root / "ablation.json", json_text)
    return csv_path, json_path


# ---------------------------------------------------------------------- the driver

def enable_compilation_cache(root: Path) -> None:
    """Points JAX's persistent compilation cache at ``root/.jit_cache`` if none is set."""
    if jax.config.jax_compilation_cache_dir:
        return  # the user's (or the test suite's) cache: keep it
    jax.config.update("jax_compilation_cache_dir", str(root / ".jit_cache"))
    # Cache every program, even quick ones: a grid repeats all of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cached_result(config, workdir: Path) -> RunResult | None:
    """The cached result of a finished run made with exactly ``config``, or None."""
    cached = Path(workdir) / RESULT_FILE
    if cached.exists():
        record = json.loads(cached.read_text())
        if record.get("config_digest") == config_digest(config):
            return RunResult(**record["result"])
    return None


def run_vmapped(group: list, root: Path, echo: Callable[[str], None]) -> list[RunResult]:
    """Trains one grid point's seeds as one vmapped program, then scores each seed.

    Args:
      group: ``(point, name, k, config)`` per seed of one grid point.
    """
    label = point_label(group[0][0], group[0][1])
    workdirs = [root / point_dirname(point, name) / f"seed{k}"
                for point, name, k, _ in group]
    cached = [cached_result(config, w) for (_, _, _, config), w in zip(group, workdirs)]
    if all(c is not None for c in cached):
        echo(f"[ablate] {label}: reusing {len(group)} seed run(s)")
        return cached
    configs = [config for *_, config in group]
    echo(f"[ablate] {label}: training {len(group)} seeds vmapped, "
         f"{configs[0].train.steps} steps, in {workdirs[0].parent}")
    t0 = time.perf_counter()
    seed_results = loop.train_seeds(configs, workdirs)
    train_s = time.perf_counter() - t0
    results = []
    for (_, _, k, config), w, r in zip(group, workdirs, seed_results):
        if r.error:
            echo(f"[ablate] {label} seed {k}: diverged ({r.error})")
            results.append(RunResult(label, k, str(w), {}, math.nan, error=r.error))
        else:
            results.append(score_run(config, w, label, k, r.compile_s, train_s, len(group)))
    return results


def run_ablation(config_spec: str | Sequence[str], sweeps: Sequence[str], seeds: int,
                 workdir: str | Path, steps: int | None = None,
                 echo: Callable[[str], None] = print,
                 sets: Sequence[str] = (), vmap: bool = False) -> list[dict[str, Any]]:
    """Trains and scores every config x grid point x seed, prints and writes the table.

    Args:
      config_spec: ``path/to/config.py[:variants]``, or several (one block of rows each,
        labelled by the config's ``name``; the names must differ).
      sweeps: ``"key=v1,v2"`` strings; their product is the grid.
      seeds: runs per grid point, with ``config.seed`` = the config's seed + 0..seeds-1.
      workdir: root folder of the runs and the table.
      steps: override ``config.train.steps`` (all runs).
      echo: where progress and the table go.
      sets: ``"key=value"`` overrides applied to every run (not part of the labels).
      vmap: train the seeds of each grid point as one vmapped program.

    Returns:
      The table rows (see :func:`summarize`).

    Raises:
      ConfigError: a bad sweep, key or value (before anything is trained).
    """
    if int(seeds) < 1:
        raise ConfigError(f"--seeds {seeds}: need at least 1")
    if steps is not None and int(steps) < 1:
        raise ConfigError(f"--steps {steps}: need at least 1")
    root = Path(workdir)
    specs = [config_spec] if isinstance(config_spec, str) else list(config_spec)
    if not specs:
        raise ConfigError("--config: give at least one config")
    parsed = [parse_sweep(s) for s in sweeps]
    fixed = [parse_set(s) for s in sets]
    points = grid_points(parsed)
    bases = [load_config_file(spec) for spec in specs]
    names = [str(b.name) for b in bases] if len(specs) > 1 else [""]
    if len(set(names)) != len(names):
        raise ConfigError(f"--config: the configs must have different names, got {names}")
    configs, labels = [], []
    # Every override is checked before the first run starts.
    for spec, base, name in zip(specs, bases, names):
        for point in points:
            labels.append(point_label(point, name))
            for k in range(int(seeds)):
                config = load_config_file(spec)
                for key, value in [*fixed, *point.items()]:
                    set_override(config, key, value)
                config.seed = int(base.seed) + k
                if steps is not None:
                    config.train.steps = int(steps)
                total = int(config.train.steps)
                # Enough metric records to time steps; a checkpoint at the end at the
                # latest (an interrupted grid resumes); no progress bar.
                config.train.log_every = max(1, min(int(config.train.log_every), total // 20))
                config.train.ckpt_every = min(int(config.train.ckpt_every), total)
                config.train.progress = False
                configs.append((point, name, k, config))
    root.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(root)
    results = []
    if vmap:
        for start in range(0, len(configs), int(seeds)):
            results += run_vmapped(configs[start:start + int(seeds)], root, echo)
    else:
        for point, name, k, config in configs:
            results.append(run_one(config, root / point_dirname(point, name) / f"seed{k}",
                                   point_label(point, name), k, echo))
    rows = summarize(results, labels)
    echo(f"\nablation of {', '.join(specs)}: {len(labels)} row(s) x {seeds} seed(s), "
         f"mean ± std over seeds")
    echo(format_table(rows))
    csv_path, json_path = write_outputs(root, rows, results, {
        "config": specs[0] if len(specs) == 1 else specs, "sweeps": list(sweeps),
        "sets": list(sets), "seeds": int(seeds), "steps": steps, "vmap": bool(vmap)})
    echo(f"wrote {csv_path} and {json_path}")
    return rows
