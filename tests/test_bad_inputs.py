"""What bad input gets: every entry point against bad input, concurrency and faults.

:data:`ROWS` is the contract, one row per case: the issue item, the exact command a user
types, the exit status and a fragment of the one ``error:`` line. The README's "What bad
input gets" table is checked against it (:func:`test_readme_table_matches_rows`).

Command rows run in this process (the entry point's own ``main``/``run_main`` with the
argv; :func:`test_in_process_harness_matches_a_real_process` runs two of them as real
processes) and assert: the exit status, exactly one stderr line naming the file or flag,
every input file unchanged (SHA-256) and nothing new on disk (no half-written output).
Rows marked ``(test)`` need a fault or a trained run and are checked by the named test.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import importlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from sct_jax import runs
from sct_jax.training import loop
from sct_jax import guard
from sct_jax.data import synthrad
from sct_jax.data.io import load_volume, save_volume
from sct_jax.errors import ConfigError, DataError, RunFailed
from sct_jax.io_guard import refuse_overwrite

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])
SHAPE = (24, 20, 6)
TINY = "configs/pix2pix_pelvis.py:tiny"
PREDICT = "python -m sct_jax.predict"


@dataclasses.dataclass(frozen=True)
class Row:
    item: int
    what: str
    command: str  # {data}, {pred}, {tmp}, {case} are filled in per test
    code: int
    message: str  # a fragment of the single stderr line
    seen: str = ""  # for the README, where the message is not an error line


ROWS = [
    Row(1, "score with --out onto a reference CT",
        "python evaluate.py --pred {pred} --data {data} --out {case}/ct.nii.gz",
        2, "inside the case folder"),
    Row(1, "QA report onto the input MR",
        "python -m sct_jax.cli.qa --mr {case}/mr.nii.gz --sct {pred}/1PA001/sct.nii.gz "
        "--region pelvis --report {case}/mr.nii.gz", 2, "is the input"),
    Row(1, "QA figure through a symlink onto the sCT",
        "python -m sct_jax.cli.qa --mr {case}/mr.nii.gz --sct {pred}/1PA001/sct.nii.gz "
        "--region pelvis --report {tmp}/qa.json --png {tmp}/link.png", 2, "is the input"),
    Row(1, "DICOM export into the folder holding the sCT",
        "python -m sct_jax.cli.export_dicom --sct {pred}/1PA001/sct.nii.gz --out {pred}/1PA001",
        2, "holds the input"),
    Row(2, "a second trainer on a run directory in use",
        f"python train.py --config {TINY} --workdir {{tmp}}/locked", 2, "held by pid"),
    Row(2, "resume with another crop",
        f"python train.py --config {TINY} --workdir {{tmp}}/resumed "
        "--config.data.crop=(64,64)", 2, "data.crop"),
    Row(3, "a 114-byte .nii.gz declaring 1000^3 voxels",
        "python -m sct_jax.cli.qa --mr {tmp}/bomb.nii.gz --sct {pred}/1PA001/sct.nii.gz "
        "--region pelvis --report {tmp}/qa.json", 2, "header declares 1000 x 1000 x 1000"),
    Row(4, "reference CT in stored values (no rescale intercept)",
        "python evaluate.py --pred {pred} --data {raw}", 2, "rescale slope/intercept"),
    Row(4, "sCT in attenuation units exported",
        "python -m sct_jax.cli.export_dicom --sct {tmp}/mu.nii.gz --out {tmp}/dcm",
        2, "attenuation"),
    Row(5, "unknown variant word", "python train.py --config configs/pix2pix_pelvis.py:tinyy",
        2, "unknown config variant"),
    Row(5, "unknown config key", f"python train.py --config {TINY} --config.train.stepz=3",
        2, "did you mean train.steps?"),
    Row(5, "wrong type", f"python train.py --config {TINY} --config.train.steps=abc",
        2, "--config.train.steps=abc"),
    Row(5, "keep_checkpoints < 1",
        f"python train.py --config {TINY} --config.train.keep_checkpoints=0",
        2, "train.keep_checkpoints=0 must be >= 1"),
    Row(5, "batch size 0", f"python train.py --config {TINY} --config.train.batch_size=0",
        2, "train.batch_size=0 must be >= 1"),
    Row(5, "workdir that is a file", f"python train.py --config {TINY} --workdir {{tmp}}/afile",
        2, "is a file"),
    Row(5, "a required flag missing", "python -m sct_jax.cli.qa --mr {case}/mr.nii.gz",
        2, "missing --sct, --report"),
    Row(6, "disk full while saving a checkpoint (test)",
        f"python train.py --config {TINY} --workdir W", 1, "no space left on device",
        "`error: ...no space left on device while saving step N; step N-1 is intact...`; "
        "the same command resumes"),
    Row(6, "damaged latest checkpoint (test)",
        f"python train.py --config {TINY} --workdir W", 0, "is damaged",
        "a warning naming both steps; the damaged one moved to checkpoints_damaged/"),
    Row(7, "QA of an sCT that fails",
        "python -m sct_jax.cli.qa --mr {case}/mr.nii.gz --sct {tmp}/flat.nii.gz "
        "--region pelvis --report {tmp}/qa.json", 1, "", "the QA table, status fail"),
    Row(7, "internal error (test)", "any entry point", 3, "internal error",
        "the traceback, then `error: internal error (...)`"),
    Row(8, "a case id in two regions",
        "python evaluate.py --pred {pred} --data {twin}", 2, "appear in several regions"),
    Row(8, "folders that are not cases (test)", "any discovery", 0, "skipped",
        "one warning listing them (no MR, broken or looping symlink)"),
    Row(9, "phantom into a dataset with another seed",
        "python -m sct_jax.data.phantom --out {phantom} --cases 1 --seed 1 --shape 16 16 4",
        2, "seed 0 -> 1"),
    Row(10, "QA of a real CT with noise (test)", "python -m sct_jax.cli.qa ...", 0, "pass",
        "`hu_range` and `bone_outside_body` pass"),
    # Item 11: "150 hostile inputs" against sct-predict ({p}: predict_world's inputs).
    Row(11, "sCT onto the CT of a case folder",
        f"{PREDICT} -i {{case}}/mr.nii.gz -o {{case}}/ct.nii.gz -m {{model}}",
        2, "inside the case folder"),
    Row(11, "sCT onto the --mask",
        f"{PREDICT} -i {{p}}/patient/t1.nii.gz --mask {{p}}/patient/body.nii.gz "
        "-o {p}/patient/body.nii.gz -m {model}", 2, "is the input"),
    Row(11, "--samples 2: the std map onto the input MR",
        f"{PREDICT} -i {{p}}/patient/x_std.nii.gz -o {{p}}/patient/x.nii.gz -m {{model}} "
        "--samples 2", 2, "the std map of"),
    Row(11, "sCT into a run's checkpoints",
        f"{PREDICT} -i {{p}}/patient/t1.nii.gz -o {{run}}/checkpoints/sct.nii.gz -m {{run}}",
        2, "would land in"),
    Row(11, "sCT into the exported model",
        f"{PREDICT} -i {{p}}/patient/t1.nii.gz -o {{model}}/sct.nii.gz -m {{model}}",
        2, "would land in"),
    Row(11, "a folder of MRs holding an earlier run's outputs",
        f"{PREDICT} -i {{p}}/mrs -o {{p}}/scts -m {{model}}", 0,
        "skipped 2 earlier sct-predict output(s)",
        "one line `skipped 2 earlier sct-predict output(s) in ... (*_sct, *_std): "
        "a_sct.nii.gz, a_sct_std.nii.gz`; only the MRs are predicted"),
    Row(11, "an MR with a zero affine",
        f"{PREDICT} -i {{p}}/zero_affine.nii.gz -o {{p}}/sct.nii.gz -m {{model}}",
        2, "zero voxel size"),
    Row(11, "an MR with a NaN affine",
        f"{PREDICT} -i {{p}}/nan_affine.nii.gz -o {{p}}/sct.nii.gz -m {{model}}",
        2, "holds NaN or Inf"),
    Row(11, "an MR with a singular affine",
        f"{PREDICT} -i {{p}}/singular_affine.nii.gz -o {{p}}/sct.nii.gz -m {{model}}",
        2, "affine is singular"),
    Row(11, "-o under a file",
        f"{PREDICT} -i {{p}}/patient/t1.nii.gz -o {{p}}/afile/sct.nii.gz -m {{model}}",
        2, "is a file, not a folder"),
    Row(11, "-o an existing folder (single input)",
        f"{PREDICT} -i {{p}}/patient/t1.nii.gz -o {{p}}/adir.nii.gz -m {{model}}",
        2, "is an existing folder"),
    Row(11, "-o in a read-only folder (test)", f"{PREDICT} -i mr.nii.gz -o ro/sct.nii.gz -m M",
        2, "is not writable"),
    Row(11, "disk full in a folder run (test)", f"{PREDICT} -i mrs/ -o scts/ -m M", 1,
        "no space left on device",
        "`error: scts/b_sct.nii.gz: no space left on device; 1 of 2 sCT(s) finished "
        "before it (free space, then rerun with --continue)`"),
    Row(11, "a 972 KB .nii.gz declaring 1000^3 uint8 voxels",
        f"{PREDICT} -i {{p}}/big.nii.gz -o {{p}}/sct.nii.gz -m {{model}}",
        2, "header declares 1000 x 1000 x 1000"),
    Row(11, "a 0.3 MB .nii.gz declaring 306 MiB of voxels",
        f"{PREDICT} -i {{p}}/zeros32.nii.gz -o {{p}}/sct.nii.gz -m {{model}}",
        2, "a decompression bomb"),
    Row(11, "a 10 mm MR that becomes 1280 x 1280 x 128 at the training spacing",
        f"{PREDICT} -i {{p}}/coarse.nii.gz -o {{p}}/sct.nii.gz -m {{model}}",
        2, "become 1280 x 1280 x 128"),
    Row(11, "SIGTERM while an sCT is saved (test)", f"{PREDICT} -i mrs/ -o scts/ -m M", 1,
        "stopped by signal SIGTERM",
        "`error: sct-predict: stopped by signal SIGTERM; ...`, no `.tmp-*` file; a rerun "
        "removes one a SIGKILL left"),
    Row(11, "--samples 1 onto an sCT with an old std map (test)",
        f"{PREDICT} -i mr.nii.gz -o x.nii.gz -m M", 0, "",
        "the sCT; the old `x_std.nii.gz` is removed"),
    Row(11, "an all-zero MR", f"{PREDICT} -i {{p}}/blank.nii.gz -o {{p}}/sct.nii.gz "
        "-m {model}", 2, "no body found"),
    Row(11, "an MR oblique by 30 degrees",
        f"{PREDICT} -i {{p}}/oblique.nii.gz -o {{p}}/sct.nii.gz -m {{model}}", 0,
        "rotated 30.0 degrees from the scanner axes",
        "the sCT on the MR's grid, and one line: `...oblique MR: its voxel axes are rotated "
        "30.0 degrees from the scanner axes...`"),
    Row(11, "--continue after an interrupted folder run",
        f"{PREDICT} -i {{p}}/mrs2 -o {{p}}/done -m {{model}} --continue", 0,
        "--continue: 1 input(s) already have their sCT, 1 to predict",
        "one line `--continue: 1 input(s) already have their sCT, 1 to predict`; the "
        "existing sCT is not touched"),
    Row(11, "--report onto the input MR",
        f"{PREDICT} -i {{p}}/patient/t1.nii.gz -o {{p}}/sct.nii.gz -m {{model}} "
        "--report {p}/patient/t1.nii.gz", 2, "is the input"),
    Row(12, "DICOM export --like a folder of two patients",
        "python -m sct_jax.cli.export_dicom --sct {pred}/1PA001/sct.nii.gz --out {tmp}/dcm "
        "--like {tmp}/two_patients", 2, "2 patients (PatientID 'PAT-1', 'PAT-2')"),
    Row(12, "DICOM export with a series number DICOM's IS cannot hold",
        "python -m sct_jax.cli.export_dicom --sct {pred}/1PA001/sct.nii.gz --out {tmp}/dcm "
        "--series-number 99999999999999", 2, "argument --series-number: 99999999999999 is out "
        "of range"),
    Row(12, "DICOM export with a --source the series description cannot hold",
        "python -m sct_jax.cli.export_dicom --sct {pred}/1PA001/sct.nii.gz --out {tmp}/dcm "
        "--source 'MR T1 of the pelvis, pix2pix model trained on site A data'", 2,
        "argument --source: "),
    Row(12, "two config overrides, the second unknown",
        "python train.py --config configs/ldm_brain.py:diffusion,tiny "
        "--config.ldm.autoencoder_workdir={tmp}/ae --config.ldm.objectiv=flow", 2,
        "--config.ldm.objectiv: unknown config key"),
    Row(12, "QA of an MR with a zero voxel size",
        "python -m sct_jax.cli.qa --mr {tmp}/zero_spacing_mr.nii.gz "
        "--sct {pred}/1PA001/sct.nii.gz --region pelvis --report {tmp}/qa.json", 2,
        "zero voxel size (2 x 0 x 2.5 mm)"),
    Row(12, "score an sCT stored with the x axis flipped (test)",
        "python evaluate.py --pred P --data D", 0, "",
        "scored on the CT's grid (reoriented by its affine, lossless): the metrics of the "
        "unflipped file (`tests/test_evaluate_cli.py`)"),
    Row(12, "score an sCT on a grid with another origin",
        "python evaluate.py --pred {tmp}/shifted --data {data}", 2,
        "not on the grid of the reference CT"),
    # Item 13: a seed table on the user's own data (sct-reproduce --data; issue #23).
    Row(13, "seed table on a --data folder that does not exist",
        "python -m sct_jax.reproduce seed03 --tiny --data {tmp}/nodata --out {tmp}/table",
        2, "--data folder not found"),
    Row(13, "seed table on an empty --data folder",
        "python -m sct_jax.reproduce seed03 --tiny --data {tmp}/empty --out {tmp}/table",
        2, "no cases found for region 'brain'"),
    Row(13, "seed table on --data with no case of the region",
        "python -m sct_jax.reproduce seed03 --tiny --data {data} --out {tmp}/table",
        2, "no cases found for region 'brain'"),
    Row(13, "seed table on --data with too few cases for the split",
        "python -m sct_jax.reproduce seed02 --tiny --data {phantom} --out {tmp}/table",
        2, "split is empty (1 case(s)"),
    Row(13, "seed table with --region but no --data",
        "python -m sct_jax.reproduce seed02 --tiny --region brain --out {tmp}/table",
        2, "--region brain: needs --data"),
    # Item 14: the LPIPS backbone named on the command line (issue #23).
    Row(14, "score with an LPIPS backbone file that is not there",
        "python evaluate.py --pred {pred} --data {data} --out {tmp}/m.json "
        "--lpips_weights {tmp}/vgg16.npz", 2, "--lpips_weights: VGG-16 weights file not found"),
]
COMMAND_ROWS = [r for r in ROWS if "(test)" not in r.what]


# ----------------------------------------------------------------------------- inputs

def _case_arrays(index: int):
    """A body (ellipse) of soft tissue and bone in air, HU; an MR that follows it."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    body = ((x - 12) / 10.0) ** 2 + ((y - 10) / 8.0) ** 2 < 1.0
    bone = ((x - 12) / 3.0) ** 2 + ((y - 10) / 2.0) ** 2 < 1.0
    rng = np.random.default_rng(index)
    ct = np.where(body, 40.0, -1000.0) + np.where(bone, 700.0, 0.0)
    ct = np.repeat(ct[..., None], SHAPE[2], axis=2) + rng.normal(0, 5, SHAPE)
    mr = np.where(ct > -500, 400.0 - 0.3 * np.clip(ct, 0, None), 0.0) + rng.gamma(2, 5, SHAPE)
    return mr.astype(np.float32), ct.astype(np.int16), np.repeat(body[..., None], SHAPE[2], 2)


