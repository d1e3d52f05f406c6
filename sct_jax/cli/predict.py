"""sct-predict: one patient's MR (or a folder of them) -> sCT in HU on the MR's grid.

  sct-predict -i mr.nii.gz -o sct.nii.gz -m runs/pix2pix_pelvis_small
  sct-predict -i mr_dicom/ -o out/ -m model_dir/          # -> out/mr_dicom_sct.nii.gz
  sct-predict -i mrs/ -o scts/ -m model_dir/ --samples 8  # -> scts/<name>_sct.nii.gz,
                                                          #    scts/<name>_sct_std.nii.gz
  sct-predict -i mrs/ -o scts/ -m model_dir/ --continue --report scts/run.json
  sct-predict -i mr.nii.gz -o sct.nii.gz -m model_dir/ --tta     # + left-right flipped
  sct-predict -i mr.nii.gz -o sct.nii.gz -m run_a/ -m run_b/ -m run_c/   # an ensemble

INPUT: an MR file (``.nii``, ``.nii.gz``, ``.mha``), a DICOM MR series folder, or a
folder of MR files (earlier outputs in it, ``*_sct``/``*_std``, are skipped). MODEL: a
training run directory or an exported model (``sct-export-model``). Each MR is
reoriented (lossless) and, when its voxel size differs from the training data's,
resampled onto the model's training grid, predicted over the whole field of view, and
the sCT mapped back onto the MR's exact grid (shape, affine, qform/sform codes); an
oblique MR is named, with its angle. Bad input or configuration (an output onto or into
an input or a case folder, an unwritable output, a broken affine, an MR without a body,
a grid too large at the training spacing): one ``error: ...`` line, exit status 2,
before the model loads and before anything is written. Outputs are written atomically;
SIGTERM removes the one being written (exit 1); ``--continue`` then finishes a folder.
A CBCT model (``config.data.input=cbct``, SynthRAD Task 2) takes CBCTs in HU the same
ways (``sct-predict -i cbct.nii.gz -o sct.nii.gz -m runs/pix2pix_pelvis_small_cbct``),
each checked for HU units first. Also ``python -m sct_jax.predict``.

``--tta`` (test-time augmentation) also predicts each input flipped the ways training
flipped it (left-right), flips the prediction back and averages. Several ``-m`` make an
ensemble: models of one input kind and one training grid (e.g. seeds of a config), all
checked before any loads; the sCT is the mean over members, flips and ``--samples``
draws, and ``<name>_std.nii.gz`` their per-voxel std (``ddof=0``) whenever the mean is
over more than one (a single model without either writes none, and removes a stale
one). ``--report`` names every member (path, content hash, step) and the flags.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from sct_jax import guard, runs
from sct_jax.data import hu, modality
from sct_jax.data.io import remove_stale_temps, save_like, volume_suffix
from sct_jax.errors import EXIT_FAIL, ConfigError, DataError, RunFailed
from sct_jax.evaluation.qa import body_outline
from sct_jax.export import model as model_lib
from sct_jax.inference import geometry as geometry_lib
from sct_jax.inference import ensemble, inputs, run_report
from sct_jax.inference import predict as predict_lib

# Machine faults while writing an output: the work failed (exit 1), the input was fine.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


def build_parser() -> argparse.ArgumentParser:
    parser = guard.ArgumentParser(
        prog="sct-predict", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]) + "\n" + guard.EXIT_STATUS_HELP)
    parser.add_argument("-i", "--input", required=True,
                        help="MR file, DICOM MR series folder, or folder of MR files (a "
                             "CBCT model, config.data.input=cbct: CBCTs in HU, the same ways)")
    parser.add_argument("-o", "--output", required=True,
                        help="sCT file (.nii.gz, single input) or output folder")
    parser.add_argument("-m", "--model", required=True, action="append",
                        help="training run directory or exported model directory; "
                             "repeat for an ensemble (one input kind and training grid): "
                             "the mean sCT is written, the per-voxel std across members "
                             "as <name>_std.nii.gz")
    parser.add_argument("--samples", type=int, default=1,
                        help="sCT samples per MR (sampling methods; GANs: test-time "
                             "dropout): the mean is written, and the per-voxel std as "
                             "<name>_std.nii.gz (when the sCT is one prediction: 1 "
                             "sample, one -m, no --tta, a stale <name>_std.nii.gz of an "
                             "earlier run is removed)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: also predict each input flipped the "
                             "ways training flipped it (left-right), flip back, average; "
                             "the per-voxel std across the flips (and members, samples) "
                             "is written as <name>_std.nii.gz")
    parser.add_argument("--mask", default=None,
                        help="body mask on the MR's grid (single input; default: made "
                             "from the MR); it sets the MR intensity normalisation")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per network call (default: the model's "
                             "eval.batch_size)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="skip inputs whose sCT exists (an sCT appears only when it "
                             "is complete): finishes an interrupted folder run")
    parser.add_argument("--report", default=None,
                        help="write a JSON record of the run: versions, device, every "
                             "model (path, content hash, step), the flags (--tta) and, "
                             "per input, its geometry, "
                             "what was done to it, seconds and outputs")
    return parser


def _oblique_note(job: inputs.Job, grid: geometry_lib.ModelGrid, geometry) -> str:
    return (f"{job.source}: oblique MR: its voxel axes are rotated "
            f"{grid.oblique_degrees:.1f} degrees from the scanner axes; reoriented to "
            f"{''.join(geometry.axcodes)} by the nearest axes, not resliced (the network "
            f"sees the anatomy tilted by {grid.oblique_degrees:.1f} degrees; the sCT is on "
            "the MR's grid)")


def check_inputs(args: argparse.Namespace, plan: inputs.Plan, geometry, kind: str = "mr"):
    """Reads and checks every input before the model loads or anything is written
    (each is read again when its turn comes: memory holds one MR at a time). ``kind``:
    the model's input (``mr``, or ``cbct``: then each input is checked for HU units);
    ``geometry``: its training grid (an ensemble's members share it).

    Returns:
      ``(mask, records, notes)``: the ``--mask`` array (or ``None``), one report
      record per job, and the lines to print once every input passed.

    Raises:
      DataError: an unreadable MR or mask, an MR without a body, a grid too large.
    """
    mask, records, notes = None, [], []
    for job in plan.jobs:
        mr = inputs.load_job(job)
        if args.mask:
            mask = inputs.load_mask(args.mask, mr)
        # sct-qa's body outline: an MR without one (all zero, constant) has no anatomy
        # to predict; the network would still paint a plausible-looking sCT.
        label = modality.LABEL[kind]
        if kind == "cbct":  # in HU like a CT: the same unit mistakes, the same check
            hu.check_hu(mr.data, job.source, what="CBCT")
        if float(mr.data.max()) <= float(mr.data.min()) or not body_outline(mr.data,
                                                                            kind).any():
            raise DataError(f"{job.source}: no body found (the {label} has no signal above "
                            "its background: all zero or constant)")
        grid = geometry_lib.to_model_grid(mr.affine, mr.shape, geometry)
        inputs.check_grid_size(job, mr, grid)
        if grid.oblique:
            notes.append(_oblique_note(job, grid, geometry))
        records.append(run_report.input_record(job, mr, grid))
    return mask, records, notes


def _save(path, data, mr, written: list, finished: int, total: int) -> None:
    """Saves one output; a full disk is the work failing (exit 1), saying how many
    inputs were finished before it."""
    try:
        written.append(save_like(path, data, mr))
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        raise RunFailed(f"{path}: {(err.strerror or str(err)).lower()}; {finished} of "
                        f"{total} sCT(s) finished before it (free space, then rerun with "
                        "--continue)") from err


def check_models(args: argparse.Namespace) -> list[tuple[str, object, object]]:
    """Reads every ``-m`` folder's config and training geometry (no parameters) and
    checks them together: one input kind, one training grid, ``--samples`` possible.

    Returns:
      ``(path, config, geometry)`` per model, in the order given.

    Raises:
      DataError, ConfigError: ``<path>: <problem>`` for the first bad model.
    """
    named = []
    for path in args.model:
        geometry = model_lib.read_geometry(path)  # first: names a folder that is no model
        named.append((path, runs.read_config(path), geometry))
    ensemble.check_members(named)
    for path, saved, _ in named:
        try:
            predict_lib.check_samples(saved, args.samples)
        except ConfigError as err:
            if len(named) == 1:
                raise
            raise ConfigError(f"{path}: {err}") from None
    return named


def run(args: argparse.Namespace) -> list:
    """Predicts every input; returns the written paths."""
    started = run_report.now()
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    model_files, protect = [], []
    for path in args.model:
        files, folders = model_lib.input_paths(path)
        model_files += files
        protect += folders
    # Std maps are outputs whenever the mean may be over more than one draw: checked
    # before the models are (a bad output is named first, as for one model).
    std_maps = args.samples > 1 or args.tta or len(args.model) > 1
    plan = inputs.plan(args.input, args.output, mask=args.mask, report=args.report,
                       samples=args.samples, std_maps=std_maps, resume=args.resume,
                       model_files=model_files, protect=protect)
    # Run and export directories both hold config.json: every model is checked before
    # any parameters load.
    named = check_models(args)
    _, saved, geometry = named[0]
    mask, records, notes = check_inputs(args, plan, geometry, modality.spec(saved).kind)
    # Every input passed: only now say what was skipped, and load the models.
    if plan.skipped:
        print(f"skipped {len(plan.skipped)} earlier sct-predict output(s) in {args.input} "
              f"(*_sct, *_std): {', '.join(p.name for p in plan.skipped)}", file=sys.stderr)
    if plan.done:
        print(f"--continue: {len(plan.done)} input(s) already have their sCT, "
              f"{len(plan.jobs)} to predict", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    if not plan.jobs and not args.report:
        return []
    models, members = [], []
    for path in args.model:
        model = model_lib.load_model(path)
        config = model.config
        if args.batch_size is not None:
            config.eval.batch_size = int(args.batch_size)
        print(f"model: {config.method} ({config.name or 'unnamed'}), step {model.step}, "
              f"trained on {model.geometry.region or 'unknown region'} "
              f"{''.join(model.geometry.axcodes)} "
              f"{'x'.join(f'{s:g}' for s in model.geometry.spacing)} mm"
              + (f" [{path}]" if len(args.model) > 1 else ""), file=sys.stderr)
        models.append(model)
        members.append(ensemble.make_member(config, model.state, model.geometry, path))
    draws = ensemble.draw_count([m.config for m in members], args.samples, args.tta)
    if draws > 1:
        print(f"each sCT is the mean of {draws} predictions ({len(members)} model(s) x "
              f"{'flips' if args.tta else 'no flip'} x {args.samples} sample(s))",
              file=sys.stderr)
    written, finished = [], 0
    # Never removed as a "stale std map": a file the command reads.
    input_files = {j.source.resolve() for j in plan.jobs} | (
        {Path(args.mask).resolve()} if args.mask else set())
    for job, record in tqdm(list(zip(plan.jobs, records)), desc="sct-predict", unit="MR",
                            disable=None):
        t0 = time.perf_counter()
        mr = inputs.load_job(job)
        sct, std = predict_lib.predict_ensemble(members, mr, mask, args.samples, args.tta)
        # Leftovers of a writer killed outright (SIGKILL) beside these outputs.
        for path in (job.output, job.std_output):
            remove_stale_temps(path, suffix=volume_suffix(path))
        if std is not None:
            # The std map first: the sCT appearing means both are complete (--continue).
            _save(job.std_output, std, mr, written, finished, len(plan.jobs))
            record["outputs"].append(str(job.std_output))
        elif job.std_output.is_file() and job.std_output.resolve() not in input_files:
            # A std map of an earlier multi-draw run would no longer describe this sCT.
            job.std_output.unlink()
        _save(job.output, sct, mr, written, finished, len(plan.jobs))
        finished += 1
        record["outputs"].append(str(job.output))
        record["seconds"] = round(time.perf_counter() - t0, 2)
        tqdm.write(f"{job.source} -> {job.output} ({record['seconds']:.1f}s)", file=sys.stderr)
    if args.report:
        command = {"input": args.input, "output": args.output, "model": list(args.model),
                   "samples": args.samples, "tta": args.tta, "draws": draws,
                   "mask": args.mask, "batch_size": args.batch_size,
                   "continue": args.resume}
        remove_stale_temps(args.report)
        run_report.write(args.report, command=command,
                         models=[model_lib.identity(m) for m in models],
                         inputs=records + [run_report.skipped_record(j) for j in plan.done],
                         started=started)
        written.append(args.report)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    guard.quiet_libraries()
    try:
        with guard.sigterm_raises():
            return guard.run_main(lambda: run(args) and 0)
    except guard.Terminated as stop:
        # atomic_path removed the file being written; finished sCTs stay.
        print(f"error: sct-predict: {stop}; the output being written was removed, finished "
              "sCTs are kept (rerun with --continue to finish)", file=sys.stderr, flush=True)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
