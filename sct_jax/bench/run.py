"""Benchmark suites: each benchmark in its own process, one results document.

  sct-bench --suite quick --out benchmarks/results/2026-12-03_quick.json
  sct-bench --suite cpu | accel

(``sct-bench`` is ``python -m sct_jax.cli.bench``; run from the repository root, the
benchmarks read ``configs/``.) Each entry of a suite runs as ``python -m
sct_jax.bench.<name> <args>`` in its own process, so its peak RSS is its own, one
workload's compilation caches cannot flatter the next, and this process never
initialises an accelerator. The results document has ``machine`` (date, cores, CPU
model, load average at the start and the end, versions, device: name and memory;
``note: "shared machine, load N"`` when other work was running) and ``rows``, every row
with its ``command``, ``device``, ``dtype`` and ``remat``.

Suites: ``quick`` checks in a few minutes that every benchmark runs; ``cpu`` gives the
figures of ``BENCHMARKS.md`` on a CPU (about 15 minutes on 2 idle cores); ``accel`` the ones for
a GPU/TPU (lowerings of transposed convolutions, float32 vs bfloat16 and remat train
steps, sampling at the configured LDM size with DDIM and DPM-Solver++).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

import sct_jax

BENCHMARKS = ("ab", "conv", "fsdp_memory", "meta_step", "pipeline", "remat_memory",
              "sampler_accuracy", "sampling", "train_step", "vmap_seeds")

CPU_CONV_WORKLOADS = ("conv2d_k4s2_pix2pix", "convT2d_k4s2_pix2pix", "conv2d_k4s2_unet_d4",
                      "convT2d_k4s2_unet_u5", "convT2d_k4s2_unet_u1", "convT2d_k4s2_unet_u0",
                      "conv2d_k4s1_patchgan_c3", "conv2d_k4s1_patchgan_logits",
                      "convT2d_k3s2op1_pgan", "convT3d_k4s2_pix2pix")
_REDUCED_LDM = ["--config", "configs/ldm_brain.py", "--batch", "1", "--models", "reduced"]

# suite -> [(benchmark, arguments)]: each entry is one process.
SUITES: dict[str, list[tuple[str, list[str]]]] = {
    "quick": [
        ("sampler_accuracy", ["--steps", "10,20"]),
        ("conv", ["--quick"]),
        ("train_step", ["--workload", "p2p_small_b4", "--steps", "2"]),
        ("ab", ["--workload", "p2p_small_b4", "--variants", "impl=auto", "impl=xla",
                "--rounds", "2"]),
        ("meta_step", ["--small"]),
        ("pipeline", ["--quick"]),
        *[("sampling", ["--config", "configs/ldm_brain.py:tiny", "--steps", "5", "--batch",
                        "1", "--models", "configured", "--sampler", s, "--loop-repeats",
                        "3", "--loop-warmup", "1"]) for s in ("ddim", "dpmpp_2m")],
        # Tiny sizes (under a minute each on 2 cores): that they run, not what they measure.
        ("fsdp_memory", ["--small", "--config", "configs/ldm_brain.py:controlnet,tiny",
                         "--fsdp", "2", "--patch", "16"]),
        ("remat_memory", ["--config", "configs/pgan_pelvis.py:tiny"]),
        ("vmap_seeds", ["--seeds", "2", "--steps", "2"]),
    ],
    # The figures of BENCHMARKS.md: short, representative settings (medians of few
    # steps; ratios within one process are what compares across loads and machines).
    "cpu": [
        ("sampler_accuracy", []),
        *[("sampling", [*_REDUCED_LDM, "--steps", "10", "--sampler", s, "--call-repeats",
                        "3"]) for s in ("ddim", "dpmpp_2m")],
        ("ab", ["--workload", "p2p_256_b1", "--variants", "impl=auto", "impl=xla",
                "--rounds", "3"]),
        ("conv", ["--directions", "fwd_bwd", "--impls", "xla,phases,cpu_fast", "--steps",
                  "3", "--workloads", ",".join(CPU_CONV_WORKLOADS)]),
        ("meta_step", ["--small"]),
        ("pipeline", ["--quick"]),
        ("train_step", ["--workload", "p2p_256_b6", "--steps", "2"]),
    ],
    "accel": [
        ("conv", ["--directions", "fwd_bwd", "--impls", "xla,phases,cpu_fast", "--steps",
                  "20"]),
        *[("train_step", ["--workload", "p2p_256_b6", "--steps", "20", *extra]) for extra in
          ([], ["--impl", "xla"], ["--dtype", "bfloat16"], ["--remat", "blocks"],
           ["--dtype", "bfloat16", "--remat", "blocks"])],
        ("train_step", ["--workload", "p2p3d_128x128x32_b1", "--steps", "20"]),
        *[("sampling", ["--config", "configs/ldm_brain.py", "--batch", "1", "--models",
                        "configured", "--call-repeats", "10", "--loop-repeats", "3",
                        "--loop-warmup", "1", *extra]) for extra in
          (["--steps", "50", "--sampler", "ddim"], ["--steps", "20", "--sampler", "dpmpp_2m"],
           ["--steps", "50", "--sampler", "ddim", "--dtype", "bfloat16"])],
    ],
}


def _child_env() -> dict[str, str]:
    """The environment of a benchmark process: this ``sct_jax`` first on the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sct_jax.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _option(args: Sequence[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args[:-1] else default


def machine_info(timeout: float = 300.0) -> dict[str, Any]:
    """:func:`sct_jax.bench.timing.machine_info` from a child process (see above)."""
    proc = subprocess.run([sys.executable, "-m", "sct_jax.bench.timing"],
                          capture_output=True, text=True, timeout=timeout, env=_child_env())
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def run_one(name: str, args: Sequence[str], timeout: float, device: Any = None
            ) -> list[dict[str, Any]]:
    """Runs ``sct_jax.bench.<name> <args>`` in a child process; its JSON lines as rows.

    Every row gets the ``command`` that made it and, when the benchmark did not say,
    the ``device`` and the ``dtype``/``remat`` of its arguments. A failed process
    adds one row with ``failed`` (its exit status) and the last line of its stderr.
    """
    command = f"sct-bench {name} {shlex.join(args)}".strip()
    defaults = {"command": command, "device": device,
                "dtype": _option(args, "--dtype", "float32"),
                "remat": _option(args, "--remat", "none")}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", f"sct_jax.bench.{name}", *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=_child_env())
        stdout, returncode, stderr = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        returncode, stderr = "timeout", f"timed out after {timeout:.0f} s"
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({**defaults, **record, "command": command})
    if returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        rows.append({**defaults, "benchmark": name, "failed": returncode, "error": tail[0],
                     "seconds": round(time.perf_counter() - start, 1)})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def run_suite(suite: str, timeout: float = 1800.0, only: Sequence[str] = (),
              out: str | None = None) -> dict[str, Any]:
    """Runs the entries of ``SUITES[suite]``; returns ``{"suite", "machine", "rows"}``.

    Args:
      suite: a key of :data:`SUITES`.
      timeout: seconds per benchmark process.
      only: run only the entries of these benchmarks (all when empty).
      out: rewrite the results document there after every entry (``complete`` says
        whether the suite finished), so a long suite keeps what it measured.
    """
    machine = machine_info()
    start = time.perf_counter()
    command = f"sct-bench --suite {suite}" + (f" --only {','.join(only)}" if only else "")
    document = {"suite": suite, "command": command, "machine": machine, "rows": [],
                "complete": False}
    for name, args in SUITES[suite]:
        if only and name not in only:
            continue
        document["rows"].extend(run_one(name, args, timeout, machine.get("device")))
        machine["load_average_1min_end"] = round(os.getloadavg()[0], 2)
        machine["wall_s"] = round(time.perf_counter() - start, 1)
        if out:
            write_results(document, out)
    document["complete"] = True
    if out:
        write_results(document, out)
    return document


def write_results(document: dict[str, Any], path: str) -> None:
    """Writes ``document`` as indented JSON, atomically (a temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
