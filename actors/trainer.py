"""The trainer actor: the fleet's training queue, served by in-process runners and by remote trainers.

Agents ask with a `TrainRequest` (idempotent by job_id: a repeated request gets the recorded result).
Each job is queued; whoever is free takes it:
- the daemon's own runners (`[trainer] local_slots`, default 1: the in-process trainer stays the
  default), which run the recipe on this machine;
- trainers that joined over the bus (`python -m enpire.trainer --connect tcp://HOST:PORT`, the same
  authenticated transport as remote cells), which long-poll `TrainJobRequest` and get a `TrainJob` lease.

A job's episodes are chosen here, once, from the blackboard (`dataset.choose`: agents' experiments on
tuning seeds, never held-out or background episodes) and named by content hash; a remote trainer can
fetch only the files of the lease it holds. A lease lapses unless a heartbeat arrives within
`lease_s`; the job then goes back to the front of the queue, as a dead cell's episode does, and the
old holder's late result is refused, so each job records one checkpoint. Checkpoints are stored in
artifacts/ by content hash, with `<hash>.json` beside them: metrics, device, GPU, throughput.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import trio

from actors.runtime import Actor
from bus.blackboard import Blackboard
from bus.messages import (
    Ack,
    DataReply,
    DataRequest,
    EpisodeRef,
    Failure,
    Message,
    NoWork,
    TrainDone,
    TrainerHeartbeat,
    TrainerHello,
    TrainJob,
    TrainJobRequest,
    TrainRequest,
    TrainResult,
)
from bus.records import EpisodeRecord, TrainerRecord, TrainRecord
from enpire.config import TrainerConfig
from enpire.learning import runner
from enpire.learning.dataset import ARTIFACTS, choose

RECIPES = runner.RECIPES
content_hash = runner.content_hash
MAX_DATA_REPLY = 32 << 20  # bytes of episode files per DataReply (frames are capped at 64 MiB)
LOCAL = "local"


class JobError(ValueError):
    """A job that cannot be built (bad options, unknown init checkpoint): it fails with this line."""


@dataclass
class Job:
    request: TrainRequest
    done: trio.Event = field(default_factory=trio.Event)
    episodes: list[EpisodeRef] | None = None  # chosen at the first lease, kept for re-runs
    files: dict[str, Path] = field(default_factory=dict)  # content hash -> file in the state dir
    init: str = ""
    lease_id: str = ""
    holder: str = ""
    expires: float = 0.0
    attempts: int = 0
    started: float = field(default_factory=time.time)


class Trainer(Actor):
    name = "trainer"
    concurrent_handlers = True  # requests wait for their job; long-polls wait for work

    def __init__(self, board: Blackboard, state_dir: Path, config: TrainerConfig | None = None,
                 slots: int | None = None):
        super().__init__()
        self.board = board
        self.state_dir = state_dir
        self.config = config or TrainerConfig()
        self.local_slots = self.config.local_slots if slots is None else slots
        self.artifacts = state_dir / ARTIFACTS
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.leases: dict[str, str] = {}  # lease_id -> job_id
        self.trainers: dict[str, TrainerRecord] = {}
        self._work = trio.Event()  # set when a job is queued; replaced once consumed
        self._hashes: dict[str, tuple[float, str]] = {}  # episode file -> (mtime, content hash)

    # ------------------------------------------------------------------------- lifecycle

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(self.local_slots):
                nursery.start_soon(self._local_runner, f"{LOCAL}-{i}" if self.local_slots > 1 else LOCAL)
            nursery.start_soon(self._sweep)

    async def handle(self, msg: Message) -> Message:
        if isinstance(msg, TrainRequest):
            return await self._submit(msg)
        if isinstance(msg, TrainerHello):
            return await self._hello(msg)
        if isinstance(msg, TrainJobRequest):
            return await self._lease(msg)
        if isinstance(msg, DataRequest):
            return await self._data(msg)
        if isinstance(msg, TrainerHeartbeat):
            return await self._heartbeat(msg)
        if isinstance(msg, TrainDone):
            return await self._done(msg)
        raise TypeError(f"trainer does not handle {type(msg).__name__}")

    # ------------------------------------------------------------------------- agents' side

    async def _submit(self, msg: TrainRequest) -> TrainResult:
        done = self.board.get("training", msg.job_id, TrainRecord)
        if done is None:
            job = self.jobs.get(msg.job_id)
            if job is None:
                job = self.jobs[msg.job_id] = Job(msg)
                self._enqueue(msg.job_id)
                self.log.info("training_queued", job=msg.job_id, recipe=msg.recipe, agent=msg.agent,
                              queued=len(self.queue), trainers=self._live_trainers())
            await job.done.wait()
            done = self.board.get("training", msg.job_id, TrainRecord)
            assert done is not None
        return TrainResult(job_id=done.job_id, ok=done.ok, artifact=done.artifact, error=done.error,
                           metrics=done.metrics, info=done.info)

    def _enqueue(self, job_id: str, front: bool = False) -> None:
        (self.queue.appendleft if front else self.queue.append)(job_id)
        self._work.set()

    async def _take(self) -> Job | None:
        """The next queued job, or None when there is none."""
        while self.queue:
            job = self.jobs.get(self.queue.popleft())
            if job is not None and not job.done.is_set():
                return job
        self._work = trio.Event()
        return None

    # ------------------------------------------------------------------------- selection

    def _option(self, job: Job, key: str, kind, default):
        value = job.request.options.get(key)
        if value is None:
            return default
        try:
            if kind is bool:
                return value.strip().lower() not in ("0", "false", "no", "")
            return kind(value)
        except ValueError:
            raise JobError(f"option {key}={value!r} is not a valid {kind.__name__}") from None

    def _select(self, job: Job) -> None:
        """Choose the job's episodes (agents' tuning episodes only) and name each by content hash."""
        if job.episodes is not None:
            return
        records = choose(self.board.values("episodes", EpisodeRecord), task=job.request.task,
                         success_only=self._option(job, "success_only", bool, True),
                         max_episodes=self._option(job, "max_episodes", int, None))
        refs, files = [], {}
        for rec in records:
            path = self.state_dir / rec.trajectory_file
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # a missing file: the recipe would skip it too
            cached = self._hashes.get(str(path))
            sha = cached[1] if cached and cached[0] == mtime else content_hash(path)
            self._hashes[str(path)] = (mtime, sha)
            if sha not in files:
                refs.append(EpisodeRef(rec.episode_id, sha, bool(rec.verdict.success)))
                files[sha] = path
        init = job.request.options.get("init_artifact", "")
        if init:
            path = self.artifacts / f"{init}.npz"
            if not re.fullmatch("[0-9a-f]{32}", init) or not path.exists():  # a hash, never a path
                raise JobError(f"init_artifact {init!r}: no checkpoint of that hash in artifacts/")
            files[init] = path
        job.episodes, job.files, job.init = refs, files, init

    # ------------------------------------------------------------------------- in-process runners

    async def _local_runner(self, runner_id: str) -> None:
        await self._register(TrainerHello(trainer_id=runner_id, host=socket.gethostname(), pid=os.getpid(),
                                    device=self.config.device, processes=self.config.processes))
        while True:
            job = await self._take()
            if job is None:
                await self._work.wait()
                continue
            job.attempts += 1
            job.holder, job.lease_id = runner_id, f"{runner_id}-{uuid.uuid4().hex[:8]}"
            await self._trainer_state(runner_id, "training", job.request.job_id)
            try:
                await trio.to_thread.run_sync(self._select, job)
                processes = await trio.to_thread.run_sync(runner.resolve_processes, self.config.processes,
                                                          self.config.device)
                outcome = await self._run_here(job, processes)
            except JobError as e:
                outcome = runner.Outcome(False, str(e))
            outcome.info.update(trainer=runner_id, host=socket.gethostname())
            await self._finish(job, outcome)
            await self._trainer_state(runner_id, "idle", "", outcome.metrics.get("samples_per_s"))

    async def _run_here(self, job: Job, processes: int) -> runner.Outcome:
        req = job.request
        self.log.info("training_started", job=req.job_id, recipe=req.recipe, agent=req.agent, trainer=job.holder)
        with tempfile.TemporaryDirectory(dir=self.state_dir, prefix="train-") as tmp:
            job_dir = Path(tmp)
            episodes = [(e.sha, job.files[e.sha], e.success) for e in job.episodes or []]
            init = (job.init, job.files[job.init]) if job.init else None
            await trio.to_thread.run_sync(runner.stage, job_dir, episodes, init)
            return await runner.run(req.recipe, req.task, job_dir, budget_s=req.time_budget_s,
                                    max_rss_mb=req.max_rss_mb, options=req.options, device=self.config.device,
                                    processes=processes)

    # ------------------------------------------------------------------------- remote trainers

    async def _register(self, hello: TrainerHello) -> TrainerRecord:
        now = time.time()
        old = self.trainers.get(hello.trainer_id)
        rec = TrainerRecord(hello.trainer_id, hello.host, hello.pid, hello.device, hello.gpu, hello.processes,
                            joined=now, last_seen=now, jobs_done=old.jobs_done if old else 0)
        self.trainers[hello.trainer_id] = rec
        await self._save(hello.trainer_id)
        return rec

    async def _hello(self, msg: TrainerHello) -> Message:
        await self._register(msg)
        self.log.info("trainer_joined", trainer=msg.trainer_id, host=msg.host, device=msg.device, gpu=msg.gpu)
        return Ack(detail="welcome")

    def _seen(self, trainer_id: str) -> TrainerRecord | None:
        rec = self.trainers.get(trainer_id)
        if rec is not None:
            rec.last_seen = time.time()
        return rec

    async def _trainer_state(self, trainer_id: str, state: str, job_id: str, samples_per_s: float | None = None) -> None:
        rec = self._seen(trainer_id)
        if rec is None:
            return
        rec.state, rec.job_id = state, job_id
        if samples_per_s is not None:
            rec.samples_per_s = float(samples_per_s)
            rec.jobs_done += 1
        await self._save(trainer_id)

    async def _save(self, *trainer_ids: str) -> None:
        """Write trainers' records (what `status` shows) in a worker thread, so the loop never waits for
        LMDB's fsync. Each write encodes the records inside its transaction, and LMDB runs one write
        transaction at a time, so the last to commit holds the latest state."""
        def write(w) -> None:
            for trainer_id in trainer_ids:
                w.put("trainers", trainer_id, self.trainers[trainer_id])
        await self.board.transact(write)

    def _live_trainers(self) -> int:
        return sum(r.state != "offline" for r in self.trainers.values())

    async def _lease(self, msg: TrainJobRequest) -> Message:
        rec = self._seen(msg.trainer_id)
        if rec is None:
            return Failure(error=f"trainer {msg.trainer_id!r} has not said hello", retry=False)
        if rec.state == "offline":  # it was silent for a while (and lost its job), but it is back
            await self._trainer_state(msg.trainer_id, "idle", "")
        job = None
        with trio.move_on_after(max(0.0, min(msg.wait_s, 30.0))):
            while True:
                job = await self._take()
                if job is not None:
                    break
                await self._work.wait()
        if job is None:
            return NoWork(retry_after_s=0.0)
        try:
            await trio.to_thread.run_sync(self._select, job)
        except JobError as e:
            await self._finish(job, runner.Outcome(False, str(e)))
            return NoWork(retry_after_s=0.0)
        job.attempts += 1
        job.lease_id, job.holder = uuid.uuid4().hex, msg.trainer_id
        job.expires = time.monotonic() + self.config.lease_s
        self.leases[job.lease_id] = job.request.job_id
        await self._trainer_state(msg.trainer_id, "fetching", job.request.job_id)
        req = job.request
        self.log.info("training_leased", job=req.job_id, trainer=msg.trainer_id, attempt=job.attempts,
                      episodes=len(job.episodes or []))
        options = {k: v for k, v in req.options.items() if k not in ("success_only", "max_episodes")}
        return TrainJob(lease_id=job.lease_id, job_id=req.job_id, task=req.task, recipe=req.recipe,
                        time_budget_s=req.time_budget_s, max_rss_mb=req.max_rss_mb, options=options,
                        episodes=list(job.episodes or []), init_artifact=job.init, lease_s=self.config.lease_s,
                        heartbeat_s=self.config.heartbeat_s)

    def _held(self, trainer_id: str, lease_id: str) -> Job | None:
        job = self.jobs.get(self.leases.get(lease_id, ""))
        if job is None or job.holder != trainer_id or job.lease_id != lease_id or job.done.is_set():
            return None
        return job

    async def _data(self, msg: DataRequest) -> Message:
        self._seen(msg.trainer_id)
        job = self._held(msg.trainer_id, msg.lease_id)
        if job is None:
            return Failure(error=f"lease {msg.lease_id} is not held by {msg.trainer_id}")
        unknown = [h for h in msg.hashes if h not in job.files]
        if unknown:  # held-out episodes, other jobs' files: nothing outside the lease's selection
            return Failure(error=f"{len(unknown)} file(s) are not part of job {job.request.job_id}, e.g. {unknown[0]}")

        def read() -> dict[str, bytes]:
            files, size = {}, 0
            for h in msg.hashes:
                data = job.files[h].read_bytes()
                if files and size + len(data) > MAX_DATA_REPLY:
                    break  # the trainer asks again for the rest
                files[h] = data
                size += len(data)
            return files

        job.expires = time.monotonic() + self.config.lease_s
        return DataReply(files=await trio.to_thread.run_sync(read))

    async def _heartbeat(self, msg: TrainerHeartbeat) -> Message:
        if self._seen(msg.trainer_id) is None:
            return Ack(ok=False, detail="unknown trainer: say hello again")
        if not msg.lease_id:
            return Ack()
        job = self._held(msg.trainer_id, msg.lease_id)
        if job is None:
            return Ack(ok=False, detail=f"lease {msg.lease_id} lapsed; its job went back to the queue")
        job.expires = time.monotonic() + self.config.lease_s
        if self.trainers[msg.trainer_id].state != msg.state:
            await self._trainer_state(msg.trainer_id, msg.state, job.request.job_id)
        return Ack()

    async def _done(self, msg: TrainDone) -> Message:
        self._seen(msg.trainer_id)
        job = self._held(msg.trainer_id, msg.lease_id)
        if job is None:  # a lapsed lease (the job ran again elsewhere) or a finished job: never recorded twice
            self.log.warning("training_result_refused", job=msg.job_id, trainer=msg.trainer_id, lease=msg.lease_id)
            return Ack(ok=False, detail=f"lease {msg.lease_id} is not held: result not recorded")
        outcome = runner.Outcome(msg.ok, msg.error[:300], msg.weights, dict(msg.metrics), dict(msg.info))
        host = self.trainers[msg.trainer_id].host if msg.trainer_id in self.trainers else ""
        outcome.info.update(trainer=msg.trainer_id, host=host)
        await self._finish(job, outcome)
        await self._trainer_state(msg.trainer_id, "idle", "", outcome.metrics.get("samples_per_s", 0.0))
        return Ack(detail="recorded")

    async def _sweep(self) -> None:
        """Re-queue jobs whose lease lapsed; mark silent trainers offline."""
        while True:
            await trio.sleep(min(1.0, self.config.heartbeat_s))
            now = time.monotonic()
            for lease_id, job_id in list(self.leases.items()):
                job = self.jobs.get(job_id)
                if job is None or job.done.is_set() or job.lease_id != lease_id:
                    del self.leases[lease_id]
                elif now > job.expires:
                    del self.leases[lease_id]
                    holder, job.lease_id, job.holder = job.holder, "", ""
                    self.log.warning("training_requeued", job=job_id, trainer=holder, attempt=job.attempts)
                    self._enqueue(job_id, front=True)
                    await self.board.transact(lambda w: w.incr("training_requeued"))
                    await self._trainer_state(holder, "offline", "")
            wall = time.time()
            silent = []
            for rec in self.trainers.values():
                local = rec.trainer_id.startswith(LOCAL) and rec.pid == os.getpid()
                if not local and rec.state != "offline" and wall - rec.last_seen > self.config.lease_s:
                    rec.state, rec.job_id = "offline", ""
                    silent.append(rec.trainer_id)
            if silent:
                await self._save(*silent)

    # ------------------------------------------------------------------------- results

    async def _finish(self, job: Job, outcome: runner.Outcome) -> None:
        """Store the checkpoint by content hash and record the job once (the first result wins)."""
        req = job.request
        self.leases.pop(job.lease_id, None)  # from here on no one else holds it, and the sweeper leaves it
        job.lease_id = ""
        if outcome.ok and not outcome.weights:
            outcome = runner.Outcome(False, "trainer returned no weights", info=outcome.info)
        artifact = await trio.to_thread.run_sync(self._store, job, outcome) if outcome.ok else ""
        record = TrainRecord(req.job_id, req.agent, req.recipe, outcome.ok, artifact, outcome.error[:300],
                             outcome.metrics, time.time() - job.started, info=outcome.info, attempts=job.attempts)
        first = await self.board.transact(lambda w: w.put("training", req.job_id, record, overwrite=False))
        job.done.set()
        self.jobs.pop(req.job_id, None)
        if first:
            event = "training_finished" if outcome.ok else "training_failed"
            self.log.info(event, job=req.job_id, recipe=req.recipe, artifact=artifact, error=outcome.error,
                          attempts=job.attempts, **outcome.info,
                          samples_per_s=round(outcome.metrics.get("samples_per_s", 0.0), 1))

    def _store(self, job: Job, outcome: runner.Outcome) -> str:
        """Write the checkpoint (by content hash) and its sidecar; returns the hash. Runs in a thread."""
        req = job.request
        artifact = runner.bytes_hash(outcome.weights)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        target = self.artifacts / f"{artifact}.npz"
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(outcome.weights)
            tmp.replace(target)
        sidecar = {"job_id": req.job_id, "recipe": req.recipe, "agent": req.agent, **outcome.info,
                   "metrics": outcome.metrics}
        target.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
        return artifact