def _write_case(root: Path, case_id: str, index: int, ct_offset: float = 0.0) -> Path:
    mr, ct, mask = _case_arrays(index)
    folder = root / case_id
    save_volume(folder / "mr.nii.gz", mr, AFFINE)
    save_volume(folder / "ct.nii.gz", (ct + ct_offset).astype(np.int16), AFFINE)
    save_volume(folder / "mask.nii.gz", mask, AFFINE)
    return folder


def _bomb(path: Path, size: int = 114) -> Path:
    """A gzip-compressed NIfTI header declaring 1000^3 float32 voxels, ``size`` bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.float32)
    raw = header.binaryblock + b"\0" * 4
    base = len(gzip.compress(raw, mtime=0))
    # the gzip FNAME field (a name, NUL-terminated) pads the file to the size asked for
    import io as _io
    buffer = _io.BytesIO()
    with gzip.GzipFile(filename="x" * (size - base - 1), mode="wb", fileobj=buffer,
                       mtime=0) as f:
        f.write(raw)
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size == size
    return path


@pytest.fixture
def world(tmp_path):
    """Every input the command rows read, in ``tmp_path``; returns the placeholders."""
    data = tmp_path / "data"
    for i, case_id in enumerate(("1PA001", "1PA002", "1PA003")):
        _write_case(data / "Task1" / "pelvis", case_id, i)
    pred = tmp_path / "pred"
    for i, case_id in enumerate(("1PA001", "1PA002")):
        mr, ct, _ = _case_arrays(i)
        save_volume(pred / case_id / "sct.nii.gz", ct.astype(np.float32) + 3.0, AFFINE)
    raw = tmp_path / "raw"
    for i, case_id in enumerate(("1PA001", "1PA002")):  # stored values, intercept missing
        _write_case(raw, case_id, i, ct_offset=1024.0)
    twin = tmp_path / "twin"
    _write_case(twin / "pelvis", "1PA001", 0)
    _write_case(twin / "brain", "1PA001", 1)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(pred / "1PA001" / "sct.nii.gz", out / "link.png")
    _bomb(out / "bomb.nii.gz")
    _, ct, _ = _case_arrays(0)
    save_volume(out / "mu.nii.gz", (ct.astype(np.float32) + 1000.0) / 1000.0 * 0.19, AFFINE)
    save_volume(out / "flat.nii.gz", np.full(SHAPE, 3000.0, np.float32), AFFINE)
    (out / "afile").write_text("not a folder")
    (out / "empty").mkdir()
    locked = out / "locked"
    locked.mkdir()
    (locked / "run.lock").write_text(json.dumps(
        {"pid": os.getpid(), "host": os.uname().nodename, "started": "2026-01-01T00:00:00"}))
    resumed = out / "resumed"
    (resumed / "checkpoints" / "5").mkdir(parents=True)
    from sct_jax.config_utils import load_config_file
    (resumed / "config.json").write_text(load_config_file(TINY).to_json_best_effort())
    _item12_inputs(out)
    phantom = tmp_path / "phantom"
    from sct_jax.data import phantom as phantom_module
    phantom_module.write_dataset(phantom, "pelvis", 1, 0, 0.0, (16, 16, 4))
    return {"data": data, "pred": pred, "tmp": out, "raw": raw, "twin": twin,
            "case": data / "Task1" / "pelvis" / "1PA001", "phantom": phantom,
            "root": tmp_path}


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> SHA-256 of its bytes ('dir'/'link' for others)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- runner

# Modules whose ``__main__`` block hands the command line to another module's ``main``.
CLI_OF = {"sct_jax.data.phantom": "sct_jax.data.phantom_cli"}


def run_in_process(command: str, capsys) -> tuple[int, str]:
    """Runs ``command`` through its entry point's ``main`` in this process.

    Returns ``(exit status, stderr)``: exactly what the shell would see, since each
    entry point's ``__main__`` only passes ``main``'s status to ``sys.exit``.
    """
    argv = shlex.split(command)
    assert argv[0] == "python"
    capsys.readouterr()
    code = 0
    if argv[1] == "-m":
        module = importlib.import_module(CLI_OF.get(argv[2], argv[2]))
        if not hasattr(module, "main"):  # a package run by its __main__ (sct_jax.reproduce)
            module = importlib.import_module(f"{argv[2]}.__main__")
        try:
            code = module.main(argv[3:])
        except SystemExit as e:
            code = e.code
    else:
        # train.py / evaluate.py: the console entry point they call, sct_jax.cli.<stem>
        module = importlib.import_module(f"sct_jax.cli.{Path(argv[1]).stem}")
        before = set(flags.FLAGS)
        saved_argv = sys.argv
        sys.argv = argv[1:]  # config_flags defines --config.* overrides from sys.argv
        try:
            module.run_main()  # absl's app.run: parses sys.argv, exits with the status
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = saved_argv
            flags.FLAGS.unparse_flags()
            for name in set(flags.FLAGS) - before:
                delattr(flags.FLAGS, name)
    return int(code or 0), capsys.readouterr().err


def _fill(command: str, world: dict) -> str:
    return command.format(**{k: str(v) for k, v in world.items()})


@pytest.mark.parametrize("row", COMMAND_ROWS, ids=[f"{r.item}-{r.what}" for r in COMMAND_ROWS])
def test_command_row(row, world, capsys, caplog, request):
    if row.command.startswith(PREDICT):  # a trained model and predict's inputs
        world = {**world, **request.getfixturevalue("predict_world")}
    command = _fill(row.command, world)
    before = _snapshot(world["root"])
    code, err = run_in_process(command, capsys)
    assert code == row.code, (command, err)
    after = _snapshot(world["root"])
    if row.code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("error: ") and row.message in lines[0], lines[0]
        # the line names a file or flag of the command
        named = [a for a in shlex.split(command)[2:] if a.startswith(("--", "/", "configs"))]
        assert "--" in row.message or any(
            a.split("=")[0].partition(":")[0] in lines[0] for a in named), lines[0]
        assert after == before  # inputs unchanged, nothing (half-)written
    else:
        assert row.message in err, err
        changed = {k for k in before if after.get(k) != before[k]}
        assert not changed, changed  # inputs unchanged
        assert not [k for k in after if Path(k).name.startswith(".tmp-")]


def test_in_process_harness_matches_a_real_process(world):
    """Two rows as real processes (two light entry points; train.py's flag handling is
    the same guard.parse_flags): the same status and the same single line."""
    for row in (ROWS[0], next(r for r in ROWS if r.item == 9)):
        command = _fill(row.command, world)
        argv = shlex.split(command)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == row.code, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and row.message in lines[0], proc.stderr


def test_readme_table_matches_rows():
    """README's "What bad input gets" holds exactly the table made from :data:`ROWS`
    (regenerate it with ``python tests/test_bad_inputs.py``)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## What bad input gets"):].split("\n## ")[0]
    assert readme_table() in section


