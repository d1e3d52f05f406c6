"""Interleaved A/B timing of pix2pix train-step variants in one process.

  sct-bench ab --workload p2p_256_b1 --variants impl=auto impl=xla --rounds 5
  sct-bench ab --workload p2p_256_b6 --variants impl=auto impl=auto,dtype=bfloat16

(``sct-bench ab`` is ``python -m sct_jax.bench.ab``.) Every variant is compiled first,
then timed in rounds ``A B C A B C ...`` (one step of each per round, after one untimed
step each), so a change of the machine's load hits all variants alike. One JSON line per
variant (the fields of :func:`sct_jax.bench.timing.report`) with its per-round times,
``ratio_to_first`` (median seconds over the first variant's) and
``round_ratio_median`` (the median of the per-round ratios, robust to a load spike in
one round); the float32 matmul peak is measured before and after.

A variant is comma-separated ``key=value`` pairs: ``impl`` (``config.model.conv_impl``),
``dtype`` (``config.model.dtype``), ``remat`` (``config.model.remat``).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Sequence

import jax

from sct_jax.bench import timing
from sct_jax.bench.train_step import WORKLOADS, build, model_flops
from sct_jax.models.conv_lowering import IMPLS

KEYS = ("impl", "dtype", "remat")


def parse_variant(text: str) -> dict[str, str]:
    """``"impl=xla,dtype=bfloat16"`` -> ``{"impl": "xla", "dtype": "bfloat16"}``."""
    variant = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS or not value:
            raise ValueError(f"variant {text!r}: expected key=value pairs with keys {KEYS}")
        if key == "impl" and value not in IMPLS:
            raise ValueError(f"variant {text!r}: impl must be one of {IMPLS}")
        variant[key] = value
    return variant


def run(workload: str, variants: Sequence[dict[str, str]], rounds: int) -> list[dict]:
    """Compiles every variant, times them interleaved; returns (and prints) the lines."""
    peak = timing.matmul_peak_gflops()
    built = []
    for variant in variants:
        config, step, args, size = build(workload, variant.get("impl", "auto"),
                                         variant.get("dtype"), variant.get("remat"))
        compiled, compile_s = timing.compile_timed(step, *args)
        timing.block(compiled(*args))  # untimed first step
        built.append((variant, config, compiled, args, size, compile_s))
    times = [[] for _ in built]
    for _ in range(rounds):
        for i, (_, _, compiled, args, _, _) in enumerate(built):
            seconds, _ = timing.median_seconds(lambda: compiled(*args), 1, warmup=0)
            times[i].append(seconds)
    peak_end = timing.matmul_peak_gflops()
    lines = []
    for i, (variant, config, _, _, size, compile_s) in enumerate(built):
        median = statistics.median(times[i])
        label = ",".join(f"{k}={v}" for k, v in variant.items()) or "default"
        lines.append(timing.report(
            f"pix2pix_train_step/{workload}", config.train.batch_size, size,
            model_flops(workload, variant.get("dtype")), median, peak, compile_s,
            **timing.run_settings(config), variant=label,
            impl=variant.get("impl", "auto"), driver="interleaved", rounds=rounds,
            s_per_step_all=[round(t, 4) for t in times[i]],
            ratio_to_first=round(median / statistics.median(times[0]), 3),
            round_ratio_median=round(statistics.median(
                a / b for a, b in zip(times[i], times[0])), 3),
            matmul_peak_gflops_end=round(peak_end, 2), backend=jax.default_backend()))
    return lines


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="p2p_256_b1")
    parser.add_argument("--variants", nargs="+", default=["impl=auto", "impl=xla"],
                        help="each: comma-separated key=value (keys: impl, dtype, remat)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        parser.error(str(e))
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return run(args.workload, variants, args.rounds)


if __name__ == "__main__":
    main()
