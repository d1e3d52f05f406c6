"""Methods: one module each, with ``create_state``, ``train_step`` and ``predict``.

A method module ``sct_jax.methods.<name>`` defines

- ``create_state(config, rng, batch_spec) -> state``: the train-state pytree (a dict of
  flax ``TrainState``s) for batches shaped like ``batch_spec``;
- ``train_step(config, state, batch, rng) -> (state, metrics)``: one pure update
  (the loop binds ``config`` and jits it with shardings and donation);
- ``predict(config, state, mr) -> sct``: ``(B, *spatial, C_in)`` MR in [-1, 1] ->
  ``(B, *spatial, 1)`` sCT in [-1, 1];
- optionally ``validate_config(config)``, raising ``ConfigError`` at start-up.

Adding a method never touches the training loop.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from sct_jax.errors import ConfigError

_REQUIRED = ("create_state", "train_step", "predict")


def available_methods() -> list[str]:
    import sct_jax.methods as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and m.name != "common")


def get_method(name: str) -> ModuleType:
    """Imports the method module ``name``; unknown names raise ``ConfigError``."""
    if name not in available_methods():
        raise ConfigError(f"config.method={name!r} is not a known method; "
                          f"choose one of {available_methods()}")
    module = importlib.import_module(f"sct_jax.methods.{name}")
    missing = [f for f in _REQUIRED if not hasattr(module, f)]
    if missing:
        raise ConfigError(f"method {name!r} lacks {missing}")
    return module
