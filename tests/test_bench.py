"""The benchmark runner and CLI (no timing is asserted: speed lives in BENCHMARKS.md).

The suite runner is checked with the child process replaced by canned output (what a
row gets, what a failure looks like); one real benchmark runs in-process on two tiny
convolutions to check that its rows say where and how they ran.
"""

import json
import subprocess

import ml_collections
import pytest

from sct_jax.bench import run, timing
from sct_jax.cli import bench as cli
from sct_jax.models import conv_lowering as cl


class _Proc:
    def __init__(self, stdout, returncode=0, stderr=""):
        self.stdout, self.returncode, self.stderr = stdout, returncode, stderr


def test_rows_get_command_device_dtype_and_remat(monkeypatch, capsys):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]["PYTHONPATH"]))
        return _Proc('noise\n{"workload": "w", "dtype": "float32"}\n{"workload": "v"}\n',
                     returncode=1, stderr="Traceback\nKeyError: 'remat'\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    device = {"name": "TPU v5e", "memory_bytes": 17179869184}
    rows = run.run_one("train_step", ["--workload", "p2p_256_b6", "--dtype", "bfloat16",
                                      "--remat", "blocks"], 10.0, device)
    (cmd, pythonpath), = calls
    assert cmd[1:4] == ["-m", "sct_jax.bench.train_step", "--workload"]
    assert pythonpath.split(":")[0]  # this checkout's sct_jax first
    command = "sct-bench train_step --workload p2p_256_b6 --dtype bfloat16 --remat blocks"
    assert [r["command"] for r in rows] == [command] * 3
    # What the benchmark said wins; the arguments fill in what it did not say.
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16", "bfloat16"]
    assert all(r["remat"] == "blocks" and r["device"] == device for r in rows)
    assert rows[2]["failed"] == 1 and rows[2]["error"] == "KeyError: 'remat'"
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_defaults_without_dtype_or_remat_arguments(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: _Proc('{"workload": "w"}\n'))
    row, = run.run_one("conv", ["--quick"], 10.0, {"name": "cpu"})
    assert (row["dtype"], row["remat"], row["command"]) == ("float32", "none",
                                                            "sct-bench conv --quick")
    assert "failed" not in row


def test_timeout_is_a_failed_row(monkeypatch):
    def fake_run(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, 5.0, output=b'{"workload": "partial"}\n')

    monkeypatch.setattr(subprocess, "run", fake_run)
    rows = run.run_one("sampling", [], 5.0)
    assert rows[0]["workload"] == "partial"
    assert rows[1]["failed"] == "timeout" and "timed out" in rows[1]["error"]


def test_suite_writes_after_every_entry_and_filters(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "machine_info", lambda: {"cores": 2, "device": {"name": "x"}})
    monkeypatch.setitem(run.SUITES, "t", [("conv", ["--quick"]), ("pipeline", []),
                                          ("conv", ["--steps", "1"])])
    out = tmp_path / "t.json"
    seen = []

    def fake_run_one(name, args, timeout, device):
        if seen:  # the document on disk already holds the previous entry's rows
            assert len(json.loads(out.read_text())["rows"]) == len(seen)
        seen.append(name)
        return [{"workload": name, "args": args}]

    monkeypatch.setattr(run, "run_one", fake_run_one)
    document = run.run_suite("t", only=["conv"], out=str(out))
    assert seen == ["conv", "conv"] and document["complete"]
    assert json.loads(out.read_text()) == document
    assert document["command"] == "sct-bench --suite t --only conv"


def test_suites_name_only_existing_benchmarks():
    import importlib
    for suite, entries in run.SUITES.items():
        for name, _ in entries:
            assert name in run.BENCHMARKS, (suite, name)
    for name in run.BENCHMARKS:
        assert callable(importlib.import_module(f"sct_jax.bench.{name}").main)


def test_cli_writes_the_document_atomically(monkeypatch, tmp_path):
    document = {"suite": "quick", "machine": {"cores": 2}, "rows": [{"workload": "w"}]}
    monkeypatch.setattr(run, "run_suite", lambda suite, timeout, only, out: (
        run.write_results(document, out) if out else None) or document)
    out = tmp_path / "results" / "quick.json"
    assert cli.main(["--suite", "quick", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == document
    assert [p.name for p in out.parent.iterdir()] == ["quick.json"]
    document["rows"].append({"benchmark": "conv", "failed": 1})
    assert cli.main(["--suite", "quick"]) == 1


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["--suite", "quick", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: is a directory")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--suite", "gpu"])
    with pytest.raises(SystemExit):
        cli.main(["--suite", "quick", "--only", "profile"])


def test_run_settings_read_the_config_with_defaults():
    assert timing.run_settings(None) == {"dtype": "float32", "remat": "none"}
    old = ml_collections.ConfigDict({"model": {"conv_impl": "auto"}})
    assert timing.run_settings(old) == {"dtype": "float32", "remat": "none"}
    new = ml_collections.ConfigDict({"model": {"dtype": "bfloat16", "remat": "blocks"}})
    assert timing.run_settings(new) == {"dtype": "bfloat16", "remat": "blocks"}


@pytest.mark.parametrize("name", ["fsdp_memory", "remat_memory", "vmap_seeds"])
def test_memory_and_seed_benchmarks_answer_help(name, capsys):
    # Formerly loose scripts, now sct-bench NAME (the quick suite runs
    # them at tiny sizes; even those compile for tens of seconds each).
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--config" in out


def test_a_real_benchmark_row_says_where_it_ran(capsys):
    cli.main(["conv", "--workloads", "conv2d_k4s2_unet_d4,convT2d_k4s2_unet_u5",
              "--impls", "xla,phases", "--directions", "fwd", "--steps", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    conv_rows = [r for r in rows if r["workload"] != "matmul_2048"]
    assert [(r["workload"], r["impl"]) for r in conv_rows] == [
        ("conv2d_k4s2_unet_d4/fwd", "xla"), ("conv2d_k4s2_unet_d4/fwd", "phases"),
        ("convT2d_k4s2_unet_u5/fwd", "xla"), ("convT2d_k4s2_unet_u5/fwd", "phases")]
    device = timing.device_info()
    assert device["name"] and device["memory_bytes"] > 0
    for r in rows:
        assert r["device"] == device and (r["dtype"], r["remat"]) == ("float32", "none")
    table = cl.AUTO_BY_BACKEND.get(device["platform"], {"conv": "xla",
                                                        "conv_transpose": "xla"})
    assert [r["auto_picks"] for r in conv_rows] == [table["conv"]] * 2 + [
        table["conv_transpose"]] * 2
    machine = timing.machine_info()
    assert machine["cores"] >= 1 and machine["cpu_model"] and "load_average_1min" in machine
