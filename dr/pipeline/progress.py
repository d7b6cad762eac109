"""One console line of progress per stage while it runs, read from the stage's own output.

`dr pipeline --quiet` and `dr demo` keep a stage's output in its log file; the console used to stay silent
for the minutes a training or encoding stage takes, which on a slow machine looks like a hang. Every stage
already reports its position through a tqdm bar (training steps, passages / queries encoded); this module
finds the newest bar state in the byte stream and prints it at most every `interval_s` seconds, e.g.

    [dr pipeline 12:03:41] train: 12/31 steps, 4.9 s/step
    [dr pipeline 12:05:02] encode_corpus[0/1]: 640/1276 psg, 85.3 psg/s

The rate is measured here, between two printed lines (tqdm's own, shown only until the bar has moved, is
an average that a resumed training's jump from 0 to step 51 inflates for many steps).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable

# "  12/31 [00:59<01:33,  4.90s/it]" or " 640/1276 [00:07<00:07, 85.3psg/s]" (tqdm's default format)
_BAR = re.compile(rb"(\d+)/(\d+) \[[^\]\r\n]*?,\s*([0-9.]+)\s*(s/[A-Za-z]+|[A-Za-z]+/s)\]")


def _units(raw: str) -> tuple[str, str]:
    """(rate text, count unit) from tqdm's unit: "it" is a training step here."""
    if raw.startswith("s/"):
        unit = raw[2:]
        unit = "step" if unit == "it" else unit
        return f"s/{unit}", "steps" if unit == "step" else unit
    unit = raw[:-2]
    unit = "step" if unit == "it" else unit
    return f"{unit}/s", "steps" if unit == "step" else unit


class StageProgress:
    """Feed it the stage's output chunks; it prints `name: done/total unit, rate` every `interval_s`."""

    def __init__(
        self,
        name: str,
        interval_s: float = 15.0,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.emit = emit or (lambda line: print(line, file=sys.stdout, flush=True))
        self.clock = clock
        self._last_emit = clock()
        self._latest: str | None = None
        self._latest_count = 0
        self._since: tuple[int, float] | None = None  # (count, time) the next printed rate is measured from
        self._tail = b""  # a bar split across two chunks

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk
        self._tail = data[-200:]
        matches = list(_BAR.finditer(data))
        now = self.clock()
        if matches:
            done_text, total, rate_text, raw = matches[-1].groups()
            done, rate = int(done_text), float(rate_text)
            rate_unit, unit = _units(raw.decode())
            if self._since is None:
                self._since = (done, now)
            moved, elapsed = done - self._since[0], now - self._since[1]
            if moved > 0 and elapsed > 0:
                rate = elapsed / moved if rate_unit.startswith("s/") else moved / elapsed
            self._latest = f"{self.name}: {done}/{int(total)} {unit}, {rate:.3g} {rate_unit}"
            self._latest_count = done
        if self._latest and now - self._last_emit >= self.interval_s:
            self._print(self._latest)
            self._since = (self._latest_count, now)
            self._last_emit = now

    def _print(self, text: str) -> None:
        self.emit(f"[dr pipeline {time.strftime('%H:%M:%S')}] {text}")
        self._latest = None
