"""The error contract every entry point shares: one line on stderr, an exit status.

Exit status (say it in each entry point's ``--help`` with :data:`EXIT_STATUS_HELP`):

====  =====================================================================
0     success (QA: pass or warn)
1     the work failed: QA fail, training diverged, the disk filled up
2     bad input or configuration: ``error: <file or flag>: <problem>``; nothing written
3     internal error: a bug; the traceback is printed, then one ``error:`` line
====  =====================================================================

Use from an ``absl`` entry point (``train.py``, ``evaluate.py``)::

    app.run(guarded(main), flags_parser=parse_flags)

and from an ``argparse`` one (``python -m sct_jax.cli.qa``)::

    parser = guard.ArgumentParser(prog=..., epilog=guard.EXIT_STATUS_HELP)
    def main(argv=None) -> int:
        return guard.run_main(lambda: _main(parser.parse_args(argv)))

Outputs are checked with :func:`sct_jax.io_guard.refuse_overwrite` before anything
is written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import re
import signal
import sys
import traceback
from typing import Any, Callable, Iterator, Sequence

from sct_jax.errors import (EXIT_BAD_INPUT, EXIT_FAIL, EXIT_INTERNAL, EXIT_OK,  # noqa: F401
                            SctError)

EXIT_STATUS_HELP = ("exit status: 0 success (QA: pass or warn); 1 failed (QA: fail, training "
                    "diverged, disk full); 2 bad input or configuration, nothing written; "
                    "3 internal error (a bug: please report the traceback)")

# Faults of the machine, not of the input or the code: one line, exit 1.
_FAULT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}
# A path the user chose cannot be read or written: bad input, exit 2.
_USER_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                     errno.ENOENT, errno.ELOOP, errno.ENAMETOOLONG}


def one_line(text: str) -> str:
    return " ".join(str(text).split()).strip()


def exit_code_for(exc: BaseException) -> int:
    """The exit status of an exception that ended an entry point (table above)."""
    if isinstance(exc, SctError):
        return int(getattr(exc, "exit_code", EXIT_BAD_INPUT))
    if isinstance(exc, OSError) and exc.errno in _FAULT_ERRNOS:
        return EXIT_FAIL
    if isinstance(exc, OSError) and exc.errno in _USER_PATH_ERRNOS and exc.filename:
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def error_message(exc: BaseException) -> str:
    """The one-line message (without ``error: ``) for ``exc``; names the file if known."""
    if isinstance(exc, OSError) and not isinstance(exc, SctError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return one_line(f"{where}{exc.strerror.lower()}")
    text = one_line(str(exc))
    if exit_code_for(exc) == EXIT_INTERNAL:
        return f"internal error ({type(exc).__name__}: {text}); please report the traceback above"
    return text or type(exc).__name__


def report(exc: BaseException) -> int:
    """Prints ``exc`` the contract's way and returns its exit status."""
    code = exit_code_for(exc)
    sys.stdout.flush()  # keep what was printed so far (a table) before the error
    if code == EXIT_INTERNAL:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {error_message(exc)}", file=sys.stderr, flush=True)
    return code


def run_main(fn: Callable[[], int | None]) -> int:
    """Runs ``fn`` and turns what it raises into the contract's line and status."""
    try:
        return int(fn() or EXIT_OK)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 (every exception gets a status)
        return report(e)


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's time limit, ``kill``): raised in the main thread.

    A ``BaseException``, so that no ``except Exception`` on the way swallows it, while
    every ``finally`` runs: :func:`sct_jax.data.io.atomic_path` removes the half-written
    temporary file of the output being saved.
    """


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the
    process outright (which would leave a ``.tmp-*`` file beside the output).

    Only in the main thread (signal handlers can be set nowhere else); the previous
    handler is restored on exit.
    """
    def handler(signum, frame):
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the default behaviour
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(main_fn: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
    """Wraps an ``absl.app`` main so that it ends with the contract's status.

    Usage::

        app.run(guarded(main), flags_parser=parse_flags)
    """

    @functools.wraps(main_fn)
    def wrapper(argv: Sequence[str]) -> Any:
        quiet_libraries()
        code = run_main(lambda: main_fn(argv))
        if code:
            sys.exit(code)
        return None

    return wrapper


def parse_flags(argv: Sequence[str]) -> list[str]:
    """``absl`` flag parsing with one-line errors (exit 2) instead of usage dumps.

    Covers unknown flags, bad values (``--config.train.steps=abc``), unknown config keys
    (``--config.train.stepz``: with the nearest valid key) and errors raised by a
    config file's ``get_config`` (``:tinyy``).
    """
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except Exception as e:  # noqa: BLE001
        code = exit_code_for(e)
        if code == EXIT_INTERNAL:  # parse-time errors are the user's: never a bug
            code = EXIT_BAD_INPUT
        print(f"error: {_flag_error_message(e, argv, flags.FLAGS)}", file=sys.stderr,
              flush=True)
        sys.exit(code)


def _flag_error_message(exc: BaseException, argv: Sequence[str],
                        flag_values: Any = None) -> str:
    """The one-line message of a flag-parsing error, naming the flag that is wrong.

    Args:
      exc: what ``flag_values(argv)`` raised.
      argv: the command line, program name first.
      flag_values: the ``absl`` ``FlagValues`` that raised it (tells which
        ``--config.*`` override was being parsed), or ``None``.
    """
    text = str(exc)
    if isinstance(exc, (AttributeError, KeyError)) or "Did you mean" in text:
        # ml_collections: '\'stepz\'\nDid you mean "steps" instead of "stepz"?'
        key = _failing_override(text, argv, flag_values)
        config = _config_arg(argv)
        where = f"{config}: " if config else ""
        near = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
        hint = ""
        if near:
            parts = key.split(".")[1:]
            parts = [near.group(1) if p == near.group(2) else p for p in parts]
            hint = f"; did you mean {'.'.join(parts)}?"
        return one_line(f"{where}{key}: unknown config key{hint}")
    if isinstance(exc, SctError):
        config = _config_arg(argv)
        return one_line(f"{config}: {text}" if config and config not in text else text)
    # absl's own errors: "flag --x=y: invalid literal ..."; drop the usage hint
    return one_line(text.split("Pass --helpshort")[0])


def _failing_override(text: str, argv: Sequence[str], flag_values: Any = None) -> str:
    """The ``--config.<path>`` override of ``argv`` that the error ``text`` is about."""
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    if flag_values is not None:
        # ml_collections defines a flag per override, in command-line order, while it
        # parses --config: an unknown key stops it at the first override left undefined.
        # A defined override fails when absl parses it (in order, counting each parsed
        # one in ``present``): the first one not counted.
        for wanted in (lambda name: name not in flag_values,
                       lambda name: not flag_values[name].present):
            for key in overrides:
                if wanted(key[2:]):
                    return key
    # Else the override whose path holds the unknown name ml_collections quotes.
    unknown = re.findall(r"'([^'\s]+)'", text)
    for key in overrides:
        if unknown and unknown[0] in key[len("--config."):].split("."):
            return key
    return overrides[0] if overrides else ""


def _config_arg(argv: Sequence[str]) -> str:
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            return a.split("=", 1)[1].partition(":")[0]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1].partition(":")[0]
    return ""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with the contract's one-line errors: ``error: <prog>: <problem>``
    on stderr and exit 2 (argparse prints the whole usage block first)."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        print(f"error: {self.prog}: {one_line(message)} (see --help)", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_BAD_INPUT)


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
