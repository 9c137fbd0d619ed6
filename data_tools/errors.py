"""The one exception type for bad input: the command line prints its message as one line and exits with code 2."""

from __future__ import annotations


class DataToolsError(Exception):
    """Bad input or an unusable output folder; the message names the problem and the fix."""
