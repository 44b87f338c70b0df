import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvrag.evaluation.run_lock import LOCK_NAME, RunLock, RunLockedError


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"in use by another run \(kvrag compare, "
                                                 rf"pid {os.getpid()} on "), RunLock(tmp_path):
            pass
    with RunLock(tmp_path):  # released on exit
        pass


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path: Path) -> None:
    code = ("import sys, time; from kvrag.evaluation.run_lock import RunLock\n"
            "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(RunLockedError, match=f"pid {child.pid} "), RunLock(tmp_path):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == child.pid  # stale
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
