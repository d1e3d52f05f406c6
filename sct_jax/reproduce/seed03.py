"""Seed 03 (brain latent diffusion vs pix2pix) on the brain phantom or your data.

  sct-reproduce seed03 [--seeds 3] [--tiny] [--out runs/reproduce/seed03] [--samplers]
                       [--only ldm_concat,ldm_controlnet,ldm_concat_flow,pix2pix]
                       [--data ROOT [--region R]]

Per seed, trains the chained ``configs/ldm_brain.py`` runs of both conditioning modes
(sharing one autoencoder) and pix2pix on axial slices of the same heads, then predicts
the held-out test heads and scores them:

- ``LDM (MR concat)``: autoencoder -> diffusion UNet conditioned on the MR on the latent
  grid (the ``small`` default);
- ``LDM (ControlNet)``: autoencoder -> unconditional UNet -> ControlNet on the MR (the
  seed's design);
- ``LDM (MR concat, rectified flow)``: the MR-concat UNet trained by rectified flow (the
  config's ``flow`` word) on the same autoencoder, sampled with 30 Euler steps (MR input
  only);
- ``pix2pix``: ``configs/pix2pix_pelvis.py:small`` on 64 x 96 axial slices of the heads,
  with the mean training CT as an input it corrects (``data.prior="mean_ct"``) and an L1
  weight of 1000 (MR input only; README "The mean training CT as an input").

The LDM rows give the mean of :data:`SAMPLES` samples per head and note the
autoencoder's reconstruction MAE on the test heads (the LDM's ceiling) and, for the
first seed, the MR-swap check: the MAE when each head is sampled from another head's
MR (a model that uses the MR must get worse). Baseline rows: constant 40 HU, the
intensity lookup, the mean training CT and the perfect-model floor (the phantom's
noise-free CT). ``--only`` trains a subset of the model rows and reports the others
from their finished runs (each writes ``reproduce_row.json`` with its config digest).
Runs live in ``<out>/<run>/seed<k>/``; a finished stage (its digest file matches the
config) is skipped, an interrupted one resumes from its checkpoint. One
``sct-reproduce`` process per output folder. ``--samplers`` adds rows of each finished
MR-concat run sampled with other samplers and step counts (:data:`SAMPLER_VARIANTS`;
predictions in ``<out>/samplers/``), each with its seconds per sample.

``--data ROOT [--region R]`` trains and scores the same rows on a SynthRAD-layout
dataset instead (every config's ``data.root``; the split is the configs'
``data.split``). Everything above works on any data except the floor, which needs the
phantom's ``ct_ideal`` (its note says so), and the MR swap, which needs another head on
the same voxel grid (n/a otherwise).

Cost: the ``small`` chain is about an hour of 2-core CPU per stage (autoencoder, each
UNet, ControlNet), so one seed of the full table takes several CPU hours; ``--tiny``
runs every stage's ``tiny`` variant (a smoke test, not a result).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from sct_jax import methods, metrics
from sct_jax.config_utils import load_config_file
from sct_jax.data import datasets, modality, preprocess, synthrad
from sct_jax.data.io import atomic_write_text, load_volume
from sct_jax.errors import ConfigError
from sct_jax.inference import predict
from sct_jax.methods import ldm_autoencoder
from sct_jax.reproduce import ablate, baselines
from sct_jax.reproduce.seed02 import RESULT_FILE, _cached_row
from sct_jax.runs import load_state
from sct_jax.training import loop

REPO = Path(__file__).resolve().parent.parent.parent
DONE_FILE = "stage_done.json"
SAMPLES = {"small": 8, "tiny": 2}
# pix2pix on the brain heads: 64 x 80 axial slices padded to 64 x 96 (5 downsamplings).
PIX2PIX_BRAIN = {"data.region": "brain", "data.phantom.shape": (64, 80, 64),
                 "data.phantom.cases": 20, "data.crop": (64, 96),
                 "name": "pix2pix_brain_small"}
PIX2PIX_BRAIN_TINY = {"data.region": "brain", "data.phantom.shape": (32, 32, 32),
                      "data.crop": (32, 32), "name": "pix2pix_brain_tiny"}
# With MR input the heads' pix2pix corrects the mean training CT (data.prior) and weighs
# its L1 1000 (not 100: the GAN term's texture is the error left once the prior gives the
# anatomy). README "The mean training CT as an input" has the measurements; the CBCT rows
# (synthrad_task2) keep their measured settings.
PIX2PIX_BRAIN_MR = {"data.prior": "mean_ct", "loss.l1_weight": 1000.0}


def ldm_config(words: str, size: str, runs: dict[str, Path], seed: int,
               data: dict | None = None, input: str = "mr"):
    """One LDM stage's config (``data``: :func:`baselines.data_overrides`; ``input``
    ``"cbct"``: the config's ``cbct`` word)."""
    cbct = ",cbct" if input == "cbct" else ""
    config = load_config_file(f"{REPO / 'configs/ldm_brain.py'}:{words},{size}{cbct}")
    config.ldm.autoencoder_workdir = str(runs["autoencoder"])
    config.ldm.diffusion_workdir = str(runs.get("diffusion", ""))
    for key, value in (data or {}).items():
        ablate.set_override(config, key, value)
    config.seed = seed
    return config