def readme_table() -> str:
    """The README table, generated from :data:`ROWS` (``python tests/test_bad_inputs.py``)."""
    lines = ["| case | exit | what the user sees |", "|---|---|---|"]
    for r in ROWS:
        seen = r.seen or f"`error: ...{r.message}...`"
        lines.append(f"| {r.what.replace(' (test)', '')} | {r.code} | {seen} |")
    return "\n".join(lines)


# ------------------------------------------------------------- item 1: refuse_overwrite

def test_refuse_overwrite_follows_symlinks_and_case_folders(tmp_path):
    case = _write_case(tmp_path / "root", "1PA001", 0)
    link = tmp_path / "alias.json"
    os.symlink(case / "ct.nii.gz", link)
    with pytest.raises(DataError, match="is the input"):
        refuse_overwrite(link, [case / "ct.nii.gz"])
    with pytest.raises(DataError, match="case folder"):
        refuse_overwrite(case / "qa" / "report.json", [], tmp_path / "root")
    with pytest.raises(DataError, match="existing folder"):
        refuse_overwrite(case, [])
    # outside every case folder: allowed, returned resolved
    assert refuse_overwrite(tmp_path / "root" / "metrics.json", [case / "ct.nii.gz"],
                            tmp_path / "root") == (tmp_path / "root" / "metrics.json").resolve()


