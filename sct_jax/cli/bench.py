"""``sct-bench``: the speed and memory benchmarks (JSON lines on stdout).

  sct-bench --suite quick|cpu|accel [--out benchmarks/results/DATE_SUITE.json]
  sct-bench conv|train_step|ab|meta_step|pipeline|sampling|sampler_accuracy [options]
  sct-bench fsdp_memory|remat_memory|vmap_seeds [options]
  sct-bench --list

A suite runs each benchmark in its own process and writes one results document (the
machine, the load, every row with its command); ``BENCHMARKS.md`` quotes such
documents kept under ``benchmarks/results/``. ``sct-bench NAME --help`` shows a
benchmark's options.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from sct_jax.bench import run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in run.BENCHMARKS:
        importlib.import_module(f"sct_jax.bench.{argv[0]}").main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="sct-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(run.SUITES))
    parser.add_argument("--out", help="write the results document (JSON) here")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per benchmark process")
    parser.add_argument("--only", default="",
                        help="comma-separated benchmarks: run only their suite entries")
    parser.add_argument("--list", action="store_true", help="list suites and benchmarks")
    args = parser.parse_args(argv)
    if args.list:
        for suite, entries in run.SUITES.items():
            print(f"suite {suite}:")
            for name, entry_args in entries:
                print(f"  {name} {' '.join(entry_args)}")
        print("benchmarks: " + ", ".join(run.BENCHMARKS))
        return 0
    if args.suite is None:
        parser.error(f"give --suite or a benchmark name ({', '.join(run.BENCHMARKS)})")
    if args.out and os.path.isdir(args.out):
        print(f"error: {args.out}: is a directory, expected a file name", file=sys.stderr)
        return 2
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(run.BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmarks {unknown}; expected {run.BENCHMARKS}")
    document = run.run_suite(args.suite, args.timeout, only, args.out)
    failed = [r for r in document["rows"] if "failed" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
