"""One daemon per state directory: the lock, its holder's pid, and release when the holder dies."""

import os
import signal
import subprocess
import sys
import time

import pytest

from enpire.statelock import StateDirLocked, StateLock, holder_pid


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = StateLock(tmp_path).acquire()
    with pytest.raises(StateDirLocked) as refused:
        StateLock(tmp_path).acquire()
    assert refused.value.holder == os.getpid()
    assert f"pid {os.getpid()}" in str(refused.value) and "\n" not in str(refused.value)
    first.release()
    with StateLock(tmp_path):  # free again once released
        assert holder_pid(tmp_path) == os.getpid()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from enpire.statelock import StateLock; "
         f"StateLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(StateDirLocked) as refused:
            StateLock(tmp_path).acquire()
        assert refused.value.holder == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops a flock when its holder dies: no stale lock to clean up
        try:
            StateLock(tmp_path).acquire().release()
            break
        except StateDirLocked:
            assert time.monotonic() < deadline, "lock still held after its holder was killed"
            time.sleep(0.05)
