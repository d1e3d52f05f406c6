"""Input pipeline throughput: slices (patches) per second from NIfTI on disk.

  sct-bench pipeline [--quick]        (python -m sct_jax.bench.pipeline)

Generates the phantom pelvis set (20 cases of 256 x 160 x 64; 4 with --quick) into a
temporary folder, prepares it (decode + normalise once, memory-mapped cache: timed
separately), then times the grain iterators the training loop uses. Compare
``items_per_s`` with a train step's consumption (batch / s_per_step of
``sct_jax.bench.train_step``): the pipeline must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from sct_jax.bench import timing
from sct_jax.data import phantom, pipeline, synthrad


def time_iterator(ds, batches: int, batch_size: int) -> float:
    """Items per second over ``batches`` batches, timed from the iterator's creation.

    grain prefetches with a thread pool: timing only after a warm-up batch would count
    items already produced in the background, so the clock starts before ``iter``.
    """
    start = time.perf_counter()
    it = iter(ds)
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    n_cases = 4 if args.quick else 20
    batches = 100 if args.quick else 300
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        region_dir = phantom.write_dataset(tmp, "pelvis", n_cases, seed=0)
        generate_s = time.perf_counter() - t0
        cases = synthrad.discover_cases(tmp, region="pelvis")
        t0 = time.perf_counter()
        prepared = pipeline.prepare_cases(cases, os.path.join(tmp, "cache"))
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipeline.prepare_cases(cases, os.path.join(tmp, "cache"))
        cached_s = time.perf_counter() - t0
        workloads = [
            ("slices_320x192_b6_context0", lambda: pipeline.slice_dataset(
                prepared, crop=(320, 192), batch_size=6, seed=0, context=0), 6),
            ("slices_320x192_b6_context1", lambda: pipeline.slice_dataset(
                prepared, crop=(320, 192), batch_size=6, seed=0, context=1), 6),
            ("patches_128x128x32_b1", lambda: pipeline.patch_dataset(
                prepared, patch=(128, 128, 32), batch_size=1, seed=0), 1),
        ]
        for name, make, batch in workloads:
            rate = time_iterator(make(), batches, batch)
            print(json.dumps({"workload": f"pipeline/{name}", "batch": batch,
                              "items_per_s": round(rate, 1), "cases": n_cases,
                              "generate_s": round(generate_s, 2),
                              "prepare_s_first": round(prepare_s, 2),
                              "prepare_s_cached": round(cached_s, 3),
                              "peak_rss_mb": round(timing.peak_rss_mb(), 1),
                              "load_average_1min": round(os.getloadavg()[0], 2),
                              "dataset": str(region_dir.name)}), flush=True)


if __name__ == "__main__":
    main()