# ------------------------------------------------------------- item 3: no huge allocation

def test_bomb_header_fails_before_any_voxel_is_allocated(tmp_path):
    path = _bomb(tmp_path / "bomb.nii.gz")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # 1000^3 float32 would be 4 GB
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_voxel_cap_and_truncated_uncompressed_file(tmp_path, monkeypatch):
    data = np.zeros((20, 20, 20), np.int16)
    save_volume(tmp_path / "v.nii", data, AFFINE)
    assert load_volume(tmp_path / "v.nii").shape == (20, 20, 20)
    monkeypatch.setenv("SCT_JAX_MAX_VOXELS", "7999")
    with pytest.raises(DataError, match="cap of 7999"):
        load_volume(tmp_path / "v.nii")
    monkeypatch.delenv("SCT_JAX_MAX_VOXELS")
    raw = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-100])
    with pytest.raises(DataError, match="truncated or corrupt header"):
        load_volume(tmp_path / "cut.nii")


# --------------------------------------------------------------------- item 4: HU units

@pytest.mark.parametrize("transform, fragment", [
    (lambda ct: ct + 1024.0, "rescale slope/intercept"),
    (lambda ct: (ct + 1000.0) / 1000.0 * 0.19, "attenuation"),
    (lambda ct: ct - 1024.0, "twice-applied"),
])
def test_non_hu_ct_is_named_with_its_likely_cause(tmp_path, transform, fragment):
    from sct_jax.data import hu
    mr, ct, mask = _case_arrays(0)
    assert hu.non_hu_problem(ct.astype(np.float32), mask) is None
    assert fragment in hu.non_hu_problem(transform(ct.astype(np.float32)), mask)


def test_non_hu_can_be_allowed_explicitly(tmp_path, monkeypatch):
    case_dir = _write_case(tmp_path, "1PA001", 0, ct_offset=1024.0)
    case = synthrad.discover_cases(case_dir)[0]
    assert "rescale" in synthrad.validate_case(case)[0]
    monkeypatch.setenv("SCT_JAX_ALLOW_NON_HU", "1")
    assert synthrad.validate_case(case) == []


# ------------------------------------------------------------ item 5: run settings

@pytest.mark.parametrize("key, value, fragment", [
    ("steps", 0, "train.steps=0 must be >= 1"),
    ("log_every", -1, "train.log_every=-1 must be >= 1"),
    ("ckpt_every", 0, "train.ckpt_every=0 must be >= 1"),
    ("steps", "10", "train.steps='10' must be a whole number"),
    ("steps", True, "train.steps=True must be a whole number"),
])
def test_run_settings_are_checked(key, value, fragment):
    import ml_collections

    from sct_jax.config_utils import check_run_config, load_config_file
    config = load_config_file(TINY)
    check_run_config(config, "x.py")
    # as a config file could write it (a ConfigDict only type-checks overrides)
    tree = config.to_dict()
    tree["train"][key] = value
    with pytest.raises(ConfigError, match=f"x.py: {fragment}"):
        check_run_config(ml_collections.ConfigDict(tree), "x.py")


