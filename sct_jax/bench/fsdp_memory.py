"""Per-device memory of the bundle-size LDM ControlNet step: replicated vs fsdp, compiled
ahead of time (no step runs, no weights are materialised).

  sct-bench fsdp_memory                      # 8 devices (fake CPU ones if no accelerator)
  sct-bench fsdp_memory --fsdp 8 --dtype bfloat16 --patch 32
  sct-bench fsdp_memory --small --config configs/ldm_brain.py:controlnet,tiny \
      --fsdp 2 --patch 16                    # the config's own sizes: seconds, that it runs

(``sct-bench fsdp_memory`` is ``python -m sct_jax.bench.fsdp_memory``; run from the
repository root.) The MONAI brain LDM sizes: a 3D DiffusionModelUNet with channels
(256, 512, 768), two res blocks per level, attention at the two lower levels (441 M
parameters) and its ControlNet (182 M), trained as ``configs/ldm_brain.py:controlnet``
trains them (frozen UNet and autoencoder in the state, Adam moments for the
ControlNet); ``--small`` keeps the ``--config``'s own sizes. The state is
``jax.eval_shape`` of the method's ``create_state`` (placeholders where
``load_pretrained`` would put the upstream run's weights); the step is compiled by
:func:`sct_jax.training.loop.build_step` for each mesh (``--fsdp`` devices, one sample
each: ``{"data": N, "fsdp": 1}`` replicated, ``{"data": 1, "fsdp": N}`` sharded), and
XLA's ``memory_analysis()`` gives the per-device argument, temp and output bytes.

One JSON line per mesh: ``mesh``, ``params_m`` (millions: unet, controlnet, ae),
``state_gib_total``, ``state_gib_per_device_from_shardings`` (what each device holds
by :func:`sct_jax.sharding.state_shardings`, before compiling; also printed on stderr
while the compile runs), ``argument_gib_per_device``, ``temp_gib_per_device``,
``output_gib_per_device``, ``flops`` (XLA's count of the per-device program),
``compile_s``, ``peak_rss_mb``, ``dtype``, ``remat``, ``device``,
``load_average_1min``. On a CPU the devices are
``--xla_force_host_platform_device_count`` fakes; compiling both meshes at the bundle
size takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Iterator, Sequence

# jax is imported here, before main() sets XLA_FLAGS: XLA reads the flags when its first
# backend starts (the first jax.devices() or array), not at import, and nothing below
# starts one at import time. measure() checks the device count all the same.
import jax
import numpy as np

from sct_jax import methods, sharding
from sct_jax.bench import timing
from sct_jax.config_utils import load_config_file
from sct_jax.training import loop

MESHES = ("replicated", "fsdp")


def _gib(n_bytes: int) -> float:
    """GiB to the KiB (the ``--small`` sizes are a few MiB)."""
    return round(n_bytes / 2**30, 6)


def bundle_config(config_spec: str, dtype: str, patch: int | None, batch: int,
                  small: bool = False):
    """``config_spec`` with the MONAI brain LDM's UNet sizes (its own with ``small``).

    Args:
      config_spec: an LDM ControlNet config, e.g. ``configs/ldm_brain.py:controlnet``.
      dtype: ``config.model.dtype``.
      patch: the MR/CT patch edge (a cube); ``None``: 32 at the bundle size, the
        config's patch with ``small``.
      batch: the global batch (one sample per device).
      small: keep the config's UNet and ControlNet sizes.
    """
    config = load_config_file(config_spec)
    if not small:
        unet = config.model.unet.to_dict()
        unet.update(channels=(256, 512, 768), attention_levels=(False, True, True),
                    num_res_blocks=2, num_head_channels=(None, 512, 768), norm_num_groups=32)
        config.model.unet = unet
        config.model.controlnet.conditioning_embedding_num_channels = (16, 32, 96)
        patch = 32 if patch is None else patch
    config.model.dtype = dtype
    if patch is not None:
        config.data.patch = (patch,) * 3
    config.train.batch_size = batch
    return config


def measure(config_spec: str, devices: int, dtype: str, patch: int | None,
            meshes: Sequence[str], small: bool = False) -> Iterator[dict]:
    """Compiles the step on each mesh; yields one row per mesh."""
    if jax.device_count() < devices:
        raise SystemExit(f"error: sct-bench fsdp_memory: needs {devices} devices, "
                         f"{jax.device_count()} available (on a CPU: XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={devices})")
    config = bundle_config(config_spec, dtype, patch, batch=devices, small=small)
    method = methods.get_method(config.method)
    method.validate(config)
    shape = (devices, *(int(p) for p in config.data.patch), 1)
    spec = {"mr": jax.ShapeDtypeStruct(shape, np.float32),
            "ct": jax.ShapeDtypeStruct(shape, np.float32)}
    key = jax.random.key_data(jax.random.key(0))
    state = jax.eval_shape(lambda k: method.create_state(config, k, spec), key)
    n_params = {k: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(
        state[k].params if k == "controlnet" else state[k])) for k in ("unet", "controlnet", "ae")}
    state_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(state))
    mesh_sizes = {"replicated": {"data": devices, "fsdp": 1},
                  "fsdp": {"data": 1, "fsdp": devices}}
    workload = (f"fsdp_memory/{config_spec}" if small
                else "fsdp_memory/ldm_controlnet_step_bundle_size")
    for name in meshes:
        mesh = sharding.make_mesh(mesh_sizes[name], jax.devices()[:devices])
        # What each device holds of the state, from the shardings alone (no compile).
        shard_bytes = sum(math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                          for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(
                              sharding.state_shardings(state, mesh))))
        print(json.dumps({"mesh": mesh_sizes[name],
                          "state_gib_per_device_from_shardings": _gib(shard_bytes)}),
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        compiled, _, _ = loop.build_step(method, config, mesh, state, spec)
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        yield {"workload": workload, "mesh": mesh_sizes[name], "batch": devices,
               "input_size": list(shape[1:-1]),
               "params_m": {k: round(v / 1e6, 3) for k, v in n_params.items()},
               "state_gib_total": _gib(state_bytes),
               "state_gib_per_device_from_shardings": _gib(shard_bytes),
               "argument_gib_per_device": _gib(mem.argument_size_in_bytes),
               "temp_gib_per_device": _gib(mem.temp_size_in_bytes),
               "output_gib_per_device": _gib(mem.output_size_in_bytes),
               "flops": timing.cost_analysis_flops(compiled), "compile_s": round(compile_s, 1),
               "peak_rss_mb": round(timing.peak_rss_mb(), 1), **timing.run_settings(config),
               "device": timing.device_info(),
               "load_average_1min": round(os.getloadavg()[0], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ldm_brain.py:controlnet",
                        help="an LDM ControlNet config file[:variants] (repository root)")
    parser.add_argument("--fsdp", type=int, default=8, help="devices (fsdp axis size)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--patch", type=int, default=None,
                        help="MR/CT patch edge (default 32; with --small the config's)")
    parser.add_argument("--small", action="store_true",
                        help="the config's own UNet/ControlNet sizes, not the bundle's")
    parser.add_argument("--meshes", default=",".join(MESHES),
                        help=f"comma-separated, of {', '.join(MESHES)}")
    args = parser.parse_args(argv)
    meshes = args.meshes.split(",")
    unknown = sorted(set(meshes) - set(MESHES))
    if unknown:
        parser.error(f"--meshes: unknown {unknown}; expected {', '.join(MESHES)}")
    # Fake CPU devices when there is no accelerator; before the backend starts (above).
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fsdp}")
    for line in measure(args.config, args.fsdp, args.dtype, args.patch, meshes, args.small):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
