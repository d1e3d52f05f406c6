"""Run every benchmark of the project; one JSON line per workload on stdout.

  python benchmarks/run.py [--suite cpu|quick] [--out results.jsonl]

Each workload runs in its own process so its peak RSS is its own and one workload's
compilation caches cannot flatter the next. ``--suite quick`` runs a reduced set (a
minute or two) to check that every benchmark still works.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (script, arguments): each entry is one process.
SUITES = {
    "cpu": [
        ("conv.py", []),
        *[("train_step.py", ["--workload", w]) for w in
          ("p2p_256_b1", "p2p_256_b6", "p2p_320x192_b6", "p2p_small_b4", "p2p3d_128x128x32_b1")],
        ("train_step.py", ["--workload", "p2p_256_b1", "--impl", "xla"]),
        ("meta_step.py", []),
        ("pipeline.py", []),
        ("sampling.py", ["--config", "configs/ldm_brain.py", "--steps", "50", "--batch", "1",
                         "--models", "reduced"]),
        ("sampling.py", ["--config", "configs/ldm_brain.py:small", "--steps", "25",
                         "--batch", "1", "--models", "configured"]),
    ],
    "quick": [
        ("conv.py", ["--quick"]),
        ("train_step.py", ["--workload", "p2p_small_b4", "--steps", "2"]),
        ("meta_step.py", ["--small"]),
        ("pipeline.py", ["--quick"]),
        ("sampling.py", ["--config", "configs/ldm_brain.py:tiny", "--steps", "5", "--batch",
                         "1", "--models", "configured", "--loop-repeats", "3",
                         "--loop-warmup", "1"]),
    ],
}


def run_one(script: str, args: list[str], timeout: float) -> list[dict]:
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
        print(json.dumps({"benchmark": script, "skipped": "not present"}), flush=True)
        return []
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, path, *args], capture_output=True, text=True,
                          timeout=timeout)
    lines = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            lines.append(record)
            print(json.dumps(record), flush=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        print(json.dumps({"benchmark": script, "args": args, "failed": proc.returncode,
                          "error": tail[0], "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    args = parser.parse_args(argv)
    records = []
    for script, script_args in SUITES[args.suite]:
        records.extend(run_one(script, script_args, args.timeout))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