# ------------------------------------------------------- item 2: lock and config diff

def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    from sct_jax.runs import lock as run_dir
    lock = run_dir.RunLock(tmp_path).acquire()
    with pytest.raises(run_dir.RunDirBusy, match=f"held by pid {os.getpid()}"):
        run_dir.RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "run.lock").write_text(json.dumps(
        {"pid": int(dead), "host": os.uname().nodename, "started": "x"}))
    with caplog.at_level(logging.WARNING):
        lock = run_dir.RunLock(tmp_path).acquire()
    assert "stale lock" in caplog.text and f"pid {dead}" in caplog.text
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / "run.lock").write_text(json.dumps(
        {"pid": 1, "host": "another-host", "started": "x"}))
    with pytest.raises(run_dir.RunDirBusy, match="on host another-host"):
        run_dir.RunLock(tmp_path).acquire()


def test_changed_resume_keys_lists_model_and_data_keys_only():
    from sct_jax.config_utils import load_config_file
    from sct_jax.runs import lock as run_dir
    config = load_config_file(TINY)
    saved = json.loads(config.to_json_best_effort())
    assert run_dir.changed_resume_keys(saved, config) == []
    config.train.steps = 99  # extending a run is a resume
    config.optim.lr = 1e-5
    assert run_dir.changed_resume_keys(saved, config) == []
    config.data.crop = (64, 64)
    config.model.gen.ngf = 3
    config.method = "pgan"
    assert run_dir.changed_resume_keys(saved, config) == [
        "data.crop", "method", "model.gen.ngf"]


# ------------------------------------------------------------- item 6: real faults

def _tiny(steps):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import tiny_config
    return tiny_config(steps=steps)


def _synthetic(config, local_batch):
    from test_training import synthetic_dataset
    return synthetic_dataset(config, local_batch)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """pix2pix tiny, 3 steps, a checkpoint each step: the reference for item 6."""
    workdir = tmp_path_factory.mktemp("straight")
    result = loop.train(_tiny(3), workdir, make_dataset=_synthetic)
    return workdir, result


def test_full_disk_keeps_the_previous_checkpoint_and_resumes_exactly(straight_run, tmp_path,
                                                                    monkeypatch, capsys):
    import grain._src.python.checkpoint.handler as grain_handler

    real_save = grain_handler.CheckpointHandler.save

    def disk_full_at_step_3(self, directory, item=None, args=None):
        if Path(directory).parent.name.startswith("3."):  # orbax's temporary step folder
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real_save(self, directory, item, args)

    monkeypatch.setattr(grain_handler.CheckpointHandler, "save", disk_full_at_step_3)
    with pytest.raises(RunFailed) as info:
        loop.train(_tiny(3), tmp_path, make_dataset=_synthetic)
    message = str(info.value)
    assert "no space left on device while saving step 3" in message
    assert "step 2 is intact" in message and "\n" not in message
    assert guard.exit_code_for(info.value) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1", "2"]
    assert not (tmp_path / "run.lock").exists()
    monkeypatch.setattr(grain_handler.CheckpointHandler, "save", real_save)  # space is back
    resumed = loop.train(_tiny(3), tmp_path, make_dataset=_synthetic)
    _, straight = straight_run
    for a, b in zip(jax_leaves(straight.state), jax_leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("event")) for r in records] == [
        (1, None), (2, None), (2, "resume"), (3, None)]


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_damaged_latest_checkpoint_falls_back_with_a_warning(straight_run, tmp_path, caplog):
    """A reader skips a damaged latest checkpoint and moves nothing; training sets it
    aside so that the step can be saved again."""
    import jax

    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    for path in (workdir / "checkpoints" / "3" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"damaged")
    config = _tiny(3)
    expected = runs.load_state(config, straight_run[0], step=2)[1]
    with caplog.at_level(logging.WARNING):
        step, state = runs.load_state(config, workdir)
    assert step == 2
    # "is damaged": the test's own tmp folder name holds "damaged" (orbax warnings name it)
    warning = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warning) == 1 and "step 3 is damaged" in warning[0]
    assert "falling back to step 2" in warning[0]
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A reader never writes into the run.
    assert not (workdir / "checkpoints_damaged").exists()
    assert (workdir / "checkpoints" / "3").is_dir()
    # Training repairs it: step 3 is set aside (not deleted) and trained again.
    loop.train(_tiny(3), workdir, make_dataset=_synthetic)
    assert (workdir / "checkpoints_damaged" / "3").is_dir()
    assert runs.latest_step(workdir) == 3


def test_metrics_resume_drops_records_past_the_checkpoint(tmp_path):
    from sct_jax.training.logging import MetricWriter
    writer = MetricWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3, 4):  # 3 and 4 were logged, then the process was killed
        writer.write_scalars(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by the kill
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.mark_resume(2)
    writer.write_scalars(3, {"loss": 30.0})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("event"), r.get("loss")) for r in records] == [
        (1, None, 1.0), (2, None, 2.0), (2, "resume", None), (3, None, 30.0)]


# -------------------------------------------------------------- item 7: exit codes