def pix2pix_config(size: str, seed: int, data: dict | None = None, input: str = "mr"):
    """pix2pix on the brain heads (``data``: :func:`baselines.data_overrides`; ``input``
    ``"cbct"``: the config's ``cbct`` word)."""
    cbct = ",cbct" if input == "cbct" else ""
    config = load_config_file(f"{REPO / 'configs/pix2pix_pelvis.py'}:{size}{cbct}")
    brain = PIX2PIX_BRAIN if size == "small" else PIX2PIX_BRAIN_TINY
    brain = {**brain, "name": brain["name"] + ("_cbct" if cbct else ""),
             **({} if cbct else PIX2PIX_BRAIN_MR)}
    for key, value in {**brain, **(data or {})}.items():
        ablate.set_override(config, key, value)
    config.eval.panels = False
    config.seed = seed
    return config


def train_stage(config, workdir: Path) -> float:
    """Trains ``config`` into ``workdir`` unless a finished run of the same config is
    there; returns the training wall time (the recorded one when skipped)."""

    digest = ablate.config_digest(config)
    done = workdir / DONE_FILE
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("config_digest") == digest:
            print(f"[seed03] {config.name}: reusing {workdir}")
            return float(record["wall_s"])
    ablate.refuse_stale_run(workdir, DONE_FILE)
    print(f"[seed03] {config.name}: training {config.train.steps} steps in {workdir}",
          flush=True)
    t0 = time.perf_counter()
    loop.train(config, workdir)
    wall = time.perf_counter() - t0
    atomic_write_text(done, json.dumps({"config_digest": digest, "wall_s": wall}))
    return wall


def predict_and_score(config, workdir: Path, references: dict, samples: int) -> dict:

    pred_dir, cases = predict.predict_split(config, workdir, samples=samples)
    pairs = [(load_volume(pred_dir / c.id / "sct.nii.gz").data, references[c.id])
             for c in cases]
    return baselines.score(pairs)


def _unit_mr(config, case) -> np.ndarray:
    data = synthrad.load_case(case)
    return np.asarray(modality.spec(config).to_unit(data.mr.data, data.mask), np.float32)


def autoencoder_ceiling(config, workdir: Path, references: dict) -> float:
    """Mean MAE (HU, in the body) of the test CTs decoded from their own latents."""

    _, state = load_state(config, workdir)
    reconstruct = jax.jit(functools.partial(ldm_autoencoder.reconstruct, config))
    maes = []
    for ref in references.values():
        unit = np.asarray(preprocess.ct_to_unit(ref.ct), np.float32)[None, ..., None]
        recon = np.asarray(preprocess.unit_to_ct(
            np.asarray(reconstruct(state, unit))[0, ..., 0]), np.float32)
        maes.append(metrics.mae(ref.ct, recon, ref.mask))
    return float(np.mean(maes))


def mr_swap_mae(config, workdir: Path, cases, references: dict, donors) -> float:
    """Mean MAE when each test head is sampled from ``donors``' next head's MR instead of
    its own (same grid): higher than the model's own MAE iff the MR is used."""

    _, state = load_state(config, workdir)
    jitted = jax.jit(functools.partial(methods.get_method(config.method).predict, config))
    maes = []
    for i, case in enumerate(cases):
        donor = donors[(i + 1) % len(donors)]
        if donor.id == case.id:
            donor = donors[(i + 2) % len(donors)]
        mr = _unit_mr(config, donor)
        ct, mask = references[case.id].ct, references[case.id].mask
        if mr.shape != ct.shape:  # other data: heads on other grids have no swap
            continue
        volume = predict.make_volume_predictor(config, state, jitted_predict=jitted)
        sct = np.asarray(preprocess.unit_to_ct(volume(mr)), np.float32)
        maes.append(metrics.mae(ct, sct, mask))
    return float(np.mean(maes)) if maes else math.nan


