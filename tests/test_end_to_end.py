"""The real pipeline on tiny configs: phantom data -> train -> predict -> score -> panels."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sct_jax.cli import run
from sct_jax.config_utils import load_config_file
from sct_jax.data.io import load_volume
from sct_jax.training import data as train_data
from sct_jax.training import loop


@pytest.mark.parametrize("config_path", ["configs/pix2pix_pelvis.py:tiny",
                                         "configs/pix2pix3d_pelvis.py:tiny"])
def test_train_evaluate_tiny(tmp_path, config_path):
    config = load_config_file(config_path)
    result = loop.train(config, tmp_path)
    assert result.step == config.train.steps
    assert np.isfinite(result.metrics["loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
    assert {"gen/grad_norm", "disc/grad_norm", "gen/param_norm", "compile_s"} <= set(records[0])

    report = run.evaluate_run(config, tmp_path)
    assert len(report.cases) == config.eval.max_cases
    case = train_data.case_splits(config)["test"][0]
    sct = load_volume(tmp_path / "predictions" / case.id / "sct.nii.gz")
    mr = load_volume(case.mr)
    assert sct.shape == mr.shape
    np.testing.assert_allclose(sct.affine, mr.affine)
    assert -1024.0 <= sct.data.min() and sct.data.max() <= 3000.0
    summary = json.loads((tmp_path / "predictions" / "metrics.json").read_text())
    assert summary["n_scored"] == 1
    assert (tmp_path / "predictions" / "metrics.csv").exists()
    assert (tmp_path / "predictions" / "metrics_baseline.json").exists()
    assert (tmp_path / "predictions" / case.id / "panel.png").stat().st_size > 10_000


def _cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


@pytest.mark.parametrize("override,expected", [
    ("--config.method=pix3pix", "config.method='pix3pix' is not a known method"),
    ("--config.data.crop=(30,32)", "config.data.crop=(30, 32) is not divisible"),
])
def test_train_cli_bad_config_is_one_line(tmp_path, override, expected):
    proc = _cli("train.py", "--config", "configs/pix2pix_pelvis.py:tiny", "--workdir",
                str(tmp_path / "run"), override)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_cli_without_checkpoint(tmp_path):
    proc = _cli("evaluate.py", "--config", "configs/pix2pix_pelvis.py:tiny",
                "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "batch_spec.json" in proc.stderr
    assert not (tmp_path / "predictions").exists()


def test_train_cli_bad_data_writes_nothing(tmp_path):
    case = tmp_path / "data" / "1PA001"
    case.mkdir(parents=True)
    (case / "mr.nii.gz").write_bytes(b"not a nifti")
    (case / "ct.nii.gz").write_bytes(b"not a nifti")
    proc = _cli("train.py", "--config", "configs/pix2pix_pelvis.py:tiny", "--workdir",
                str(tmp_path / "run"), f"--config.data.root={tmp_path / 'data'}",
                "--config.data.region=")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "1PA001/mr.nii.gz: unreadable or truncated NIfTI" in lines[0]
    assert not (tmp_path / "run").exists()