def test_internal_error_is_status_3_with_its_traceback(capsys):
    def buggy():
        raise ZeroDivisionError("a bug")

    assert guard.run_main(buggy) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1] == (
        "error: internal error (ZeroDivisionError: a bug); please report the traceback above")
    assert guard.run_main(lambda: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", "/x"))) == 1
    assert capsys.readouterr().err == "error: /x: no space left on device\n"


@pytest.mark.parametrize("module", ["sct_jax.cli.qa", "sct_jax.cli.export_dicom",
                                    "sct_jax.data.phantom"])
def test_help_documents_the_exit_status(module, capsys):
    with pytest.raises(SystemExit) as info:
        importlib.import_module(CLI_OF.get(module, module)).main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0" in out and "2 bad input" in out and "3 internal error" in out


# ------------------------------------------------------------ item 8: case discovery

def test_discovery_lists_what_it_skipped(tmp_path, caplog):
    root = tmp_path / "root"
    _write_case(root, "1PA001", 0)
    (root / "1PA002").mkdir()  # no MR
    save_volume(root / "1PA002" / "ct.nii.gz", _case_arrays(0)[1], AFFINE)
    os.symlink(root / "gone", root / "1PA003")  # broken
    os.symlink(root / "1PA004", root / "1PA004")  # loops
    with caplog.at_level(logging.WARNING):
        cases = synthrad.discover_cases(root)
    assert [c.id for c in cases] == ["1PA001"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    for fragment in ("skipped 3", "1PA002 (no mr volume)", "1PA003 (broken or looping",
                     "1PA004 (broken or looping"):
        assert fragment in warnings[0]


def test_k_fold_config_selects_the_fold_and_refuses_a_fold_out_of_range(tmp_path):
    from sct_jax.config_utils import check_run_config, load_config_file
    from sct_jax.data import datasets as train_data
    for i in range(6):
        _write_case(tmp_path, f"1PA00{i + 1}", i)
    config = load_config_file(TINY)
    config.data.root = str(tmp_path)
    plain = train_data.case_splits(config)
    config.data.folds = 2
    vals = []
    for fold in (0, 1):
        config.data.fold = fold
        split = train_data.case_splits(config)
        assert split["test"] == plain["test"]
        vals.append([c.id for c in split["val"]])
    assert not set(vals[0]) & set(vals[1]) and len(vals[0] + vals[1]) == 5
    for folds, fold, message in ((1, 0, "data.folds=1"), (2, 2, "data.fold=2 must be below"),
                                 (0, 1, "K-fold is off")):
        config.data.folds, config.data.fold = folds, fold
        with pytest.raises(ConfigError, match=message) as err:
            check_run_config(config, "cfg.py")
        assert "\n" not in str(err.value)


def test_an_empty_split_is_an_error(tmp_path):
    from sct_jax.config_utils import load_config_file
    from sct_jax.data import datasets as train_data
    for i in range(2):
        _write_case(tmp_path, f"1PA00{i + 1}", i)
    config = load_config_file(TINY)
    config.data.root = str(tmp_path)
    with pytest.raises(DataError, match="the val split is empty"):
        train_data.case_splits(config)


# ------------------------------------------------------------- item 9: the phantom CLI

def test_phantom_overwrite_replaces_the_dataset_as_a_whole(tmp_path):
    from sct_jax.data import phantom, phantom_cli
    argv = ["--out", str(tmp_path), "--cases", "2", "--shape", "16", "16", "4"]
    assert phantom_cli.main(argv + ["--seed", "0"]) == 0
    assert phantom_cli.main(argv + ["--seed", "0"]) == 0  # the same settings: rewritten in place
    assert phantom_cli.main(argv[:3] + ["1"] + argv[4:] + ["--seed", "1", "--overwrite"]) == 0
    region = tmp_path / "Task1" / "pelvis"
    manifest = json.loads((region / "manifest.json").read_text())
    assert manifest["seed"] == 1 and len(manifest["cases"]) == 1
    assert sorted(p.name for p in region.iterdir()) == ["1PA001", "manifest.json"]
    fresh = phantom.generate_case("pelvis", 0, seed=1, shape=(16, 16, 4))
    np.testing.assert_array_equal(load_volume(region / "1PA001" / "ct.nii.gz").data,
                                  fresh["ct"].astype(np.int16))
    assert not [p for p in region.parent.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------- item 10: QA false alarms

def test_qa_passes_an_unclipped_noisy_ct_and_bone_near_the_outline():
    from sct_jax.evaluation import qa
    mr, ct, mask = _case_arrays(0)
    ct = ct.astype(np.float32) + np.random.default_rng(1).normal(0, 20, SHAPE)  # air < -1024
    assert (ct[~mask] < -1024).mean() > 0.05
    assert qa.check_hu_range(ct, np.ones(SHAPE, bool))["status"] == "pass"
    # skull-like bone 2 voxels (4 mm) outside a body outline that stops short of it
    ring = np.zeros(SHAPE, bool)
    ring[1:3, :, :] = True
    ct_bone = np.where(ring, 1200.0, ct)
    body = np.zeros(SHAPE, bool)
    body[3:, :, :] = True
    check, flagged = qa.check_bone_outside_body(ct_bone, body, spacing=(2.0, 2.0, 2.5))
    assert check["status"] == "pass" and not flagged.any()
    far = np.zeros(SHAPE, bool)
    far[3:, :, :] = True
    far[3:8, :, :] = False  # now the bone is 5-6 voxels (10-12 mm) outside
    assert qa.check_bone_outside_body(ct_bone, far, (2.0, 2.0, 2.5))[0]["status"] == "fail"


# ------------------------------------------------------- item 11: sct-predict, hostile

def _gzip_zeros_nifti(path: Path, shape, dtype) -> Path:
    """An honest gzip NIfTI of zeros, written in chunks (no array of that size in memory)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header.set_data_offset(352)
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    chunk = b"\0" * 2**24
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header.binaryblock + b"\0" * 4)
        for start in range(0, total, len(chunk)):
            f.write(chunk[:min(len(chunk), total - start)])
    return path


def _srow_nifti(path: Path, data: np.ndarray, srow: np.ndarray) -> Path:
    """A NIfTI whose only affine is the sform rows ``srow`` (3, 4), taken as given."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["srow_x"], header["srow_y"], header["srow_z"] = srow
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return path


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation


@pytest.fixture(scope="module")
def predict_model(tmp_path_factory):
    """One tiny pix2pix (2 steps on synthetic batches) as a run and as an export; the
    recorded training grid is the pelvis one (RAS, 1 x 1 x 2.5 mm)."""
    from sct_jax.data.geometry import TrainingGeometry
    from sct_jax.export.model import export_model

    workdir = tmp_path_factory.mktemp("predict_run")
    loop.train(_tiny(2), workdir, make_dataset=_synthetic)
    runs.write_geometry(TrainingGeometry(("R", "A", "S"), (1.0, 1.0, 2.5), "pelvis", 1),
                        workdir)
    model = export_model(workdir, tmp_path_factory.mktemp("predict_export") / "model")
    return {"model": model, "run": workdir}


@pytest.fixture(scope="module")
def predict_sources(tmp_path_factory):
    """Every input the sct-predict rows read (copied into each row's world)."""
    root = tmp_path_factory.mktemp("predict_sources")
    mr, _, body = _case_arrays(0)
    patient = root / "patient"
    save_volume(patient / "t1.nii.gz", mr, AFFINE)
    save_volume(patient / "body.nii.gz", body, AFFINE)
    save_volume(patient / "x_std.nii.gz", mr, AFFINE)  # an MR that happens to be *_std
    for folder in ("mrs", "mrs2"):
        for i, name in enumerate(("a", "b")):
            save_volume(root / folder / f"{name}.nii.gz", _case_arrays(i)[0], AFFINE)
    # an earlier run's outputs beside the MRs: not MRs to predict
    save_volume(root / "mrs" / "a_sct.nii.gz", _case_arrays(0)[1].astype(np.float32), AFFINE)
    save_volume(root / "mrs" / "a_sct_std.nii.gz", np.ones(SHAPE, np.float32), AFFINE)
    save_volume(root / "done" / "a_sct.nii.gz", _case_arrays(0)[1].astype(np.float32), AFFINE)
    _srow_nifti(root / "zero_affine.nii.gz", mr, np.zeros((3, 4)))
    nan = AFFINE[:3].copy()
    nan[0, 0] = np.nan
    _srow_nifti(root / "nan_affine.nii.gz", mr, nan)
    _srow_nifti(root / "singular_affine.nii.gz", mr,
                np.array([[2.0, 2.0, 0, 0], [2.0, 2.0, 0, 0], [0, 0, 2.5, 0]]))
    (root / "afile").write_text("a file, not a folder")
    (root / "adir.nii.gz").mkdir()
    _gzip_zeros_nifti(root / "big.nii.gz", (1000, 1000, 1000), np.uint8)  # ~972 KB
    _gzip_zeros_nifti(root / "zeros32.nii.gz", (448, 448, 400), np.float32)  # ~0.3 MB
    x, y = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    inside = ((x - 64) / 50.0) ** 2 + ((y - 64) / 40.0) ** 2 < 1.0
    coarse = np.repeat(np.where(inside, 400, 10)[..., None], 32, axis=2).astype(np.int16)
    save_volume(root / "coarse.nii.gz", coarse, np.diag([10.0, 10.0, 10.0, 1.0]))
    save_volume(root / "blank.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)
    save_volume(root / "oblique.nii.gz", mr, _rotation_z(30.0) @ AFFINE)
    return root


@pytest.fixture
def predict_world(world, predict_model, predict_sources):
    """``{p}``: a fresh copy of predict's inputs under the row's root; ``{model}``,
    ``{run}``: the module's trained model (outside the root: never written)."""
    target = world["root"] / "predict"
    shutil.copytree(predict_sources, target, symlinks=True)
    return {"p": target, **predict_model}


def _predict(argv, capsys) -> tuple[int, list[str]]:
    from sct_jax.cli import predict as predict_cli
    capsys.readouterr()
    code = predict_cli.main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("error: ")]


def test_predict_refuses_a_read_only_output_folder_before_loading(predict_world, monkeypatch,
                                                                 capsys):
    """Item 11: the output folder's permission is checked at planning (os.access is
    faked: as root, a read-only folder is writable). The model is never loaded."""
    from sct_jax.export import model as model_lib

    p = predict_world["p"]
    read_only = p / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
        False if Path(path) == read_only and mode & os.W_OK else real_access(path, mode)))
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code, lines = _predict(["-i", p / "patient" / "t1.nii.gz", "-o", read_only / "sct.nii.gz",
                            "-m", predict_world["model"]], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == f"error: {read_only / 'sct.nii.gz'}: {read_only} is not writable"
    assert list(read_only.iterdir()) == []


def test_predict_disk_full_then_continue(predict_world, monkeypatch, capsys):
    """Item 11: ENOSPC on the second sCT of a folder run: one error line, exit 1, the
    first sCT kept, no temporary file; ``--continue`` then predicts only the second."""
    from sct_jax.cli import predict as predict_cli

    p, model = predict_world["p"], predict_world["model"]
    real_save = predict_cli.save_like
    calls = []

    def disk_full_on_the_second(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(predict_cli, "save_like", disk_full_on_the_second)
    out = p / "scts"
    code, lines = _predict(["-i", p / "mrs2", "-o", out, "-m", model], capsys)
    assert code == 1
    assert _errors(lines) == [
        f"error: {out / 'b_sct.nii.gz'}: no space left on device; 1 of 2 sCT(s) finished "
        "before it (free space, then rerun with --continue)"], lines
    assert sorted(q.name for q in out.iterdir()) == ["a_sct.nii.gz"]
    first = (out / "a_sct.nii.gz").read_bytes()
    monkeypatch.setattr(predict_cli, "save_like", real_save)  # space is back
    code, lines = _predict(["-i", p / "mrs2", "-o", out, "-m", model, "--continue"], capsys)
    assert code == 0 and not _errors(lines)
    assert "--continue: 1 input(s) already have their sCT, 1 to predict" in lines
    assert sorted(q.name for q in out.iterdir()) == ["a_sct.nii.gz", "b_sct.nii.gz"]
    assert (out / "a_sct.nii.gz").read_bytes() == first  # not predicted again


def test_predict_folder_skips_earlier_outputs(predict_world, capsys):
    """Item 11: ``a_sct``/``a_sct_std`` in a folder of MRs are not predicted as MRs."""
    p = predict_world["p"]
    code, lines = _predict(["-i", p / "mrs", "-o", p / "scts", "-m", predict_world["model"]],
                           capsys)
    assert code == 0
    assert sorted(q.name for q in (p / "scts").iterdir()) == ["a_sct.nii.gz", "b_sct.nii.gz"]
    skipped = [line for line in lines if line.startswith("skipped")]
    assert skipped == [f"skipped 2 earlier sct-predict output(s) in {p / 'mrs'} (*_sct, "
                       "*_std): a_sct.nii.gz, a_sct_std.nii.gz"]


def test_predict_samples_1_removes_only_its_own_stale_std(predict_world, capsys):
    """Item 11: ``--samples 1`` onto ``x.nii.gz`` removes the old ``x_std.nii.gz`` (it
    would describe another sCT) and nothing else."""
    p = predict_world["p"]
    out = p / "out"
    for name in ("x.nii.gz", "x_std.nii.gz", "y_std.nii.gz", "x_std.nii"):
        save_volume(out / name, np.ones(SHAPE, np.float32), AFFINE)
    code, _ = _predict(["-i", p / "patient" / "t1.nii.gz", "-o", out / "x.nii.gz", "-m",
                        predict_world["model"]], capsys)
    assert code == 0
    assert sorted(q.name for q in out.iterdir()) == ["x.nii.gz", "x_std.nii", "y_std.nii.gz"]
    sct = load_volume(out / "x.nii.gz")
    assert sct.shape == SHAPE and np.array_equal(sct.affine, AFFINE)


def test_predict_removes_a_stale_temp_of_its_output_only(predict_world, capsys):
    """Item 11: a ``.tmp-*`` a killed writer left beside the output is removed by the
    next run; files of another output, or of another pattern, are kept."""
    p = predict_world["p"]
    out = p / "out"
    out.mkdir()
    stale = out / ".tmp-sct.nii.gz.ab12cd_9.nii.gz"
    kept = [out / ".tmp-other.nii.gz.ab12cd_9.nii.gz", out / ".tmp-ab12cd_9.nii.gz",
            out / ".tmp-sct.nii.gz.ab12cd_9x.nii.gz", out / "notes.txt"]
    for path in [stale, *kept]:
        path.write_bytes(b"half a file")
    code, _ = _predict(["-i", p / "patient" / "t1.nii.gz", "-o", out / "sct.nii.gz", "-m",
                        predict_world["model"]], capsys)
    assert code == 0 and not stale.exists()
    assert sorted(q.name for q in out.iterdir()) == sorted(
        ["sct.nii.gz"] + [k.name for k in kept])


_SLOW_SAVE = """
import sys, time
import nibabel
real_save = nibabel.save
def slow_save(img, filename):
    real_save(img, filename)  # the temporary file is on disk; the rename has not happened
    print("saving", filename, flush=True)
    time.sleep(300)
nibabel.save = slow_save
from sct_jax.cli import predict
sys.exit(predict.main(sys.argv[1:]))
"""


def test_predict_sigterm_mid_save_leaves_no_temp(predict_world, tmp_path):
    """Item 11: SIGTERM while the first sCT is being saved: exit 1, one error line, no
    ``.tmp-*`` and no sCT left behind."""
    import signal

    p = predict_world["p"]
    out = tmp_path / "scts"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, "-i", str(p / "mrs2"), "-o", str(out), "-m",
         str(predict_world["model"])], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("saving"), (line, proc.stderr.read() if proc.poll() else "")
        temp = Path(line.split()[1])
        assert temp.exists() and temp.name.startswith(".tmp-a_sct.nii.gz.")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "stopped by signal SIGTERM" in errors[0], err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


_PEAK_RSS = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr,
                  "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


@pytest.mark.parametrize("name, fragment", [
    ("big.nii.gz", "header declares 1000 x 1000 x 1000 = 1000000000 voxels"),
    ("coarse.nii.gz", "128 x 128 x 32 voxels of 10 x 10 x 10 mm become 1280 x 1280 x 128"),
])
def test_predict_memory_stays_bounded(predict_world, name, fragment):
    """Item 11: the 972 KB file declaring 1000^3 voxels (main: > 18 GB, then killed)
    and the 10 mm MR that would be 1280 x 1280 x 128 voxels at the training spacing
    (main: 5.9 GB, minutes) are refused in one line; the whole process (JAX imported)
    peaks below 1.5 GB (``ru_maxrss`` of the child; RLIMIT_AS cannot be used: JAX
    reserves far more address space than it touches)."""
    p = predict_world["p"]
    wrapper = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "sct_jax.predict", "-i",
         str(p / name), "-o", str(p / "sct.nii.gz"), "-m", str(predict_world["model"])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(wrapper.stdout)
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] == 2 and len(lines) == 1 and fragment in lines[0], result
    assert result["peak_mb"] < 1536, result
    assert not (p / "sct.nii.gz").exists()


def test_predict_report_records_model_software_and_geometry(predict_world, capsys):
    """Item 11: ``--report`` with an oblique MR: versions, device, the model's hash and
    step, per input its geometry, what was done to it, seconds and outputs."""
    import jax

    p, model = predict_world["p"], predict_world["model"]
    report_path = p / "reports" / "run.json"
    code, lines = _predict(["-i", p / "oblique.nii.gz", "-o", p / "sct.nii.gz", "-m", model,
                            "--report", report_path], capsys)
    assert code == 0, lines
    report = json.loads(report_path.read_text())
    assert report["software"]["jax"] == jax.__version__ and report["software"]["jaxlib"]
    assert report["software"]["sct_jax"] and report["software"]["device"].startswith("cpu")
    description = json.loads((Path(model) / "model.json").read_text())
    assert report["model"]["content_sha256"] == description["content_sha256"]
    assert report["model"]["step"] == 2 and report["model"]["kind"] == "export"
    assert report["model"]["path"] == str(Path(model).resolve())
    (record,) = report["inputs"]
    assert record["shape"] == list(SHAPE) and record["spacing_mm"] == [2.0, 2.0, 2.5]
    assert record["orientation"] == "RAS" and record["reoriented"] is False
    assert record["resampled"] is True and record["model_grid"] == [48, 40, 6]
    assert record["oblique"] is True and abs(record["oblique_degrees"] - 30.0) < 1e-3
    assert record["seconds"] > 0 and record["outputs"] == [str(p / "sct.nii.gz")]
    sct = nib.load(p / "sct.nii.gz")
    np.testing.assert_array_equal(sct.affine, nib.load(p / "oblique.nii.gz").affine)
    assert not list(report_path.parent.glob(".tmp-*"))


def test_model_identity_of_a_run_hashes_config_and_step(predict_model):
    import hashlib as _hashlib

    from sct_jax.export import model as model_lib

    run = model_lib.load_model(predict_model["run"])
    identity = model_lib.identity(run)
    raw = (Path(predict_model["run"]) / "config.json").read_bytes()
    assert identity["kind"] == "run" and identity["step"] == 2
    assert identity["content_sha256"] == _hashlib.sha256(raw + b"\0step=2").hexdigest()


# ------------------------------------------------- item 12: export and scoring hardening

def _item12_inputs(out: Path) -> None:
    """The inputs of the item-12 rows, under ``{tmp}``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    series = generate_uid()
    (out / "two_patients").mkdir()
    for k, patient in enumerate(("PAT-1", "PAT-2")):  # one series UID, two patients
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "MR", patient, series
        ds.save_as(out / "two_patients" / f"MR{k}.dcm", enforce_file_format=True)
    # A zero voxel size reaches a reader through the sform (a qform cannot hold it).
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header.set_sform(np.diag([2.0, 0.0, 2.5, 1.0]), code=1)
    nib.save(nib.Nifti1Image(_case_arrays(0)[0], None, header=header),
             out / "zero_spacing_mr.nii.gz")
    sct = _case_arrays(0)[1].astype(np.float32) + 3.0  # as {pred}/1PA001/sct.nii.gz
    shifted = AFFINE.copy()
    shifted[:3, 3] += (1.0, 0.0, 0.0)  # half a voxel
    save_volume(out / "shifted" / "1PA001" / "sct.nii.gz", sct, shifted)


@pytest.mark.parametrize("overrides", [
    "--config.train.steps=3 --config.train.stepz=3",
    "--config.train.stepz=3 --config.train.steps=3",
    "--config.model.gen.ngf=4 --config.train.stepz=3 --config.train.log_every=1",
])
def test_the_unknown_override_is_the_one_named(overrides, capsys):
    code, err = run_in_process(f"python train.py --config {TINY} {overrides}", capsys)
    assert code == 2
    assert err == ("error: configs/pix2pix_pelvis.py: --config.train.stepz: unknown config "
                   "key; did you mean train.steps?\n")


def test_without_the_flags_the_override_is_found_by_its_quoted_name():
    argv = ["train.py", "--config", "c.py", "--config.ldm.sampler=ddim",
            "--config.ldm.objectiv=flow"]
    assert guard._flag_error_message(AttributeError("'objectiv'"), argv) == (
        "c.py: --config.ldm.objectiv: unknown config key")


if __name__ == "__main__":
    print(readme_table())
