"""One writer per run directory, and a resume that cannot silently change the run.

:func:`open_run_dir` is called by the training loop before it writes anything:

1. the workdir must be a writable folder (or creatable);
2. a resume (the workdir holds checkpoints) with a config whose state- or data-changing
   keys (:data:`RESUME_KEYS`: method, architecture, data root, crop, ...) differ from
   the run's ``config.json`` is refused with one line listing the keys;
3. the lock file ``<workdir>/run.lock`` (pid, host, start time) is taken for the whole
   training: a second trainer on the same workdir is refused with one line naming the
   holder; a stale lock (its pid dead on this host) is taken over with a warning.

``config.json`` is written at once only into a new run; a resume writes it when the
training finishes, so a run that fails never replaces the description of the run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from flax import traverse_util

from sct_jax.errors import ConfigError, SctError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# Config keys whose change makes the checkpoint another model or the data other data.
RESUME_KEYS = ("method", "model", "ldm", "data.root", "data.region", "data.mode",
               "data.crop", "data.patch", "data.context", "data.mr_percentiles",
               "data.split", "data.split_seed", "data.phantom", "data.input",
               "data.cbct_window", "data.folds", "data.fold", "data.prior",
               "data.register_target")
# Keys a run saved before they existed had at these values.
ABSENT_MEANS = {"data.input": "mr", "data.cbct_window": [-1024.0, 3000.0],
                "data.folds": 0, "data.fold": 0, "data.prior": "",
                "data.register_target": False,
                "model.gen.upsample": "transpose", "model.gen.calibration_bins": 0,
                "loss.body_mask": False,
                "loss.body_mask_margin": 0, "loss.shift_tolerance": 0,
                "data.phantom.anatomy_variation": 1.0, "ldm.objective": "diffusion",
                "ldm.flow_time_sampling": "logit_normal", "ldm.flow_shift": 1.0}


class RunDirBusy(SctError):
    """Another live process holds the run directory's lock (exit status 2)."""


def _flat(tree: dict) -> dict[str, Any]:
    """``{"a.b": value}`` after a JSON round trip (tuples become lists), so a saved and a
    live config compare key by key."""
    plain = json.loads(json.dumps(tree, default=str))
    return traverse_util.flatten_dict(plain, sep=".") if plain else {}


def changed_resume_keys(saved: dict, config) -> list[str]:
    """Keys under :data:`RESUME_KEYS` whose value differs between ``saved`` (the run's
    ``config.json``) and ``config``; sorted, dotted (``data.crop``, ``model.gen.ngf``)."""
    live = _flat(config.to_dict())
    # Only for keys the live config has: an LDM config has no model.gen to default.
    old = {**{k: v for k, v in ABSENT_MEANS.items() if k in live}, **_flat(saved)}

    def watched(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUME_KEYS)

    keys = {k for k in set(live) | set(old) if watched(k)}
    return sorted(k for k in keys if live.get(k, "<absent>") != old.get(k, "<absent>"))


def check_workdir(workdir: Path) -> None:
    """A workdir that is a file, or inside a folder that cannot be written: ConfigError."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{workdir}: --workdir is a file, not a folder")
    existing = next(p for p in [workdir, *workdir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{workdir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{workdir}: {existing} is not writable")


def check_resume_config(config, workdir: Path, has_checkpoint: bool) -> None:
    """Refuses a resume whose config changes the state or the data (one line)."""
    path = workdir / "config.json"
    if not has_checkpoint or not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}); it describes the "
                          "checkpoints of this run: restore it or use a new --workdir") from e
    changed = changed_resume_keys(saved, config)
    if changed:
        live, old = _flat(config.to_dict()), _flat(saved)
        shown = ", ".join(f"{k}: {old.get(k, '<absent>')} -> {live.get(k, '<absent>')}"
                          for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise ConfigError(f"{path}: resuming with a config that changes {shown}{more}; "
                          "use a new --workdir, or the run's own config")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """``<workdir>/run.lock`` held by this process; :meth:`release` removes it."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_NAME
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record) + "\n")
        return True

    def acquire(self) -> "RunLock":
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            try:
                holder = json.loads(self.path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue  # released in between: try again
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = {}, -1, self.record["host"]  # half-written: stale
            if host != self.record["host"]:
                raise RunDirBusy(f"{self.path}: run directory held by pid {pid} on host "
                                 f"{host} since {holder.get('started', '?')}; one writer per "
                                 "run (remove the lock only if that process is gone)")
            if pid > 0 and _pid_alive(pid):
                raise RunDirBusy(f"{self.path}: run directory held by pid {pid} on {host} "
                                 f"since {holder.get('started', '?')}; one writer per run")
            log.warning("%s: taking over a stale lock (pid %s on %s is gone)", self.path,
                        pid if pid > 0 else "?", host)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise RunDirBusy(f"{self.path}: could not take the run directory's lock")

    def release(self) -> None:
        if not self.held:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == self.record["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False


def open_run_dir(config, workdir: str | Path, has_checkpoint: bool) -> RunLock:
    """Checks the workdir and the resume config, creates the folder, takes the lock.

    Args:
      config: the run's config.
      workdir: the run directory.
      has_checkpoint: the workdir holds a checkpoint (this is a resume).

    Returns:
      The held :class:`RunLock` (release it when the training ends).

    Raises:
      ConfigError: a workdir that is a file or not writable; a resume with changed
        :data:`RESUME_KEYS` (the message lists them).
      RunDirBusy: another live process holds the lock.
    """
    workdir = Path(workdir)
    check_workdir(workdir)
    check_resume_config(config, workdir, has_checkpoint)
    workdir.mkdir(parents=True, exist_ok=True)
    return RunLock(workdir).acquire()

