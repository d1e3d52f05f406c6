"""Methods: one module each, declaring its :class:`Method` as ``METHOD``.

The contract between a method and the rest of the package is the :class:`Method`
dataclass below: three required pure functions the generic loop and inference call,
and optional capabilities with explicit defaults. Nothing outside a method module
inspects its functions or sniffs its config keys: the training loop, validation,
inference, export and QA ask the ``Method``. Adding a method is one module plus one
config; it never touches the loop.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping

from sct_jax.data.prior import check_prior_config
from sct_jax.data.register import check_register_config
from sct_jax.errors import ConfigError
from sct_jax.models.layers import precision_kwargs


def _no_check(config) -> None:
    del config


def _sct_model(config) -> str | None:
    del config
    return None


def _no_upstream(config) -> dict[str, "Upstream"]:
    del config
    return {}


@dataclasses.dataclass(frozen=True)
class Upstream:
    """An earlier run this method's state starts from (e.g. the LDM's autoencoder).

    Attributes:
      config_key: the dotted config key holding that run's directory
        (``"ldm.autoencoder_workdir"``).
      method: the method that run must have trained (``"ldm_autoencoder"``).
      shared_models: ``config.model`` entries that must equal the run's (the frozen
        networks this stage rebuilds from its own config).
    """
    config_key: str
    method: str
    shared_models: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method provides. Functions take the experiment ``config`` first.

    Required:
      create_state: ``(config, rng, batch_spec) -> state``, the train-state pytree (a
        dict of flax ``TrainState``s and frozen arrays) for batches shaped like
        ``batch_spec``. Pure and traceable: it reads no file (see ``load_pretrained``).
      train_step: ``(config, state, batch, rng) -> (state, metrics)``, one pure update
        (the loop binds ``config`` and jits it with shardings and donation).
      predict: ``(config, state, mr[, rng]) -> sct``, ``(B, *spatial, C_in)`` MR in
        [-1, 1] -> ``(B, *spatial, 1)`` sCT in [-1, 1]; takes ``rng`` iff ``samples``.

    Optional capabilities (the defaults say "has none"):
      samples: ``predict`` draws samples from an ``rng`` (diffusion; GANs by
        test-time dropout), so ``--samples K`` makes sense.
      check_sampling: ``(config) -> None``, raising ``ConfigError`` when this config
        cannot sample (a GAN without dropout).
      validate_config: ``(config) -> None``, the method's start-up checks
        (``ConfigError``); :meth:`validate` adds the checks every method shares.
      input_rule: ``(config) -> (stride, min_size)`` of a 2D generator's input sizes
        (the slice tiles of inference are padded to it); ``None`` for 3D methods.
      train_dataset: ``(config, prepared_cases, local_batch, shard_index, shard_count)
        -> IterDataset``, for a method that trains on more than the config's data mode
        gives (meta-pGAN's meta-validation stream).
      image_summaries: ``(config, state, batch, rng) -> {name: (H, W)}``, the method's
        own maps, written every ``train.image_every`` steps.
      upstream: ``(config) -> {name: Upstream}``, earlier runs this state starts from.
      load_pretrained: ``(config, state, pretrained) -> state``, called once on a new
        state outside any trace: merges weights read from files (VGG) and the
        ``upstream`` runs (``pretrained``: ``{name: LoadedRun}``).
      not_an_sct_model: ``(config) -> str | None``, why this config's model predicts
        no sCT (an LDM autoencoder stage): it trains, and nothing is exported or
        validated; ``None`` for a model that predicts sCT.
      inverse: ``(config, state, ct) -> mr``, a CT -> MR generator (CycleGAN), used by
        the QA's cycle check.
      takes_prior: its generator takes the mean-CT prior channel
        (``config.data.prior``, :mod:`sct_jax.data.prior`) after the MR's.
    """

    name: str
    create_state: Callable[..., Any]
    train_step: Callable[..., Any]
    predict: Callable[..., Any]
    samples: bool = False
    check_sampling: Callable[[Any], None] = _no_check
    validate_config: Callable[[Any], None] = _no_check
    input_rule: Callable[[Any], tuple[int, int]] | None = None
    train_dataset: Callable[..., Any] | None = None
    image_summaries: Callable[..., Mapping[str, Any]] | None = None
    upstream: Callable[[Any], Mapping[str, Upstream]] = _no_upstream
    load_pretrained: Callable[[Any, Any, Mapping[str, Any]], Any] | None = None
    not_an_sct_model: Callable[[Any], str | None] = _sct_model
    inverse: Callable[..., Any] | None = None
    takes_prior: bool = False

    def validate(self, config) -> None:
        """Every start-up check of ``config`` for this method (``ConfigError``)."""
        precision_kwargs(config)  # an unknown model.dtype / model.remat fails here
        if check_prior_config(config) and not self.takes_prior:
            raise ConfigError(f"config.data.prior={config.data.prior!r}: "
                              f"config.method={self.name!r} does not take the prior; "
                              "set config.data.prior=''")
        check_register_config(config)
        self.validate_config(config)


def available_methods() -> list[str]:
    """The method names: modules of this package not starting with ``_`` or ``common``."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in ("common", "optim"))


def get_method(name: str) -> Method:
    """The :class:`Method` of ``config.method == name``; unknown names: ``ConfigError``."""
    if name not in available_methods():
        raise ConfigError(f"config.method={name!r} is not a known method; "
                          f"choose one of {available_methods()}")
    module = importlib.import_module(f"{__name__}.{name}")
    method = getattr(module, "METHOD", None)
    if not isinstance(method, Method):
        raise ConfigError(f"method module {module.__name__} declares no METHOD = Method(...)")
    return method
