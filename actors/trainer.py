"""The trainer actor: runs training recipes in subprocesses and stores checkpoints by content hash.

A recipe (`python -m enpire.learning.recipes --recipe NAME ...`) reads the fleet's recorded episodes
and writes `weights.npz` (plain arrays) and `metrics.json`. It runs in its own process with a time
budget (enforced here) and a memory budget (RLIMIT_AS in the recipe), so a crash, a hang, NaNs or a
memory blow-up end as a `TrainResult` with a one-line error and leave the fleet running.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from actors.runtime import Actor
from bus.blackboard import Blackboard
from bus.messages import Message, TrainRequest, TrainResult
from bus.records import TrainRecord
from enpire.learning.dataset import ARTIFACTS
from enpire.sandbox import without_credentials

RECIPES = ("bc", "rl", "visuomotor")  # as enpire.learning.recipes.RECIPES


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


class Trainer(Actor):
    name = "trainer"
    concurrent_handlers = True  # requests wait for their job; the slot limit below keeps the cores for cells

    def __init__(self, board: Blackboard, state_dir: Path, slots: int = 1):
        super().__init__()
        self.board = board
        self.state_dir = state_dir
        self.artifacts = state_dir / ARTIFACTS
        self.slots = trio.Semaphore(slots)
        self.running: dict[str, trio.Event] = {}

    async def handle(self, msg: Message) -> Message:
        if not isinstance(msg, TrainRequest):
            raise TypeError(f"trainer does not handle {type(msg).__name__}")
        done = self.board.get("training", msg.job_id, TrainRecord)
        if done is None and msg.job_id in self.running:  # the same job asked twice: wait for the first
            await self.running[msg.job_id].wait()
            done = self.board.get("training", msg.job_id, TrainRecord)
        if done is None:
            self.running[msg.job_id] = trio.Event()
            try:
                async with self.slots:
                    done = await self._train(msg)
                self.board.put("training", msg.job_id, done)
            finally:
                self.running.pop(msg.job_id).set()
        return TrainResult(job_id=done.job_id, ok=done.ok, artifact=done.artifact, error=done.error,
                           metrics=done.metrics)

    async def _train(self, msg: TrainRequest) -> TrainRecord:
        started = time.time()

        def record(ok: bool, artifact: str = "", error: str = "", metrics: dict | None = None) -> TrainRecord:
            return TrainRecord(msg.job_id, msg.agent, msg.recipe, ok, artifact, error[:300], metrics or {},
                               time.time() - started)

        if msg.recipe not in RECIPES:
            return record(False, error=f"unknown recipe {msg.recipe!r}; known: {', '.join(RECIPES)}")
        with tempfile.TemporaryDirectory(dir=self.state_dir) as out:
            command = [
                sys.executable, "-m", "enpire.learning.recipes", "--recipe", msg.recipe, "--task", msg.task,
                "--state-dir", str(self.state_dir), "--out", out, "--time-budget-s", str(msg.time_budget_s),
                "--max-rss-mb", str(msg.max_rss_mb),
            ]
            for key, value in sorted(msg.options.items()):
                command += ["--option", f"{key}={value}"]
            self.log.info("training_started", job=msg.job_id, recipe=msg.recipe, agent=msg.agent)
            proc = None
            with trio.move_on_after(msg.time_budget_s + 30.0) as scope:  # the recipe's own budget, plus grace
                proc = await trio.run_process(command, check=False, capture_stdout=True, capture_stderr=True,
                                              env=without_credentials(os.environ))  # recipes need no model key
            if scope.cancelled_caught or proc is None:
                return record(False, error=f"time budget exceeded ({msg.time_budget_s:.0f} s)")
            if proc.returncode != 0:
                lines = proc.stderr.decode(errors="replace").strip().splitlines()
                why = lines[-1] if lines else f"exit code {proc.returncode}"
                return record(False, error=f"recipe failed (exit {proc.returncode}): {why}")
            weights, metrics_file = Path(out) / "weights.npz", Path(out) / "metrics.json"
            if not weights.exists():
                return record(False, error="recipe wrote no weights.npz")
            try:
                metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()
                           if isinstance(v, (int, float))}
            except (OSError, ValueError):
                metrics = {}
            artifact = content_hash(weights)
            self.artifacts.mkdir(parents=True, exist_ok=True)
            target = self.artifacts / f"{artifact}.npz"
            if not target.exists():
                shutil.move(str(weights), target)
        self.log.info("training_finished", job=msg.job_id, recipe=msg.recipe, artifact=artifact, **metrics)
        return record(True, artifact=artifact, metrics=metrics)
