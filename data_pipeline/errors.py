"""The one exception class for data problems a user must fix: input files, shard folders,
storage locations. The message is one line naming the file, shard or URL and the fix; the CLI
prints it without a traceback."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with input data or a data location that the user must fix (one line)."""
