"""The two kinds of failure a user can fix, and the exit status each gets (`dr.cli` maps them).

- `UsageError` (exit 2): a flag, a config value or a combination of them is wrong; rerun with other flags.
- `InputError` (exit 1): the data or files named by valid flags are missing, malformed or inconsistent;
  the message names the file, the row and the field.

Every `dr` error class derives from one of them, so one `except DrError` in `dr.cli` turns any of them
into one line on stderr and the right exit status. Anything else is a bug and keeps its traceback.
They subclass `ValueError` so library callers that catch `ValueError` keep working.
"""

from __future__ import annotations


class DrError(ValueError):
    """Base of every error `dr` reports as one line (no traceback)."""

    exit_code = 1


class UsageError(DrError):
    """Bad flags or config values (exit status 2)."""

    exit_code = 2


class InputError(DrError):
    """Bad data or files: missing, malformed, inconsistent, or outputs that conflict (exit status 1)."""

    exit_code = 1


class PeerFailed(InputError):
    """Raised on the ranks that did not fail when another rank did; that rank reports its own error."""
