"""Errors that the entry points turn into a one-line message and a non-zero exit.

Exit status of every entry point (``sct_jax.guard``): 0 success (QA: pass or warn),
1 the work failed (QA: fail; training diverged; the disk is full), 2 bad input or
configuration (nothing was written), 3 internal error (a bug: the traceback is kept).
"""

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class SctError(Exception):
    """A user-facing problem with input data or configuration (exit status 2).

    The message must name the offending file (or config key) and the problem on one
    line, e.g. ``"data/1PA001/ct.nii.gz: shape (10, 10, 10) differs from mr (10, 10, 9)"``.
    """

    exit_code = EXIT_BAD_INPUT


class DataError(SctError):
    """Bad input data: missing, unreadable, wrong shape or geometry, non-finite."""


class ConfigError(SctError):
    """A config value that cannot work (unknown method, crop not divisible, ...)."""


class RunFailed(SctError):
    """The inputs were fine but the work could not finish (exit status 1): a full disk,
    a training run that diverged."""

    exit_code = EXIT_FAIL