# The table's model rows: (label, run folder of the sCT model, its chain of stages).
CHAINS = (
    ("LDM (MR concat)", "ldm_concat",
     (("autoencoder", "ldm_autoencoder"), ("diffusion,concat", "ldm_concat"))),
    ("LDM (ControlNet)", "ldm_controlnet",
     (("autoencoder", "ldm_autoencoder"), ("diffusion,unconditional", "ldm_diffusion_uncond"),
      ("controlnet", "ldm_controlnet"))),
    ("pix2pix", "pix2pix", ()),
)
# The MR-concat LDM trained by rectified flow (the config's ``flow`` word) on the same
# autoencoder: MR input only (the CBCT table, synthrad_task2, compares the defaults).
FLOW_CHAIN = ("LDM (MR concat, rectified flow)", "ldm_concat_flow",
              (("autoencoder", "ldm_autoencoder"), ("diffusion,concat,flow", "ldm_concat_flow")))
# ``--samplers``: each LDM-concat run sampled again with these (sampler, steps), beside
# its config's own (DDIM 25 steps for v-prediction, Euler 30 for rectified flow).
SAMPLER_VARIANTS = {"ldm_concat": (("ddim", 50),),
                    "ldm_concat_flow": (("euler", 10), ("euler", 20), ("dpmpp_2m", 10),
                                        ("dpmpp_2m", 20), ("dpmpp_2m", 30))}
SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler",
                 "dpmpp_2m": "DPM-Solver++(2M)"}


def chains(input: str = "mr") -> tuple:
    """The table's model rows for ``input``: :data:`CHAINS`, and :data:`FLOW_CHAIN`
    before pix2pix with MR input."""
    return CHAINS if input != "mr" else (*CHAINS[:2], FLOW_CHAIN, *CHAINS[2:])


def sampler_label(config) -> str:
    """``"DDIM 25 steps"``: the sampler a config samples with."""
    sampler = str(config.ldm.sampler)
    return f"{SAMPLER_NAMES.get(sampler, sampler)} {int(config.ldm.sample_steps)} steps"


def sampler_rows(label: str, slug: str, config, workdir: Path, out_dir: Path,
                 references: dict, samples: int, seed: int) -> list[dict]:
    """The finished run ``workdir`` of row ``slug`` sampled with each of its
    :data:`SAMPLER_VARIANTS`.

    Each variant predicts into ``out_dir/<sampler>_<steps>/predictions`` (never into the
    run) and caches its row there; its wall time is the sampling (compilation included)
    and its note the seconds per sample and head.
    """
    rows = []
    for sampler, steps in SAMPLER_VARIANTS.get(slug, ()):
        variant = config.copy_and_resolve_references()
        variant.ldm.sampler, variant.ldm.sample_steps = sampler, steps
        methods.get_method(variant.method).validate_config(variant)
        variant_dir = Path(out_dir) / f"{sampler}_{steps}"
        digest = ablate.config_digest(variant)
        row = _cached_row(variant_dir, digest, references)
        if row is None:
            t0 = time.perf_counter()
            pred_dir, cases = predict.predict_split(
                variant, workdir, out_dir=variant_dir / "predictions", samples=samples)
            wall = time.perf_counter() - t0
            scores = baselines.score((load_volume(pred_dir / c.id / "sct.nii.gz").data,
                                      references[c.id]) for c in cases)
            row = baselines.row(
                f"{label}, {sampler_label(variant)}", scores, seed, wall,
                f"mean of {samples} samples; sampling only: "
                f"{wall / (samples * max(len(cases), 1)):.1f} s per sample and head, "
                "compilation included")
            atomic_write_text(variant_dir / RESULT_FILE, json.dumps(
                {"config_digest": digest, "row": row}, indent=1, default=str))
        rows.append(row)
    return rows


def _chain_configs(chain, size: str, runs: dict[str, Path], seed: int, data: dict,
                   input: str = "mr") -> list:
    return [(ldm_config(words, size, {"autoencoder": runs["ldm_autoencoder"],
                                      "diffusion": runs["ldm_diffusion_uncond"]}, seed, data,
                        input), runs[name]) for words, name in chain]


