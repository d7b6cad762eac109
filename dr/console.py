"""Console output for every command: tables, summaries and progress lines that survive `| head`.

When the reader of a pipe goes away (``dr eval ... | head -1``), the next write raises BrokenPipeError;
left alone, Python prints a traceback, or "Exception ignored ... BrokenPipeError" when the error only
surfaces in the final flush at exit. `echo` writes and flushes each message at once, so the error
surfaces here, and then stops the program quietly, as a program killed by SIGPIPE would: no message,
exit status 141 (128 + SIGPIPE, what a shell reports for `yes | head -1`'s writer). Files the command
wrote before (metrics, runs) are complete: they are written atomically before the table is printed.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def echo(text: str = "", *, err: bool = False) -> None:
    """Print `text` and a newline to stdout (stderr with `err`), flushed; exit quietly if the pipe closed."""
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except BrokenPipeError:
        _exit_quietly(stream)


def _exit_quietly(stream) -> NoReturn:
    """Point `stream`'s descriptor at /dev/null (the interpreter's last flush must not fail again) and exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (e.g. captured by a test): nothing to redirect
        pass
    raise SystemExit(EXIT_BROKEN_PIPE)
