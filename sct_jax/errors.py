"""Errors that the entry points turn into a one-line message and a non-zero exit."""


class SctError(Exception):
    """A user-facing problem with input data or configuration.

    The message must name the offending file (or config key) and the problem on one
    line, e.g. ``"data/1PA001/ct.nii.gz: shape (10, 10, 10) differs from mr (10, 10, 9)"``.
    """


class DataError(SctError):
    """Bad input data: missing, unreadable, wrong shape or geometry, non-finite."""


class ConfigError(SctError):
    """A config value that cannot work (unknown method, crop not divisible, ...)."""
