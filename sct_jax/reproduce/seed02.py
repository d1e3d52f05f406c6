"""Seed 02 (pGAN family under MR/CT misalignment) on the pelvis phantom or your data.

  sct-reproduce seed02 [--seeds 3] [--tiny] [--out runs/reproduce/seed02] [--vgg19 PATH]
                       [--data ROOT [--region R]]

Trains pGAN, CTX-pGAN (only with VGG-19 weights), REG-pGAN and meta-pGAN at its three
weight granularities (per pixel, per 16 x 16 patch, per slice) on the misaligned pelvis
phantom (20% of the cases perfectly registered, the rest moved by ~4 mm; see
:mod:`sct_jax.data.phantom`), predicts the held-out test cases and scores them against
the CT in the MR's frame (``ct_aligned``). Rows: each method and seed, the constant,
intensity-lookup and mean-training-CT baselines and the perfect-model floor (the noise-free CT in the
MR's frame: what no model can beat, CT noise being unpredictable from the MR).

``--data ROOT [--region R]`` trains and scores the same methods on a SynthRAD-layout
dataset instead (every config's ``data.root``; the split is the configs'
``data.split``): the test cases are scored against their own ``ct`` unless the folder
has a ``ct_aligned``; the aligned-subset check of the meta-validation and the floor need
the phantom's manifest and ``ct_ideal``, and say so in their notes when missing.

Scale: the ``small`` configs shrunk to what trains in a few minutes per run on a CPU
(:data:`CPU_SCALE`: 128 x 96 slices of a 128 x 96 x 16 phantom, generator ngf 8 with
2 residual blocks, 300 steps at batch 4);
``--tiny`` runs each config's ``tiny`` variant (2 steps: a smoke test, not a result).
Without VGG-16 weights (``--vgg16``) the perceptual term is off for every method.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from sct_jax import methods
from sct_jax.config_utils import load_config_file
from sct_jax.data import datasets
from sct_jax.data.io import atomic_write_text, load_volume
from sct_jax.errors import ConfigError
from sct_jax.inference import predict
from sct_jax.methods import meta_pgan
from sct_jax.reproduce import ablate, baselines
from sct_jax.training import loop

REPO = Path(__file__).resolve().parent.parent.parent
RESULT_FILE = "reproduce_row.json"

# (label, run folder, config, overrides)
METHODS = (
    ("pGAN", "pgan", "configs/pgan_pelvis.py", {}),
    ("CTX-pGAN", "ctx_pgan", "configs/ctx_pgan_pelvis.py", {}),
    ("REG-pGAN", "reg_pgan", "configs/reg_pgan_pelvis.py", {}),
    ("meta-pGAN (per pixel)", "meta_pgan_pixel", "configs/meta_pgan_pelvis.py",
     {"meta.granularity": "pixel"}),
    ("meta-pGAN (16x16 patch)", "meta_pgan_patch16", "configs/meta_pgan_pelvis.py",
     {"meta.granularity": "patch", "meta.patch_size": 16}),
    ("meta-pGAN (per slice)", "meta_pgan_slice", "configs/meta_pgan_pelvis.py",
     {"meta.granularity": "slice"}),
)
# The small configs at a size a CPU trains in minutes per run (patch 16 divides the crop).
CPU_SCALE = {"data.phantom.shape": (128, 96, 16), "data.crop": (128, 96),
             "model.gen.ngf": 8, "model.gen.n_blocks": 2, "model.disc.ndf": 8,
             "train.steps": 300, "train.batch_size": 4, "train.log_every": 10,
             "train.ckpt_every": 300, "train.progress": False, "eval.panels": False}
# RegGAN's registration net: 5 levels leave 4 x 3 of 128 x 96 at the bottleneck.
CPU_SCALE_BY_METHOD = {"reg_pgan": {"model.reg.down_channels": (16, 32, 32, 32, 32),
                                    "model.reg.up_channels": (32, 32, 32, 32, 16)}}
TINY_SCALE = {"meta.patch_size": 8, "eval.panels": False}


def _config(path: str, tiny: bool, overrides: dict, vgg16: str | None, vgg19: str | None,
            data: dict | None = None):
    config = load_config_file(f"{REPO / path}:{'tiny' if tiny else 'small'}")
    scale = TINY_SCALE if tiny else {**CPU_SCALE,
                                     **CPU_SCALE_BY_METHOD.get(config.method, {})}
    for key, value in {**scale, **overrides, **(data or {})}.items():
        if key.startswith("meta.") and "meta" not in config:
            continue
        ablate.set_override(config, key, value)
    if vgg16:
        config.model.vgg16_weights = str(vgg16)
    else:  # no VGG-16: no perceptual term for any method (the comparison stays fair)
        config.loss.perceptual_weight = 0.0
    if config.method == "ctx_pgan":
        config.model.vgg19_weights = str(vgg19)
    return config


def _diagnostics_note(workdir: Path) -> str:
    """The meta-pGAN weight diagnostics averaged over the last half of the log."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return ""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = records[len(records) // 2:]

    def mean(key):
        values = [r[key] for r in records
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return float(np.mean(values)) if values else math.nan

    return (f"bone weight share {mean('meta/weight_share_bone'):.3f} vs pixel share "
            f"{mean('meta/pixel_share_bone'):.3f}, bone zero-weight fraction "
            f"{mean('meta/zero_fraction_bone'):.2f}, D majority sign "
            f"{mean('meta/d_majority_sign_share'):.2f}")


def _take_lock(workdir: Path) -> Path | None:
    """Claims ``workdir`` for this process (``.reproduce.lock`` holding the pid); None
    while another live process holds it. A dead holder's lock is taken over."""
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir / ".reproduce.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text().strip() or 0), 0)
                return None  # a live process is training this run
            except (ProcessLookupError, ValueError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # left by a process that died
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def _cached_row(workdir: Path, digest: str, references: dict) -> dict | None:
    """The finished run's row when ``workdir`` holds one of this config, else None.

    A row cached before the table gained columns (``baselines.ROW_METRICS``) is
    rescored from the run's predictions and its cache rewritten; without predictions
    its new columns are n/a, said in its note (:func:`baselines.complete_row`).
    """
    cached = workdir / RESULT_FILE
    if cached.exists():
        record = json.loads(cached.read_text())
        if record.get("config_digest") == digest:
            row, rescored = baselines.complete_row(record["row"], workdir / "predictions",
                                                   references)
            if rescored:
                atomic_write_text(cached, json.dumps({**record, "row": row}, indent=1,
                                                     default=str))
            return row
    return None


def _train_and_score(label: str, config, workdir: Path, seed: int, references) -> dict | None:
    """Trains (or reuses) one run, predicts the test split and scores it as a row.

    Returns None when another process is training the same run (several
    ``sct-reproduce`` processes on one output folder share the runs out).
    """
    digest = ablate.config_digest(config)
    row = _cached_row(workdir, digest, references)
    if row is not None:
        print(f"[seed02] {label} seed {seed}: reusing {workdir / RESULT_FILE}")
        return row
    lock = _take_lock(workdir)
    if lock is None:
        return None
    try:
        row = _cached_row(workdir, digest, references)  # finished while we waited
        return row if row is not None else _train_and_score_locked(
            label, config, workdir, seed, references, digest)
    finally:
        lock.unlink(missing_ok=True)


def _train_and_score_locked(label, config, workdir, seed, references, digest) -> dict:

    cached = workdir / RESULT_FILE
    ablate.refuse_stale_run(workdir, RESULT_FILE)
    print(f"[seed02] {label} seed {seed}: training {config.train.steps} steps in {workdir}",
          flush=True)
    t0 = time.perf_counter()
    try:
        loop.train(config, workdir)
    except loop.TrainingDiverged as err:
        return baselines.row(label, {}, seed, time.perf_counter() - t0, f"diverged: {err}")
    pred_dir, cases = predict.predict_split(config, workdir)
    pairs = [(load_volume(pred_dir / case.id / "sct.nii.gz").data, references[case.id])
             for case in cases]
    note = _diagnostics_note(workdir) if config.method == "meta_pgan" else ""
    result = baselines.row(label, baselines.score(pairs), seed, time.perf_counter() - t0,
                           note)
    atomic_write_text(cached, json.dumps({"config_digest": digest, "row": result},
                                         indent=1, default=str))
    return result


def meta_validation_check(config, splits) -> str:
    """Which training cases the meta-validation picks (top 11% by MI) and how many of
    them the phantom made aligned, as a note; on other data (no phantom manifest says
    which cases are aligned) a note that the check was left out."""

    manifest = baselines.phantom_manifest(splits["train"])
    if manifest is None:
        return ("aligned-subset check of the meta-validation left out: the data are not "
                "the phantom (no manifest of aligned cases)")
    prepared = datasets.prepare(config, splits["train"])
    picked = meta_pgan.meta_validation_ids(config, prepared)
    aligned = {c["id"] for c in manifest.get("cases", []) if c.get("aligned")}
    hits = sum(i in aligned for i in picked)
    in_train = sum(c.id in aligned for c in splits["train"])
    return (f"meta-validation {', '.join(picked)}: {hits} of {len(picked)} aligned "
            f"({in_train} aligned of {len(splits['train'])} training cases)")


def run(out_dir: Path, seeds: int, tiny: bool, vgg16: str | None = None,
        vgg19: str | None = None, only: tuple[str, ...] | None = None,
        data_root: str | None = None, region: str | None = None,
        dose_rx: float | None = None, anatomy_variation: float = 1.0) -> list[dict]:
    """Trains and scores every method for ``seeds`` seeds; returns the table rows.

    ``only``: run folder names (``pgan``, ``meta_pgan_slice``, ...) of the methods to
    train; the others are reported from their finished runs alone (none: no row).
    ``data_root``, ``region``: a SynthRAD-layout dataset instead of the phantom.
    ``dose_rx``: score every row by dose too, with this prescription in Gy
    (``--dose``; :mod:`sct_jax.reproduce.dose`).

    Raises:
      SctError: a bad config or dataset (no cases, too few for the split), before
        anything is trained or written.
    """
    slugs = [slug for _, slug, _, _ in METHODS]
    unknown = sorted(set(only or ()) - set(slugs))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: unknown method (expected some of "
                          f"{', '.join(slugs)})")

    out_dir = Path(out_dir)
    if vgg19 is None and (REPO / "weights" / "vgg19.npz").exists():
        vgg19 = str(REPO / "weights" / "vgg19.npz")
    data = baselines.data_overrides(data_root, region, anatomy_variation)
    configs = [(label, slug, _config(path, tiny, overrides, vgg16, vgg19, data))
               for label, slug, path, overrides in METHODS]
    for _, _, config in configs:  # every config checked before the first run starts
        method = methods.get_method(config.method)
        if config.method != "ctx_pgan" or vgg19:
            method.validate(config)
    first = configs[0][2]
    # The data are found and split (a missing root, no case of the region, too few
    # cases for the split: one-line errors) before anything is compiled or written.
    splits = datasets.case_splits(first)
    cases = {"train": splits["train"], "test": splits[first.eval.split]}
    if first.eval.max_cases:
        cases["test"] = cases["test"][:first.eval.max_cases]
    loaded = {c.id: baselines.load_reference(
        c, out_dir / "dose" if dose_rx else None, dose_rx or 2.0) for c in cases["test"]}
    references = {i: ref for i, (ref, _) in loaded.items()}
    frame = ("CT in the MR's frame" if all(a for _, a in loaded.values())
             else "the cases' CT (no aligned CT found)")
    ablate.enable_compilation_cache(out_dir)
    print(f"[seed02] scoring {len(references)} test case(s) against {frame}")
    meta = configs[-1][2]
    same_cases = all(meta.data.to_dict()[k] == first.data.to_dict()[k]
                     for k in ("root", "region", "split", "split_seed", "phantom"))
    meta_note = meta_validation_check(meta, splits if same_cases
                                      else datasets.case_splits(meta))
    print(f"[seed02] {meta_note}")

    rows = []
    # Seed-major: an interrupted reproduction has every method at its first seeds.
    jobs = []
    for k in range(int(seeds)):
        for label, slug, config in configs:
            if config.method == "ctx_pgan" and not vgg19:
                if k == 0:
                    jobs.append(baselines.row(label, {}, None,
                                              note="needs VGG-19 weights (--vgg19)"))
                continue
            c = config.copy_and_resolve_references()
            c.seed = int(config.seed) + k
            workdir = out_dir / slug / f"seed{k}"
            if only is not None and slug not in only:
                row = _cached_row(workdir, ablate.config_digest(c), references)
                if row is not None:
                    jobs.append(row)
                continue
            jobs.append((label, c, workdir, k))
    done = {i: job for i, job in enumerate(jobs) if isinstance(job, dict)}
    while len(done) < len(jobs):
        waiting = 0
        for i, job in enumerate(jobs):
            if i not in done:
                row = _train_and_score(*job, references)
                if row is None:
                    waiting += 1
                else:
                    done[i] = row
        if waiting:  # runs another process is training: wait for their results
            time.sleep(15)
    rows = [done[i] for i in range(len(jobs))]
    rows.append(baselines.constant_row(list(references.values())))
    rows += baselines.fitted_rows(first, cases["train"], cases["test"], references)
    rows.append(baselines.floor_row(cases["test"], references,
                                    "noise-free CT in the MR's frame: CT noise only"))
    for r in rows:  # once, on the first meta-pGAN row
        if r["method"].startswith("meta-pGAN") and r["seed"] == 0:
            r["note"] = f"{r['note']}; {meta_note}" if r["note"] else meta_note
            break
    return rows
