"""Shared entry-point plumbing for ``train.py`` and ``evaluate.py``."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

from sct_jax.errors import SctError


def guarded(main_fn: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
    """Wraps an ``absl.app`` main so user-facing errors end the run in one line.

    A :class:`sct_jax.errors.SctError` (bad data, bad config) is printed to stderr as
    ``error: <message>`` and the process exits with status 2, without a traceback: the
    message already names the file or config key. Any other exception is a bug and
    keeps its traceback.

    Usage::

        if __name__ == "__main__":
            app.run(guarded(main))
    """

    @functools.wraps(main_fn)
    def wrapper(argv: Sequence[str]) -> Any:
        quiet_libraries()
        try:
            return main_fn(argv)
        except SctError as e:
            message = " ".join(str(e).splitlines()).strip() or type(e).__name__
            sys.stdout.flush()  # keep the table printed so far before the error
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def quiet_libraries() -> None:
    """Keeps orbax/absl INFO chatter (per-checkpoint thread logs) off the console.

    Our own progress goes through print/tqdm; ``--verbosity=0`` (absl) brings it back.
    """
    import logging

    from absl import logging as absl_logging
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("orbax", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
