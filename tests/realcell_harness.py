"""A fleet core listening on loopback tcp, and a real cell process driven by a scripted operator on its stdin."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bus.records import SmokeRecord


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pass_smoke(board, policy) -> None:
    """Real cells run only policies that passed a simulated smoke test; these tests have no sim cell."""
    board.put("smoke", policy.ref, SmokeRecord(policy, True, "passed (test set-up)", time.time()))


class ScriptedOperator:
    """Reads the cell's terminal; answers each prompt by `answer(kind, line)` ("reset", "verdict"):
    a string is typed (after `delay_s`), None stays silent. `type()` sends any line at any time."""

    def __init__(self, proc: subprocess.Popen, answer: Callable[[str, str], str | None], delay_s: float = 0.0):
        self.proc = proc
        self.answer = answer
        self.delay_s = delay_s
        self.lines: list[str] = []
        self.errors: list[str] = []  # the cell's log (stderr), drained so the pipe never blocks it
        threading.Thread(target=lambda: self.errors.extend(proc.stderr), daemon=True).start()
        self.events: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def type(self, text: str) -> None:
        with self._lock:
            try:
                self.proc.stdin.write(text + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def _run(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self.events.put(line)
            kind = "reset" if "scene reset?" in line else "verdict" if "success?" in line else None
            if kind is None:
                continue
            reply = self.answer(kind, line)
            if reply is not None:
                time.sleep(self.delay_s)
                self.type(reply)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if text in line:
                return line
        raise AssertionError(f"no {text!r} on the cell's terminal within {timeout}s; last lines: {self.lines[-8:]}; "
                             f"log: {self.errors[-5:]}")


def start_real_cell(url: str, cell_id: str, interface_dir: Path, *extra: str, secret: str,
                    env: dict | None = None) -> subprocess.Popen:
    environ = {**os.environ, **(env or {}), "ENPIRE_SECRET": secret, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "enpire.cell", "--connect", url, "--cell-id", cell_id, "--real",
         "--interface-dir", str(interface_dir), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=environ,
    )
