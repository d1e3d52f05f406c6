"""Measuring helpers for the benchmarks: matmul peak, median timing, FLOPs, peak RSS.

The same conventions as ``benchmarks/common.py`` (kept separate so the installed package
does not depend on the repository's ``benchmarks/`` folder): every timing blocks on the
result, medians over several calls after untimed warm-up calls, FLOPs from XLA's cost
analysis of the compiled program, and the machine's float32 matmul throughput measured
in the same process so that results compare across machines as a fraction of it.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ``ru_maxrss`` is KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def block(tree: Any) -> Any:
    """Waits for every array of ``tree``."""
    return jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def median_seconds(call: Callable[[], Any], steps: int, warmup: int
                   ) -> tuple[float, list[float]]:
    """Median wall time of ``call()`` over ``steps`` timed calls after ``warmup`` ones."""
    wall, times, _ = median_wall_and_cpu(call, steps, warmup)
    return wall, times


def median_wall_and_cpu(call: Callable[[], Any], steps: int, warmup: int
                        ) -> tuple[float, list[float], float]:
    """As :func:`median_seconds`, plus the median CPU seconds of this process per call.

    On a machine shared with other work the wall time grows with the load while the CPU
    time stays about what the work needs: ``cpu / cores`` estimates the wall time on an
    idle machine when XLA keeps every core busy.
    """
    for _ in range(warmup):
        block(call())
    times, cpu = [], []
    for _ in range(max(steps, 1)):
        start, start_cpu = time.perf_counter(), time.process_time()
        block(call())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), times, statistics.median(cpu)


def compile_timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    """``jax.jit(fn)`` compiled ahead of time on ``args``; returns (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def cost_analysis_flops(compiled: Any) -> float:
    """FLOPs XLA counts for a compiled function (``nan`` when the backend gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def matmul_peak_gflops(n: int = 2048, steps: int = 5) -> float:
    """Float32 matmul throughput of this machine now: median GFLOP/s of ``n x n @ n x n``."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (n * n,), jnp.float32).reshape(n, n)
    b = jax.random.normal(keys[1], (n * n,), jnp.float32).reshape(n, n)
    matmul, _ = compile_timed(jnp.dot, a, b)
    seconds, _ = median_seconds(lambda: matmul(a, b), steps, warmup=2)
    return 2.0 * n ** 3 / seconds / 1e9
