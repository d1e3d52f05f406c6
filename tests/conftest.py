"""Shared test set-up.

JAX compilation dominates this suite's time, and several tests build the same
programs (the tiny pix2pix step, say) from fresh processes or loops: a persistent
compilation cache in a per-run folder makes the repeats cache hits. The suite runs on
two pytest-xdist workers (pyproject's addopts), one test file at a time each.
"""

import atexit
import os
import shutil
import tempfile

import jax
import pytest
# absl.app defines its own flags (--only_check_args, ...) when first imported: import it
# before any test snapshots the flag set, so that a fixture which removes the flags it
# added never removes absl's.
from absl import app as _absl_app  # noqa: F401

# pytest-xdist's workers share the cache of the process that started them (they inherit
# its environment): a program one worker compiled is a hit for the other. That process
# made the folder and removes it when it exits, after its workers.
_CACHE = os.environ.get("SCT_JAX_TEST_JIT_CACHE")
if _CACHE is None:
    _CACHE = tempfile.mkdtemp(prefix="sct_jax_jit_cache_")
    os.environ["SCT_JAX_TEST_JIT_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Phantom datasets and prepared arrays go to a per-session folder, not ~/.cache.
_DATA_CACHE = tempfile.mkdtemp(prefix="sct_jax_data_cache_")
atexit.register(shutil.rmtree, _DATA_CACHE, ignore_errors=True)
os.environ["SCT_JAX_CACHE"] = _DATA_CACHE
# Subprocess tests (sharding, CLIs) share the cache through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    """Tests refer to configs/... relative to the repository root."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
