"""tests.helpers.run on timeout: the command and everything under it die, including processes that left its
session (as torchrun's ranks do), so a hung distributed test cannot leave ranks holding cores and ports."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import run

# A launcher that starts a worker in a new session (as torchrun does) and then waits forever with it.
_LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(600)
"""


def test_timeout_kills_workers_in_their_own_session(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", _LAUNCHER, str(pid_file)], timeout=5)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"worker {worker} outlived the timed-out launcher"
        time.sleep(0.1)
