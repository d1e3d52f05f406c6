"""sct-ablate (also ``python -m sct_jax.cli.ablate``): a grid of config overrides x seeds,
each trained and scored; one table. The logic is :mod:`sct_jax.reproduce.ablate`.

  sct-ablate --config configs/meta_pgan_pelvis.py:small \\
      --sweep meta.method=lookahead,jvp --seeds 3 --workdir runs/ablate_meta [--steps 500]
"""

from __future__ import annotations

from typing import Sequence

from sct_jax import guard
from sct_jax.reproduce.ablate import run_ablation


def main(argv: Sequence[str] | None = None) -> int:
    parser = guard.ArgumentParser(
        prog="sct-ablate",
        description="Train and score a grid of config overrides x seeds; print one table.",
        epilog=guard.EXIT_STATUS_HELP)
    parser.add_argument("--config", required=True, action="append",
                        help="path/to/config.py[:variants] (repeatable: compare methods)")
    parser.add_argument("--sweep", action="append", default=[],
                        help="key=v1,v2 (repeatable; the grid is their product)")
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="key=value for every run (repeatable)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per grid point")
    parser.add_argument("--workdir", default="runs/ablate", help="root of the runs")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--vmap", action="store_true",
                        help="train the seeds of each grid point as one vmapped program")
    args = parser.parse_args(argv)

    def run() -> int:
        run_ablation(args.config, args.sweep, args.seeds, args.workdir, args.steps,
                     sets=args.sets, vmap=args.vmap)
        return guard.EXIT_OK

    return guard.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
