"""Device mesh, shardings and multi-host set-up.

Parallelism lives in the config (``config.mesh``), not in the code: the mesh has a
``"data"`` axis (its size ``-1`` means the remaining devices) and an ``"fsdp"`` axis
(fully sharded data parallelism, as maxdiffusion / maxtext call it). Batches are split
over both, ``NamedSharding(mesh, P(("data", "fsdp")))``; every array of the train state
(parameters, optimizer moments) is split along ``"fsdp"`` on one of its dimensions by
:func:`fsdp_spec` (the largest dimension divisible by the axis size; replicated when
none is), so each device holds ~1/fsdp of the state and XLA all-gathers a layer's
weights where it needs them. ``{"data": -1, "fsdp": 1}`` is plain data parallelism with
a replicated state; ``{"data": 2, "fsdp": 4}`` on 8 devices shards the state 4 ways.

Multi-host: :func:`maybe_initialize_distributed` calls ``jax.distributed.initialize()``
when the environment asks for it (SLURM, Open MPI, TPU pods, or the explicit
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``); each process
reads its own shard of the data and :func:`global_batch` assembles the global array with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sct_jax.errors import ConfigError

_initialized = False


def maybe_initialize_distributed() -> bool:
    """Initialises ``jax.distributed`` once, only where a multi-process launch is detected.

    Returns:
      True when a multi-process runtime was initialised.
    """
    global _initialized
    if _initialized:
        return True
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    ompi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if not (explicit or slurm or ompi):
        return False
    if explicit:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:  # SLURM / Open MPI: jax.distributed detects the cluster itself.
        jax.distributed.initialize()
    _initialized = True
    return True


def make_mesh(mesh_config: Mapping[str, int] | None = None,
              devices: list | None = None) -> Mesh:
    """Builds the device mesh described by the config.

    Args:
      mesh_config: axis name -> size, e.g. ``{"data": -1}`` (one ``-1`` allowed: the
        remaining devices). Defaults to pure data parallelism over all devices.
      devices: devices to use (default ``jax.devices()``, every process's).

    Returns:
      A :class:`jax.sharding.Mesh` whose first axis is ``"data"``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(mesh_config or {"data": -1})
    if "data" not in sizes:
        raise ConfigError(f"config.mesh needs a 'data' axis, got {sorted(sizes)}")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError("config.mesh: at most one axis may be -1")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    sizes = {name: len(devices) // known if size == -1 else size
             for name, size in sizes.items()}
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ConfigError(f"config.mesh {dict(mesh_config or {})} needs {total} devices, "
                          f"{len(devices)} available")
    names = ("data",) + tuple(n for n in sizes if n != "data")
    # jax.make_mesh orders the devices by the physical topology (ICI rings on TPU,
    # NVLink islands on GPU); a plain reshape of jax.devices() does not.
    # Auto axes: the jitted steps place arrays by their in/out shardings (the explicit
    # sharding mode, jax.make_mesh's default, would type every array by its sharding).
    return jax.make_mesh(tuple(sizes[n] for n in names), names,
                         axis_types=(AxisType.Auto,) * len(names), devices=devices)


# Mesh axes, in order, that split the batch.
BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: ``"data"`` and ``"fsdp"`` where present."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: ``data * fsdp``."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"`` x ``"fsdp"``; other axes replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Validates the global batch against the mesh and processes; returns the per-process batch."""
    n_data = batch_shards(mesh)
    if global_batch_size % n_data:
        raise ConfigError(f"config.train.batch_size={global_batch_size} is not divisible by "
                          f"the {n_data} devices of the mesh's data x fsdp axes")
    if global_batch_size % jax.process_count():
        raise ConfigError(f"config.train.batch_size={global_batch_size} is not divisible by "
                          f"the {jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's rows into globally batch-sharded arrays.

    Args:
      local_batch: name -> ``(B_local, ...)`` numpy array read by this process.
      mesh: the mesh; the global batch is ``B_local * process_count``.

    Returns:
      name -> ``(B_global, ...)`` ``jax.Array`` sharded as ``P(("data", "fsdp"))``.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def batch_spec(local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the *global* batch, for ahead-of-time compilation and ``create_state``."""
    return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * jax.process_count(),) + np.shape(v)[1:],
                                    np.asarray(v).dtype)
            for k, v in local_batch.items()}


def fsdp_spec(shape: tuple[int, ...], fsdp: int, axis: str = "fsdp") -> P:
    """Where one state array is split along the ``fsdp`` axis.

    Rule: the largest dimension divisible by ``fsdp`` (the last of equal ones, usually
    the output channels of a kernel); replicated when no dimension divides, for scalars
    (step counters) and when ``fsdp`` is 1.

    Args:
      shape: the array's shape, e.g. a conv kernel ``(3, 3, 3, 256, 256)``.
      fsdp: the size of the mesh's ``fsdp`` axis.
      axis: the mesh axis name.

    Returns:
      A ``PartitionSpec`` with ``axis`` on at most one dimension.
    """
    if fsdp <= 1:
        return P()
    candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, dim = max(candidates)
    return P(*([None] * dim + [axis]))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every leaf of a (abstract) train state, by :func:`fsdp_spec`.

    Args:
      abstract_state: a pytree of arrays or ``jax.ShapeDtypeStruct`` (from
        ``jax.eval_shape(create_state)``).
      mesh: the mesh; without an ``"fsdp"`` axis (or with size 1) everything is
        replicated.

    Returns:
      The same tree structure with a ``NamedSharding`` per leaf.
    """
    fsdp = mesh.shape.get("fsdp", 1)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp)),
                        abstract_state)
