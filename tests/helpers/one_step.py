"""One pix2pix train step on a fixed batch, for the sharding tests (run as a subprocess).

  python tests/helpers/one_step.py --out params.npz [--devices 8] [--mesh data=2,fsdp=4]
  python tests/helpers/one_step.py --out p.npz --num-processes 2 --process-id I --port P

Each process feeds its own rows of the same global batch, as a real multi-host run does,
and the resulting parameters are saved (process 0) for comparison.
"""

import argparse
import os
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mesh", default="data=-1", help="axis=size,... (config.mesh)")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    import functools

    from sct_jax.config_utils import load_config_file
    from sct_jax.methods import pix2pix
    from sct_jax import sharding
    from sct_jax.training import loop

    config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "..",
                                           "configs", "pix2pix_pelvis.py:tiny"))
    config.train.batch_size = args.batch
    rng = np.random.default_rng(0)
    h, w = config.data.crop
    full = {"mr": rng.uniform(-1, 1, (args.batch, h, w, 1)).astype(np.float32),
            "ct": rng.uniform(-1, 1, (args.batch, h, w, 1)).astype(np.float32),
            "mask": np.ones((args.batch, h, w, 1), np.float32)}
    per_process = args.batch // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    local = {k: v[rows] for k, v in full.items()}

    mesh = sharding.make_mesh({k: int(v) for k, v in
                               (item.split("=") for item in args.mesh.split(","))})
    spec = sharding.batch_spec(local)
    key = jax.random.key_data(jax.random.key(0))
    create = functools.partial(pix2pix.create_state, config, batch_spec=spec)
    abstract = jax.eval_shape(create, key)
    compiled, state_shardings, _ = loop.build_step(pix2pix.METHOD, config, mesh, abstract, spec)
    state = jax.jit(create, out_shardings=state_shardings)(key)
    state, metrics = compiled(state, sharding.global_batch(local, mesh),
                              jax.device_put(key, sharding.replicated(mesh)))
    # Adam's first moment after one step is (1 - b1) * grad: the gradients themselves,
    # compared tightly; the parameters move by ~lr * sign(grad), which flips for
    # gradients near zero under any change of summation order, so they get a looser check.
    tree = {name: {"params": state[name].params, "mu": state[name].opt_state[0].mu}
            for name in ("gen", "disc")}
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = {jax.tree_util.keystr(p): np.asarray(jax.experimental.multihost_utils
                                                  .process_allgather(v, tiled=True)
                                                  if args.num_processes > 1 else v)
              for p, v in leaves}
    arrays["loss"] = np.asarray(metrics["loss"])
    # How many state arrays each device holds a 1/fsdp slice of.
    n_split = sum(any(a is not None for a in leaf.sharding.spec)
                  for leaf in jax.tree.leaves(state))
    print(f"sharded_leaves={n_split}")
    if jax.process_index() == 0:
        np.savez(args.out, **arrays)
    print(f"devices={jax.device_count()} processes={jax.process_count()} "
          f"loss={float(metrics['loss']):.6f}")


if __name__ == "__main__":
    main()
