"""Per-device memory of the bundle-size LDM ControlNet step: replicated vs fsdp, compiled
ahead of time (no step runs, no weights are materialised).

The MONAI brain LDM sizes: a 3D DiffusionModelUNet with channels (256, 512, 768), two res
blocks per level, attention at the two lower levels (441 M parameters) and its ControlNet
(182 M), trained as ``configs/ldm_brain.py:controlnet`` trains them (frozen UNet and
autoencoder in the state, Adam moments for the ControlNet). The state is built with
``jax.eval_shape``; the step is ``jax.jit(...).lower(ShapeDtypeStruct...).compile()``
for each mesh, and XLA's ``memory_analysis()`` gives the per-device argument and temp
bytes. Prints one JSON line per mesh.

  python benchmarks/fsdp_memory.py                 # 8 devices (fake CPU ones if no accelerator)
  python benchmarks/fsdp_memory.py --fsdp 8 --dtype bfloat16 --patch 32

On a CPU the devices are ``--xla_force_host_platform_device_count`` fakes; compiling both
meshes takes a few minutes on 2 cores.
"""

import argparse
import json
import math
import os
import sys
import time
import types


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", type=int, default=8, help="devices (fsdp axis size)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--patch", type=int, default=32,
                        help="MR/CT patch edge (the latent is a quarter of it)")
    parser.add_argument("--meshes", default="replicated,fsdp")
    args = parser.parse_args(argv)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fsdp}")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    for line in measure(args.fsdp, args.dtype, args.patch, args.meshes.split(",")):
        print(json.dumps(line), flush=True)


def bundle_config(dtype: str, patch: int, batch: int):
    """``configs/ldm_brain.py:controlnet`` with the MONAI brain LDM's UNet sizes."""
    from sct_jax.config_utils import load_config_file
    root = os.path.join(os.path.dirname(__file__), "..")
    config = load_config_file(os.path.join(root, "configs", "ldm_brain.py:controlnet"))
    unet = config.model.unet.to_dict()
    unet.update(channels=(256, 512, 768), attention_levels=(False, True, True),
                num_res_blocks=2, num_head_channels=(None, 512, 768), norm_num_groups=32)
    config.model.unet = unet
    config.model.controlnet.conditioning_embedding_num_channels = (16, 32, 96)
    config.model.dtype = dtype
    config.data.patch = (patch,) * 3
    config.train.batch_size = batch
    return config


def abstract_state(config, spec):
    """``ldm_controlnet.create_state`` under ``jax.eval_shape``, with the upstream
    diffusion run replaced by freshly initialised (abstract) networks of the same sizes."""
    import jax
    import jax.numpy as jnp
    from sct_jax.methods import _ldm_common as common
    from sct_jax.methods import ldm_controlnet

    def fake_upstream(config, key, method, shared):
        mr = jnp.zeros((1, *spec["mr"].shape[1:]), jnp.float32)
        z = jnp.zeros(common.latent_shape(config, mr.shape), jnp.float32)
        rng = jax.random.key(0)
        ae = common.build_autoencoder(config).init(rng, mr, rng)["params"]
        unet = common.build_unet(config).init(rng, z, jnp.zeros((1,), jnp.int32))["params"]
        return config, {"unet": types.SimpleNamespace(params=unet), "ae": ae,
                        "scale_factor": jnp.ones((), jnp.float32)}

    original = common.load_upstream_run
    common.load_upstream_run = fake_upstream
    try:
        key = jax.random.key_data(jax.random.key(0))
        return jax.eval_shape(lambda k: ldm_controlnet.create_state(config, k, spec), key)
    finally:
        common.load_upstream_run = original


def measure(devices: int, dtype: str, patch: int, meshes):
    import jax
    import numpy as np
    from sct_jax.methods import ldm_controlnet
    from sct_jax.training import loop, sharding

    if jax.device_count() < devices:
        raise SystemExit(f"error: benchmarks/fsdp_memory.py: needs {devices} devices, "
                         f"{jax.device_count()} available")
    config = bundle_config(dtype, patch, batch=devices)
    shape = (devices, patch, patch, patch, 1)
    spec = {"mr": jax.ShapeDtypeStruct(shape, np.float32),
            "ct": jax.ShapeDtypeStruct(shape, np.float32)}
    state = abstract_state(config, spec)
    n_params = {k: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(
        state[k].params if k == "controlnet" else state[k])) for k in ("unet", "controlnet", "ae")}
    state_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(state))
    mesh_sizes = {"replicated": {"data": devices, "fsdp": 1},
                  "fsdp": {"data": 1, "fsdp": devices}}
    for name in meshes:
        mesh = sharding.make_mesh(mesh_sizes[name], jax.devices()[:devices])
        # What each device holds of the state, from the shardings alone (no compile).
        shard_bytes = sum(math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                          for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(
                              sharding.state_shardings(state, mesh))))
        print(json.dumps({"mesh": mesh_sizes[name],
                          "state_gib_per_device_from_shardings": round(shard_bytes / 2**30, 3)}),
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        compiled, _, _ = loop.build_step(ldm_controlnet, config, mesh, state, spec)
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        yield {"workload": "ldm_controlnet_step_bundle_size", "mesh": mesh_sizes[name],
               "device": jax.devices()[0].device_kind, "dtype": dtype,
               "batch": list(shape), "params_m": {k: round(v / 1e6, 1)
                                                   for k, v in n_params.items()},
               "state_gib_total": round(state_bytes / 2**30, 3),
               "state_gib_per_device_from_shardings": round(shard_bytes / 2**30, 3),
               "argument_gib_per_device": round(mem.argument_size_in_bytes / 2**30, 3),
               "temp_gib_per_device": round(mem.temp_size_in_bytes / 2**30, 3),
               "output_gib_per_device": round(mem.output_size_in_bytes / 2**30, 3),
               "compile_s": round(compile_s, 1)}


if __name__ == "__main__":
    main()
