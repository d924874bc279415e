"""An agent's job journal: the evaluations, promotions and trainings it launched, and what became of them.

A tool that starts fleet work returns the job id at once; the work runs in the session's nursery and its
result lands here. A result stays "unseen" until a model request that showed it was answered, so a
result that arrives while the model thinks is never lost or shown only once in passing. `wait` sleeps
on the journal, not on the model: no model call is made while it waits.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from enpire.agents.toolkit import ToolError

JobKind = Literal["evaluate", "promote", "train"]


@dataclass
class Job:
    job_id: str
    kind: JobKind
    label: str  # what it runs: a policy reference or a recipe
    asked: dict[str, Any]  # the arguments the model gave, shown back with the result
    started: float
    state: Literal["running", "done", "failed"] = "running"
    result: Any = None  # EvalResult / PromoteResult / TrainResult when done
    error: str = ""  # one line when failed
    finished: float = 0.0
    seen: bool = False

    @property
    def experiment(self) -> bool:
        """A finished experiment: a result the fleet measured (a refusal or a crash is not one)."""
        return self.state == "done"


@dataclass
class JobJournal:
    nursery: trio.Nursery
    clock: Callable[[], float] = time.time
    keep: int = 200  # jobs remembered; the oldest seen ones are dropped first
    max_running: int = 64  # a model that loops on evaluate cannot fill the fleet's queue (each may hold 200 seeds)
    jobs: dict[str, Job] = field(default_factory=dict)
    _changed: trio.Event = field(default_factory=trio.Event)

    def launch(self, job_id: str, kind: JobKind, label: str, asked: dict[str, Any],
               work: Callable[[], Awaitable[Any]]) -> Job:
        running = sum(j.state == "running" for j in self.jobs.values())
        if running >= self.max_running:
            raise ToolError(f"{running} of your jobs are still running (at most {self.max_running}): wait for "
                            "results before you start more")
        job = Job(job_id, kind, label, asked, self.clock())
        self.jobs[job_id] = job
        self._forget_old()
        self.nursery.start_soon(self._run, job, work)
        return job

    async def _run(self, job: Job, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            job.result = await work()
            job.state = "done"
        except (ToolError, TimeoutError) as e:  # refused or unanswered: no experiment happened
            job.state, job.error = "failed", str(e)[:500]
        finally:
            job.finished = self.clock()
            self._changed.set()
            self._changed = trio.Event()

    def _forget_old(self) -> None:
        while len(self.jobs) > self.keep:
            victim = next((j for j in self.jobs.values() if j.state != "running" and j.seen), None)
            if victim is None:
                return
            del self.jobs[victim.job_id]

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            known = ", ".join(list(self.jobs)[-5:]) or "none yet"
            raise ToolError(f"no job {job_id!r} among yours (latest: {known})")
        return job

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == "running"]

    def unseen(self) -> list[Job]:
        """Finished jobs whose result no answered model request has shown yet, oldest first."""
        return sorted((j for j in self.jobs.values() if j.state != "running" and not j.seen), key=lambda j: j.finished)

    def mark_seen(self, job_ids: Sequence[str]) -> None:
        for i in job_ids:
            if i in self.jobs:
                self.jobs[i].seen = True

    async def changed(self) -> None:
        """Returns when any job finishes next."""
        await self._changed.wait()

    async def wait(self, job_ids: Sequence[str], timeout_s: float) -> tuple[list[Job], bool]:
        """Sleep until every named job finished (none named: until any result not yet seen is in), or the
        timeout. Returns (the jobs waited for, whether the wait was satisfied)."""
        wanted = [self.get(i) for i in job_ids]

        def satisfied() -> bool:
            if wanted:
                return all(j.state != "running" for j in wanted)
            return bool(self.unseen()) or not self.running()

        with trio.move_on_after(max(0.0, timeout_s)):
            while not satisfied():
                await self.changed()
        return (wanted or self.unseen()), satisfied()
