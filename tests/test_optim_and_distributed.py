"""Promises without a compiled model: the learning-rate schedule's values, the multi-host
start-up (environment stubbed, ``jax.distributed.initialize`` intercepted), the batch
divisibility checks and the per-process data shards' resume."""

import types

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from sct_jax.errors import ConfigError
from sct_jax import optim, sharding

LR = 2e-4


def _closed_form(step, lr, total, decay_start):
    """``lr`` until ``round(total * decay_start)``, then a straight line to 0 at ``total``."""
    boundary = round(total * decay_start)
    if step < boundary:
        return lr
    return lr * max(0.0, 1.0 - (step - boundary) / max(total - boundary, 1))


@pytest.mark.parametrize("total, decay_start", [(10, 0.5), (7, 0.5), (8, 0.0), (6, 1.0)])
def test_schedule_values(total, decay_start):
    schedule = optim.constant_then_linear_decay(LR, total, decay_start)
    got = [float(schedule(s)) for s in range(total + 3)]
    expected = [_closed_form(s, LR, total, decay_start) for s in range(total + 3)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_schedule_reference_example():
    """pix2pix: 100 + 100 epochs, written out: lr for the first half, then lr/100 less
    each step, reaching 0 at the end."""
    schedule = optim.constant_then_linear_decay(LR, 200, 0.5)
    for step, value in [(0, LR), (99, LR), (100, LR), (101, 0.99 * LR), (150, 0.5 * LR),
                        (199, 0.01 * LR), (200, 0.0), (250, 0.0)]:
        assert float(schedule(step)) == pytest.approx(value, rel=1e-5, abs=1e-12), step


def test_adam_follows_the_schedule():
    """With a constant gradient Adam's bias-corrected step is exactly the learning rate
    (up to eps), so the parameter moves by the schedule's value at every step."""
    config = ConfigDict(dict(lr=LR, b1=0.5, b2=0.999, decay_start=0.5))
    tx = optim.adam(config, 6)
    params = np.zeros(3, np.float32)
    state = tx.init(params)
    moves = []
    for _ in range(8):
        updates, state = tx.update(np.ones(3, np.float32), state, params)
        moves.append(-float(np.asarray(updates)[0]))
        params = optax.apply_updates(params, updates)
    expected = [_closed_form(s, LR, 6, 0.5) for s in range(8)]
    np.testing.assert_allclose(moves, expected, rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------ multi-host start-up

_LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def launch(monkeypatch):
    """A clean environment and a recorder in place of ``jax.distributed.initialize``."""
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sharding, "_initialized", False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return monkeypatch, calls


@pytest.mark.parametrize("env", [{}, {"SLURM_NTASKS": "1"}, {"OMPI_COMM_WORLD_SIZE": "1"}])
def test_single_process_launch_initialises_nothing(launch, env):
    monkeypatch, calls = launch
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sharding.maybe_initialize_distributed() is False
    assert calls == []


@pytest.mark.parametrize("var", ["SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"])
def test_cluster_launch_lets_jax_detect_the_cluster(launch, var):
    monkeypatch, calls = launch
    monkeypatch.setenv(var, "4")
    assert sharding.maybe_initialize_distributed() is True
    assert calls == [{}]  # no arguments: jax.distributed reads SLURM / Open MPI itself
    assert sharding.maybe_initialize_distributed() is True
    assert calls == [{}]  # once per process


def test_explicit_variables_are_passed_on(launch):
    monkeypatch, calls = launch
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # the explicit variables win
    assert sharding.maybe_initialize_distributed() is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)]


# ------------------------------------------------------------------- batch divisibility

def _mesh(n_data):
    # check_batch_size reads only the mesh's axis sizes.
    return types.SimpleNamespace(shape={"data": n_data})


@pytest.mark.parametrize("batch, n_data, processes, local", [
    (8, 8, 1, 8), (8, 4, 2, 4), (12, 4, 3, 4), (6, 1, 1, 6)])
def test_batch_divisible_by_devices_and_processes(monkeypatch, batch, n_data, processes, local):
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    assert sharding.check_batch_size(batch, _mesh(n_data)) == local


def test_batch_not_divisible_by_the_data_axis(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"batch_size=6 is not divisible by the 4 devices"):
        sharding.check_batch_size(6, _mesh(4))


def test_batch_not_divisible_by_the_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(ConfigError, match=r"batch_size=6 is not divisible by the 4 processes"):
        sharding.check_batch_size(6, _mesh(2))
