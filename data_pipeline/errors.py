"""The one exception class for data problems a user must fix: input files, shard folders,
storage locations. The message is one line naming the file, shard or URL and the fix; the CLI
prints it without a traceback."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with input data or a data location that the user must fix (one line)."""


def shown(value: object) -> str:
    """A value for a one-line message, cut short: data files can hold huge values."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