def run(out_dir: Path, seeds: int, tiny: bool, only: tuple[str, ...] | None = None,
        data_root: str | None = None, region: str | None = None,
        dose_rx: float | None = None, input: str = "mr",
        anatomy_variation: float = 1.0, samplers: bool = False) -> list[dict]:
    """Trains and scores both LDM conditionings and pix2pix for ``seeds`` seeds.

    ``only``: the rows to train (``ldm_concat``, ``ldm_controlnet``, ``ldm_concat_flow``
    (MR input), ``pix2pix``); the others are reported from their finished runs of the
    same configs, else as not run.
    ``data_root``, ``region``: a SynthRAD-layout dataset instead of the phantom.
    ``dose_rx``: score every row by dose too, with this prescription in Gy
    (``--dose``; :mod:`sct_jax.reproduce.dose`).
    ``input``: ``"cbct"`` trains every row on CBCT input instead of MR (the configs'
    ``cbct`` settings, :mod:`sct_jax.reproduce.synthrad_task2`) and adds the CBCT itself
    as a baseline row.
    ``samplers``: after each finished LDM-concat row, rows of its run sampled with the
    :data:`SAMPLER_VARIANTS` (``--samplers``).

    Raises:
      SctError: a bad config or dataset (no cases, too few for the split), before
        anything is trained or written.
    """

    table_chains = chains(input)
    slugs = [slug for _, slug, _ in table_chains]
    unknown = sorted(set(only or ()) - set(slugs))
    if unknown:
        raise ConfigError(f"--only {','.join(unknown)}: unknown method (expected some of "
                          f"{', '.join(slugs)})")
    out_dir = Path(out_dir)
    size = "tiny" if tiny else "small"
    samples = SAMPLES[size]
    data = baselines.data_overrides(data_root, region, anatomy_variation)
    # Every config is built and checked before the first run starts.
    probe = {"autoencoder": out_dir / "ldm_autoencoder" / "seed0",
             "diffusion": out_dir / "ldm_diffusion_uncond" / "seed0"}
    for words in ("autoencoder", "diffusion,concat", "diffusion,unconditional", "controlnet",
                  *(("diffusion,concat,flow",) if input == "mr" else ())):
        config = ldm_config(words, size, probe, 0, data, input)
        methods.get_method(config.method).validate_config(config)
    pix2pix_config(size, 0, data, input)

    first = ldm_config("autoencoder", size, probe, 0, data, input)
    # The data are found and split (a missing root, no case of the region, too few
    # cases for the split: one-line errors) before anything is compiled or written.
    splits = datasets.case_splits(first)
    test_cases = splits[first.eval.split]
    if first.eval.max_cases:
        test_cases = test_cases[:first.eval.max_cases]
    loaded = {c.id: baselines.load_reference(
        c, out_dir / "dose" if dose_rx else None, dose_rx or 2.0) for c in test_cases}
    references = {i: ref for i, (ref, _) in loaded.items()}
    ablate.enable_compilation_cache(out_dir)
    print(f"[seed03] scoring {len(references)} held-out head(s): "
          f"{', '.join(references)}")

    rows = []
    for k in range(int(seeds)):
        seed = int(first.seed) + k
        runs = {name: out_dir / name / f"seed{k}" for name in (
            "ldm_autoencoder", "ldm_concat", "ldm_diffusion_uncond", "ldm_controlnet",
            "ldm_concat_flow", "pix2pix")}
        for label, slug, chain in table_chains:
            stages = (_chain_configs(chain, size, runs, seed, data, input) if chain
                      else [(pix2pix_config(size, seed, data, input), runs["pix2pix"])])
            config, workdir = stages[-1]
            digest = ablate.config_digest(config)
            if only is not None and slug not in only:
                row = _cached_row(workdir, digest, references)
                if row is not None:
                    rows.append(row)
                    if samplers:
                        rows += sampler_rows(label, slug, config, workdir,
                                             out_dir / "samplers" / slug / f"seed{k}",
                                             references, samples, seed)
                elif k == 0:
                    rows.append(baselines.row(label, {}, None,
                                              note="not run (not in --only)"))
                continue
            wall = 0.0
            ae_note = ""
            for stage_config, stage_dir in stages:
                wall += train_stage(stage_config, stage_dir)
                if stage_config.method == "ldm_autoencoder":
                    ceiling = autoencoder_ceiling(stage_config, stage_dir, references)
                    ae_note = f"autoencoder recon {ceiling:.1f} HU; "
            t0 = time.perf_counter()
            if chain:
                scores = predict_and_score(config, workdir, references, samples)
                note = f"{ae_note}{sampler_label(config)}, mean of {samples} samples"
                if k == 0:
                    swap = mr_swap_mae(config, workdir, test_cases, references,
                                       [*test_cases, *splits["train"]])
                    other = f"another head's {modality.LABEL[input]}"
                    note += (f"; {other}: MAE {swap:.1f} HU" if math.isfinite(swap)
                             else f"; {other}: n/a (no other head on its grid)")
            else:
                scores = predict_and_score(config, workdir, references, 1)
                note = "axial slices" + (" 64 x 96" if not tiny else "")
            row = baselines.row(label, scores, seed, wall + time.perf_counter() - t0, note)
            atomic_write_text(workdir / RESULT_FILE, json.dumps(
                {"config_digest": digest, "row": row}, indent=1, default=str))
            rows.append(row)
            if samplers:
                rows += sampler_rows(label, slug, config, workdir,
                                     out_dir / "samplers" / slug / f"seed{k}", references,
                                     samples, seed)

    rows.append(baselines.constant_row(list(references.values())))
    rows += baselines.fitted_rows(first, splits["train"], test_cases, references)
    if input == "cbct":
        rows.append(baselines.cbct_row(test_cases, references))
    rows.append(baselines.floor_row(test_cases, references, "noise-free CT: CT noise only"))
    return rows
