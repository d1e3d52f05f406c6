"""Measuring helpers of the benchmarks: timing, FLOPs, matmul peak, machine and device.

Conventions of every benchmark: each timing blocks on the result; medians over several
calls after untimed warm-up calls; FLOPs from XLA's cost analysis of the compiled
program; the machine's float32 matmul throughput measured in the same process, so that
results compare across machines as a fraction of it; and every JSON line says where
it ran (:func:`device_info`, the load average) and with which compute ``dtype`` and
``remat``.

``python -m sct_jax.bench.timing`` prints :func:`machine_info` as one JSON line.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
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

    When other work shares the machine the wall time grows with the load while the CPU
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
    compiled, compile_s = compile_timed(fn, *args)
    seconds, times = median_seconds(lambda: compiled(*args), steps, warmup)
    return {"compile_s": compile_s, "flops": cost_analysis_flops(compiled),
            "s_per_step_median": seconds, "s_per_step_all": times}


def matmul_peak_gflops(n: int = 2048, steps: int = 5) -> float:
    """Float32 matmul throughput of this machine now: median GFLOP/s of ``n x n @ n x n``."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (n * n,), jnp.float32).reshape(n, n)
    b = jax.random.normal(keys[1], (n * n,), jnp.float32).reshape(n, n)
    matmul, _ = compile_timed(jnp.dot, a, b)
    seconds, _ = median_seconds(lambda: matmul(a, b), steps, warmup=2)
    return 2.0 * n ** 3 / seconds / 1e9


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def device_info() -> dict[str, Any]:
    """The first JAX device: platform, name (``device_kind``), count and memory.

    ``memory_bytes`` is the accelerator's memory limit where the backend reports one
    (GPU/TPU ``memory_stats``), else the host's RAM (``memory_source`` says which).
    """
    device = jax.devices()[0]
    memory, source = None, "host"
    try:
        stats = device.memory_stats() or {}
        memory = stats.get("bytes_limit")
        source = "device" if memory else source
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        memory = None
    if memory is None:
        memory = _host_memory_bytes()
    return {"platform": device.platform, "name": device.device_kind,
            "count": jax.device_count(), "memory_bytes": memory,
            "memory_gib": None if memory is None else round(memory / 2 ** 30, 1),
            "memory_source": source}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark runs: date, cores, CPU model, load, versions, device."""
    import flax

    load1, load5, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": cores, "cpu_model": _cpu_model(),
        "load_average_1min": round(load1, 2), "load_average_5min": round(load5, 2),
        "python": platform.python_version(), "jax": jax.__version__,
        "flax": flax.__version__, "device": device_info(),
    }
    if load1 > 0.5 * cores:
        # Other work was running: timings are inflated; compare ratios within one run.
        info["note"] = f"shared machine, load {load1:.1f}"
    return info


def run_settings(config: Any = None) -> dict[str, str]:
    """The compute ``dtype`` and ``remat`` of ``config.model`` (float32 / none if unset)."""
    model = getattr(config, "model", None) if config is not None else None
    get = (lambda k, d: model.get(k, d)) if model is not None else (lambda k, d: d)
    return {"dtype": str(get("dtype", "float32")), "remat": str(get("remat", "none"))}


def report(workload: str, batch: int, input_size: Sequence[int] | str, flops: float,
           s_per_step_median: float, matmul_peak: float, compile_s: float,
           dtype: str = "float32", remat: str = "none", **extra: Any) -> dict[str, Any]:
    """Prints (flushed) and returns one JSON line for a workload.

    Args:
      workload: name of the measured step.
      batch: batch size.
      input_size: spatial size of one input (or a description).
      flops: FLOPs of one step (the caller says in ``extra`` where they come from).
      s_per_step_median: median seconds per step.
      matmul_peak: float32 matmul GFLOP/s measured in the same process.
      compile_s: seconds to lower and compile.
      dtype: the compute dtype of the workload.
      remat: the rematerialisation policy of the workload.
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
            "dtype": dtype, "remat": remat, "device": device_info(),
            "load_average_1min": round(os.getloadavg()[0], 2), **extra}
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    print(json.dumps(machine_info()), flush=True)
