"""Shared benchmark helpers: matmul peak, timing of a jitted function, JSON report lines.

Every benchmark prints one JSON line per workload with the keys of :func:`report`
(``workload, batch, input_size, flops, s_per_step_median, gflops, matmul_peak_gflops,
pct_of_peak, compile_s, peak_rss_mb``) plus free extra keys, so runs on different
machines compare as a fraction of that machine's own float32 matmul peak.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ``ru_maxrss`` is KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _block(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def _median_seconds(call: Callable[[], Any], steps: int, warmup: int) -> tuple[float, list]:
    for _ in range(warmup):
        _block(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _block(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak_gflops(n: int = 2048, steps: int = 7) -> float:
    """Float32 matmul throughput of this machine now: median GFLOP/s of ``n x n @ n x n``."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (n, n), jnp.float32)
    b = jax.random.normal(keys[1], (n, n), jnp.float32)
    matmul = jax.jit(jnp.dot).lower(a, b).compile()
    seconds, _ = _median_seconds(lambda: matmul(a, b), steps, warmup=2)
    return 2.0 * n ** 3 / seconds / 1e9


def cost_analysis_flops(compiled: Any) -> float:
    """FLOPs XLA counts for a compiled function (``nan`` when the backend gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def time_jitted(fn: Callable, args: Sequence[Any], steps: int = 5, warmup: int = 2
                ) -> dict[str, Any]:
    """Compiles ``jax.jit(fn)`` ahead of time on ``args`` and times it.

    Args:
      fn: function of ``*args`` returning a pytree of arrays.
      args: example arguments (arrays); the compiled function is called on them.
      steps: timed calls after ``warmup`` untimed ones.
      warmup: untimed calls.

    Returns:
      ``compile_s``, ``flops`` (XLA cost analysis), ``s_per_step_median`` and
      ``s_per_step_all`` (every timed call).
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    seconds, times = _median_seconds(lambda: compiled(*args), steps, warmup)
    return {"compile_s": compile_s, "flops": cost_analysis_flops(compiled),
            "s_per_step_median": seconds, "s_per_step_all": times}


def report(workload: str, batch: int, input_size: Sequence[int] | str, flops: float,
           s_per_step_median: float, matmul_peak: float, compile_s: float,
           **extra: Any) -> dict[str, Any]:
    """Prints (flushed) and returns one JSON line for a workload.

    Args:
      workload: name of the measured step.
      batch: batch size.
      input_size: spatial size of one input (or a description).
      flops: FLOPs of one step (the caller says in ``extra`` where they come from).
      s_per_step_median: median seconds per step.
      matmul_peak: float32 matmul GFLOP/s measured in the same process.
      compile_s: seconds to lower and compile.
      **extra: free extra keys (impl, direction, ...).
    """
    gflops = flops / s_per_step_median / 1e9
    line = {"workload": workload, "batch": batch,
            "input_size": list(input_size) if not isinstance(input_size, str)
            else input_size,
            "flops": flops, "s_per_step_median": round(s_per_step_median, 6),
            "gflops": round(gflops, 2), "matmul_peak_gflops": round(matmul_peak, 2),
            "pct_of_peak": round(100.0 * gflops / matmul_peak, 1),
            "compile_s": round(compile_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            **extra}
    print(json.dumps(line), flush=True)
    return line
