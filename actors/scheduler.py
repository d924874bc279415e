"""The scheduler actor: turns jobs into episodes and leases them to free cells.

- Cells pull work (`LeaseRequest`, long-polled) so a free robot is never left waiting for a push.
- Every episode is leased with a deadline. A lease that expires, or whose cell stops heartbeating, is
  put back in the queue under the same episode id; the first report for an episode id is recorded
  and any later one is acknowledged and ignored, so each episode ends with exactly one result.
- Order: the confirmation of a champion that may meet the target, held-out judging of candidates,
  then agents' evaluations (re-evaluations of measured candidates first, then fair share between
  agents), then background work: judging the starting policy, re-evaluating the champion on further
  held-out seeds to tighten its interval.
- Promotion: a candidate replaces the champion only when it is better with statistical confidence on
  the same held-out seeds (one-sided two-proportion z-test, `metrics.better_with_confidence`).

Everything that must survive a restart (jobs, episodes, champion, cells, timelines) is on the
blackboard; `setup()` rebuilds the queue from it.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import trio

from actors.runtime import Actor
from bus.blackboard import Blackboard
from bus.messages import (
    Ack,
    EpisodeReport,
    EpisodeSummary,
    EvalRequest,
    EvalResult,
    Failure,
    Heartbeat,
    Hello,
    JobKind,
    Lease,
    LeaseRequest,
    Message,
    NoWork,
    PolicyBundle,
    PolicySpec,
    PromoteRequest,
    PromoteResult,
    Segment,
    Welcome,
)
from bus.records import (
    CandidateRecord,
    CellRecord,
    Champion,
    EpisodeRecord,
    JobRecord,
    LeaseRecord,
    QueueRecord,
    SmokeRecord,
    TimelineRecord,
)
from enpire import leaderboard
from enpire.config import Config
from enpire.episodes import write_trajectory
from enpire.metrics import Utilization, better_with_confidence, utilization, wilson_interval
from enpire.seal import refuse_report


@dataclass
class Episode:
    episode_id: str
    job_id: str
    kind: JobKind
    task: str
    seed: int
    attempts: int
    policy: PolicySpec
    priority: int
    agent: str


@dataclass
class Job:
    record: JobRecord
    episode_ids: list[str]
    results: dict[str, EpisodeRecord] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def complete(self) -> bool:
        return all(e in self.results for e in self.episode_ids)


@dataclass
class LeaseState:
    episode: Episode
    cell_id: str
    expires: float


@dataclass
class CellState:
    record: CellRecord
    segments: list[Segment] = field(default_factory=list)
    last_heartbeat: float = 0.0


class PolicyLoader:
    """Reads a policy's files (path -> exact bytes) for a cell. The daemon gives the workspace's reader here."""

    def __init__(self, read_files):
        self._read = read_files
        self._cache: dict[str, dict[str, bytes]] = {}

    def bundle(self, spec: PolicySpec) -> PolicyBundle:
        files = self._cache.get(spec.commit)
        if files is None:
            files = self._cache[spec.commit] = self._read(spec.commit)
        return PolicyBundle(spec=spec, files=files)


class Scheduler(Actor):
    name = "scheduler"
    concurrent_handlers = True  # lease requests long-poll; agents wait for their jobs

    def __init__(self, config: Config, board: Blackboard, policies: PolicyLoader, state_dir: Path, run_id: str,
                 set_main=None, baseline: PolicySpec | None = None, verdict_key: bytes | None = None):
        """`set_main(commit)` points the workspace's main branch at the champion (promotion, rollback);
        `baseline` is the policy the team starts from, judged by idle cells while there is no champion;
        `verdict_key`: the verifier's signing key (every recorded verdict must be signed with it)."""
        super().__init__()
        self.verdict_key = verdict_key
        self.lapsed: OrderedDict[str, tuple[str, str]] = OrderedDict()  # lease id -> (cell, episode) once re-queued
        self.baseline = baseline
        self.set_main = set_main or (lambda commit: None)
        self.config = config
        self.board = board
        self.policies = policies
        self.state_dir = state_dir
        self.run_id = run_id
        self.jobs: dict[str, Job] = {}
        self.pending: dict[str, deque[Episode]] = {}  # per agent (or "judge"), served fairly
        self.leases: dict[str, LeaseState] = {}
        self.cells: dict[str, CellState] = {}
        self.served: dict[str, int] = {}  # episodes leased per agent, for fair share
        self._work = trio.Event()
        self.started = time.time()
        self.smoke: dict[str, SmokeRecord] = {}  # by policy ref
        self.committed: dict[str, int] = {}  # episodes accepted per agent, for the episode budget
        self.promotions: dict[str, str] = {}  # policy ref -> its judging job

    # ------------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        """Rebuild the queue from the blackboard: unfinished jobs, minus episodes already recorded."""
        self.jobs.clear()
        self.pending.clear()
        self.leases.clear()
        self.smoke = {r.policy.ref: r for r in self.board.values("smoke", SmokeRecord)}
        self.committed.clear()
        self.promotions.clear()
        for _, record in self.board.items("jobs", JobRecord):
            if record.kind == "agent" and record.purpose == "eval":
                self.committed[record.agent] = self.committed.get(record.agent, 0) + len(record.seeds)
            if record.purpose == "promote":
                self.promotions.setdefault(record.policy.ref, record.job_id)
            if record.done:
                continue
            self._add_job(record, persist=False)
        requeued = sum(len(q) for q in self.pending.values())
        if requeued:
            self.log.info("queue_restored", jobs=len(self.jobs), episodes=requeued)

    async def main(self) -> None:
        published = None
        while True:
            await trio.sleep(0.25)
            now = time.time()
            self._expire(now)
            queue = (sum(len(q) for k, q in self.pending.items() if k != "background"),
                     sum(c.record.state != "offline" for c in self.cells.values()))
            if queue != published:  # agents pace their turns by this (enpire/agents/llm.py)
                self.board.put("meta", "queue", QueueRecord(*queue, now))
                published = queue

    # ------------------------------------------------------------------ messages

    async def handle(self, msg: Message) -> Message:
        match msg:
            case LeaseRequest():
                return await self._lease(msg)
            case EpisodeReport():
                return await self._report(msg)
            case Heartbeat():
                return self._heartbeat(msg)
            case Hello():
                return self._hello(msg)
            case EvalRequest():
                return await self._eval(msg)
            case PromoteRequest():
                return await self._promote(msg)
        return Failure(error=f"scheduler does not handle {type(msg).__name__}")

    def _hello(self, msg: Hello) -> Welcome:
        now = time.time()
        previous = self.cells.get(msg.cell_id)
        known = self.board.get("cells", msg.cell_id, CellRecord)
        # A restarted cell (or daemon) keeps the cell's MRU window: downtime counts as not running.
        joined = known.joined if known is not None else now
        record = CellRecord(msg.cell_id, msg.driver, msg.host, msg.pid, joined=joined, last_seen=now, real=msg.real)
        if previous is not None:
            self._release_cell(msg.cell_id, "cell restarted")
        segments = previous.segments if previous else self._stored_segments(msg.cell_id)
        self.cells[msg.cell_id] = CellState(record, segments, now)
        self.board.put("cells", msg.cell_id, record)
        self.log.info("cell_joined", cell=msg.cell_id, host=msg.host, pid=msg.pid, driver=msg.driver)
        return Welcome(run_id=self.run_id, heartbeat_s=self.config.scheduler.heartbeat_s)

    def _heartbeat(self, msg: Heartbeat) -> Message:
        cell = self.cells.get(msg.cell_id)
        if cell is None:
            return Failure(error=f"unknown cell {msg.cell_id!r}: say Hello first", retry=False)
        cell.last_heartbeat = cell.record.last_seen = time.time()
        cell.record.state = msg.state
        self._add_segments(msg.cell_id, msg.segments)
        return Ack()

    async def _lease(self, msg: LeaseRequest) -> Message:
        cell = self.cells.get(msg.cell_id)
        if cell is None:
            return Failure(error=f"unknown cell {msg.cell_id!r}: say Hello first", retry=False)
        with trio.move_on_after(min(msg.wait_s, 10.0)):
            while True:
                episode = self._next_episode(real=cell.record.real, cell_id=msg.cell_id)
                if episode is not None:
                    return self._grant(episode, msg.cell_id)
                await self._work.wait()
        return NoWork(retry_after_s=0.0)

    def _grant(self, episode: Episode, cell_id: str) -> Lease:
        task = self.config.task(episode.task)
        lease_id = uuid.uuid4().hex[:12]
        now = time.time()
        self.leases[lease_id] = LeaseState(episode, cell_id, now + self.config.scheduler.lease_s)
        self.board.put("leases", lease_id, LeaseRecord(lease_id, episode.episode_id, episode.job_id, cell_id, now))
        if episode.kind == "agent":  # judging and confirmation are for the team: not charged to one agent's share
            self.served[episode.agent] = self.served.get(episode.agent, 0) + 1
        return Lease(
            lease_id=lease_id,
            episode_id=episode.episode_id,
            job_id=episode.job_id,
            kind=episode.kind,
            task=episode.task,
            seed=episode.seed,
            attempts=episode.attempts,
            policy=self.policies.bundle(episode.policy),
            deadline_s=self.config.scheduler.lease_s,
            horizon=task.horizon,
            max_delta=task.limits.max_delta,
            verifier=task.verifier,
            observation=task.observation,
            control_hz=task.control_hz,
            joints=task.limits.joints,
        )

    async def _report(self, msg: EpisodeReport) -> Message:
        lease = self.leases.get(msg.lease_id)
        job_id = lease.episode.job_id if lease else msg.episode_id.rsplit(":", 1)[0]
        job = self.jobs.get(job_id)
        self._add_segments(msg.cell_id, msg.segments)
        episode = lease.episode if lease else self._find_episode(job, msg.episode_id)
        if job is not None and msg.episode_id in job.results:
            return Ack(detail="duplicate episode; ignored")
        # A lease that lapsed (its cell was late) still lets that cell report, until the episode is recorded.
        held = (lease.cell_id, lease.episode.episode_id) if lease else self.lapsed.get(msg.lease_id)
        real = (cell := self.cells.get(msg.cell_id)) is not None and cell.record.real  # a person may judge
        if (why := refuse_report(msg, held, self.verdict_key, real)):
            self.log.warning("report_refused", cell=msg.cell_id, lease=msg.lease_id, episode=msg.episode_id, why=why)
            return Failure(error=f"report refused: {why}", retry=False)
        self.leases.pop(msg.lease_id, None)  # held by this cell, for this episode (refuse_report checked)
        if job is None or episode is None:
            return Ack(detail="unknown episode; ignored")
        # A re-leased copy of this episode may still be queued or running: drop it, this result wins.
        for queue in self.pending.values():
            for queued in [e for e in queue if e.episode_id == msg.episode_id]:
                queue.remove(queued)
        for lease_id in [k for k, v in self.leases.items() if v.episode.episode_id == msg.episode_id]:
            del self.leases[lease_id]

        trajectory_file = ""
        if msg.trajectory is not None and self.config.task(episode.task).record_trajectories:
            trajectory_file = await trio.to_thread.run_sync(self._write_trajectory, msg)
        record = EpisodeRecord(
            episode_id=msg.episode_id,
            job_id=job_id,
            kind=episode.kind,
            task=episode.task,
            seed=episode.seed,
            policy=episode.policy,
            cell_id=msg.cell_id,
            verdict=msg.verdict,
            success_at_k=any(a.verdict.success for a in msg.attempts) or msg.verdict.success,
            attempts=len(msg.attempts),
            steps=msg.steps,
            reset_s=msg.reset_s,
            run_s=msg.run_s,
            verify_s=msg.verify_s,
            finished=time.time(),
            trajectory_file=trajectory_file,
            flagged=msg.flagged,
        )
        with self.board.write() as w:
            if not w.put("episodes", msg.episode_id, record, overwrite=False):
                return Ack(detail="already recorded")
            w.incr("episodes")
            if msg.flagged:
                w.incr("episodes_flagged")
        job.results[msg.episode_id] = record
        if msg.flagged:  # e.g. success at reset: the seed says nothing about the policy; use another
            self._replace(job, episode)
        self._job_progress(job)
        return Ack()

    # ------------------------------------------------------------------ jobs

    async def _eval(self, msg: EvalRequest) -> Message:
        task = self.config.tasks.get(msg.task)
        if task is None:
            return Failure(error=f"unknown task {msg.task!r}")
        heldout = task.heldout_seeds.seeds()
        if any(s in heldout for s in msg.seeds):
            return Failure(error="held-out seeds are reserved for judging; evaluate on tuning seeds")
        if not msg.seeds:
            return Failure(error="an evaluation needs at least one seed")
        job = self.jobs.get(msg.job_id) or self._job_from_board(msg.job_id)
        if job is None:
            budget = self.config.agents.episode_budget
            spent = self.committed.get(msg.agent, 0)
            if budget and spent + len(msg.seeds) > budget:
                return Failure(error=f"episode budget exhausted: {spent} of {budget} used, {len(msg.seeds)} asked")
            self.committed[msg.agent] = spent + len(msg.seeds)
            record = JobRecord(
                msg.job_id, msg.agent, "agent", msg.task, msg.policy, list(msg.seeds),
                msg.attempts, msg.priority, time.time(),
            )
            with self.board.write() as w:  # teammates see what is being measured right now
                candidate = self._candidate(w, record)
                if candidate.n:  # more evidence on a measured candidate is on the way to a promotion: first
                    record.priority += 1
                candidate.pending += len(record.seeds)
                w.put("candidates", _candidate_key(record), candidate)
            job = self._add_job(record)
        await job.done.wait()
        return self._eval_result(job)

    async def _promote(self, msg: PromoteRequest) -> Message:
        task = self.config.tasks.get(msg.task)
        if task is None:
            return Failure(error=f"unknown task {msg.task!r}")
        # One judging per candidate: teammates who ask for the same one wait for that verdict.
        job_id = self.promotions.get(msg.policy.ref, msg.job_id)
        job = self.jobs.get(job_id) or self._job_from_board(job_id)
        if job is None:
            seeds = list(task.heldout_seeds.seeds()[: self.config.scheduler.promote_seeds])
            record = JobRecord(
                msg.job_id, msg.agent, "heldout", msg.task, msg.policy, seeds, 1, 100, time.time(), purpose="promote"
            )
            self.promotions[msg.policy.ref] = msg.job_id
            self._mark(record, "judging")
            job = self._add_job(record)
        await job.done.wait()
        return self._judge(job)

    def _judge(self, job: Job) -> PromoteResult:
        """Decide promotion once, when the held-out judging job completes; idempotent afterwards."""
        counted = [r for r in job.results.values() if not r.flagged]
        s, n = sum(r.verdict.success for r in counted), len(counted)
        task = job.record.task
        champion = self.board.get("champion", task, Champion)
        cs, cn = (champion.judged_successes, champion.judged_n) if champion else (0, 0)
        if champion and champion.policy == job.record.policy:
            promoted, detail = True, "already the champion"
        elif better_with_confidence(s, n, cs, cn, self.config.scheduler.alpha):
            promoted, detail = True, f"{s}/{n} beats {cs}/{cn} (one-sided z-test, alpha {self.config.scheduler.alpha})"
            new = Champion(task, job.record.policy, judged_successes=s, judged_n=n, promoted=time.time(),
                           agent=job.record.agent, confirm_next=self.config.scheduler.promote_seeds,
                           previous=champion.policy if champion else None,
                           previous_successes=champion.successes if champion else 0,
                           previous_n=champion.n if champion else 0)
            if not self.config.scheduler.pooled:
                self._confirm_on_own_cell(new)
            self.board.put("champion", task, new)
            self.set_main(job.record.policy.commit)
            self.log.info("champion_promoted", task=task, policy=job.record.policy.ref, successes=s, n=n,
                          previous=champion.policy.ref if champion else "")
            self._work.set()
        else:
            promoted, detail = False, f"{s}/{n} is not better than {cs}/{cn} with confidence"
        self._mark(job.record, "promoted" if promoted else "rejected")
        return PromoteResult(
            job_id=job.record.job_id, policy=job.record.policy, promoted=promoted, successes=s, n=n,
            champion_successes=cs, champion_n=cn, detail=detail,
        )

    def _add_job(self, record: JobRecord, persist: bool = True) -> Job:
        ids = [f"{record.job_id}:{i}" for i in range(len(record.seeds))]
        job = Job(record, ids)
        if persist:
            self.board.put("jobs", record.job_id, record)
        else:  # resuming: results recorded before the restart count
            for eid in ids:
                done = self.board.get("episodes", eid, EpisodeRecord)
                if done is not None:
                    job.results[eid] = done
        self.jobs[record.job_id] = job
        queue = self.pending.setdefault(_queue_key(record.kind, record.agent), deque())
        # Within a queue, higher priority first, then in order of arrival.
        at = next((i for i, e in enumerate(queue) if e.priority < record.priority), len(queue))
        for eid, seed in reversed(list(zip(ids, record.seeds, strict=True))):
            if eid not in job.results:
                queue.insert(at, self._episode(record, eid, seed))
        self._job_progress(job)
        self._work.set()
        return job

    def _job_from_board(self, job_id: str) -> Job | None:
        record = self.board.get("jobs", job_id, JobRecord)
        if record is None:
            return None
        job = Job(record, [f"{job_id}:{i}" for i in range(len(record.seeds))])
        for eid in job.episode_ids:
            done = self.board.get("episodes", eid, EpisodeRecord)
            if done is not None:
                job.results[eid] = done
        self.jobs[job_id] = job
        job.done.set()
        return job

    def _episode(self, record: JobRecord, episode_id: str, seed: int) -> Episode:
        return Episode(episode_id, record.job_id, record.kind, record.task, seed, record.attempts, record.policy,
                       record.priority, record.agent)

    def _replace(self, job: Job, episode: Episode) -> None:
        task = self.config.task(episode.task)
        pool = task.heldout_seeds if episode.kind != "agent" else task.tuning_seeds
        seed = pool.start + (episode.seed - pool.start + 7919) % pool.count
        # Numbered by the flagged results so far (this one included): unique however many are replaced.
        eid = f"{job.record.job_id}:r{sum(1 for r in job.results.values() if r.flagged)}"
        job.episode_ids.append(eid)
        job.episode_ids.remove(episode.episode_id)
        replacement = Episode(eid, episode.job_id, episode.kind, episode.task, seed, episode.attempts,
                              episode.policy, episode.priority, episode.agent)
        self.pending.setdefault(_queue_key(episode.kind, episode.agent), deque()).appendleft(replacement)
        self._work.set()

    def _job_progress(self, job: Job) -> None:
        if job.complete and not job.done.is_set():
            job.record.done = True
            with self.board.write() as w:  # one transaction: a crash leaves both or neither
                w.put("jobs", job.record.job_id, job.record)
                if job.record.purpose == "confirm":
                    self._confirmed(w, job)
                elif job.record.purpose == "baseline":
                    self._baseline_judged(w, job)
                elif job.record.purpose == "eval" and job.record.kind == "agent":
                    self._tally(w, job)
            job.done.set()
            if job.record.purpose in ("confirm", "baseline"):
                del self.jobs[job.record.job_id]  # nobody waits on these
                self._work.set()
            elif job.record.purpose == "smoke":
                self._smoke_result(job)

    def _eval_result(self, job: Job) -> EvalResult:
        episodes = [
            EpisodeSummary(
                episode_id=r.episode_id, seed=r.seed, success=r.verdict.success, success_at_k=r.success_at_k,
                score=r.verdict.score, reason=r.verdict.reason, steps=r.steps,
            )
            for eid in job.episode_ids
            if (r := job.results.get(eid)) is not None and not r.flagged
        ]
        return EvalResult(job_id=job.record.job_id, policy=job.record.policy, task=job.record.task, episodes=episodes)

    # ------------------------------------------------------------------ the team's leaderboard

    def _candidate(self, w, record: JobRecord) -> CandidateRecord:
        return w.get("candidates", _candidate_key(record), CandidateRecord) or CandidateRecord(
            record.task, record.policy, record.agent, t=time.time())

    def _tally(self, w, job: Job) -> None:
        """Add a finished evaluation to its candidate's record (in the job's own transaction)."""
        counted = [r for eid in job.episode_ids if (r := job.results.get(eid)) is not None and not r.flagged]
        candidate = leaderboard.add(self._candidate(w, job.record),
                                    [(r.verdict.success, r.verdict.score, r.steps) for r in counted],
                                    len(job.record.seeds), time.time())
        w.put("candidates", _candidate_key(job.record), candidate)

    def _mark(self, record: JobRecord, judged: str) -> None:
        with self.board.write() as w:
            candidate = w.get("candidates", _candidate_key(record), CandidateRecord)
            if candidate is not None and candidate.judged != judged:
                candidate.judged = judged
                w.put("candidates", _candidate_key(record), candidate)

    # ------------------------------------------------------------------ background work

    def _background(self) -> Episode | None:
        """Work for otherwise idle cells: judging the starting policy while there is no champion, then
        more held-out episodes for the champion, beyond the seeds it was judged on."""
        if not self.config.scheduler.background:
            return None
        self._queue_background()
        queue = self.pending["background"]
        return queue.popleft() if queue else None

    def _decisive(self) -> bool:
        """The champion's judging does not rule out the target (Wilson upper bound) and its confirmation, which
        may end the run, is not complete: that confirmation goes before agents' queued experiments."""
        c = self.board.get("champion", self.config.cells.task, Champion)
        return (c is not None and self.config.scheduler.background and c.judged_n > 0
                and wilson_interval(c.judged_successes, c.judged_n)[1] >= self.config.fleet.target
                and c.n < self.config.fleet.min_heldout)

    def _queue_background(self) -> None:
        task_name = self.config.cells.task
        champion = self.board.get("champion", task_name, Champion)
        heldout = self.config.task(task_name).heldout_seeds.seeds()
        queue = self.pending.setdefault("background", deque())
        baseline = f"baseline-{self.baseline.ref}" if self.baseline else ""
        if champion is None:
            if baseline and baseline not in self.jobs and self.board.get("jobs", baseline, JobRecord) is None:
                seeds = list(heldout[: self.config.scheduler.promote_seeds])
                self._add_job(JobRecord(baseline, "baseline", "background", task_name, self.baseline, seeds, 1, -1,
                                        time.time(), purpose="baseline"))
            return
        if baseline in self.jobs:  # a promotion came first: the baseline no longer sets the bar
            job = self.jobs.pop(baseline)
            job.record.done = True
            self.board.put("jobs", baseline, job.record)
            self.pending["background"] = queue = deque(e for e in queue if e.job_id != baseline)
        if queue or champion.confirm_next >= len(heldout):
            return
        seed = heldout[champion.confirm_next]
        job_id = f"confirm-{champion.policy.ref}-{seed}"
        record = JobRecord(job_id, champion.agent, "background", task_name, champion.policy, [seed], 1, -1,
                           time.time(), purpose="confirm")
        champion.confirm_next += 1
        with self.board.write() as w:
            w.put("champion", task_name, champion)
        self._add_job(record)

    def _confirm_on_own_cell(self, champion: Champion) -> None:
        """Unpooled fleets have no background work: the promoting agent's own robot runs the champion's
        confirmation (the held-out episodes the target counts), as part of its promotion."""
        heldout = self.config.task(champion.task).heldout_seeds.seeds()
        seeds = list(heldout[champion.confirm_next: champion.confirm_next + self.config.fleet.min_heldout])
        if seeds:
            champion.confirm_next += len(seeds)
            self._add_job(JobRecord(f"confirm-{champion.policy.ref}-{seeds[0]}", champion.agent, "heldout",
                                    champion.task, champion.policy, seeds, 1, 100, time.time(), purpose="confirm"))

    def _baseline_judged(self, w, job: Job) -> None:
        if w.get("champion", job.record.task, Champion) is not None:
            return  # a promotion came first; the baseline's episodes stay recorded
        counted = [r for r in job.results.values() if not r.flagged]
        w.put("champion", job.record.task, Champion(
            job.record.task, job.record.policy, judged_successes=sum(r.verdict.success for r in counted),
            judged_n=len(counted), promoted=time.time(), agent="baseline", confirm_next=len(job.record.seeds)))
        self.log.info("baseline_judged", policy=job.record.policy.ref,
                      judged=f"{sum(r.verdict.success for r in counted)}/{len(counted)}")

    def _confirmed(self, w, job: Job) -> None:
        champion = w.get("champion", job.record.task, Champion)
        if champion is None or champion.policy != job.record.policy:
            return  # the champion changed while this ran: the episode stays recorded, not counted
        for r in job.results.values():
            if not r.flagged:
                champion.successes += r.verdict.success
                champion.n += 1
        if self._regressed(champion):
            previous = champion.previous
            self.log.warning("champion_rolled_back", task=champion.task, policy=champion.policy.ref,
                             confirmed=f"{champion.successes}/{champion.n}", back_to=previous.ref,
                             previous=f"{champion.previous_successes}/{champion.previous_n}")
            champion = Champion(champion.task, previous, judged_successes=champion.previous_successes,
                                judged_n=champion.previous_n, promoted=time.time(), agent="rollback",
                                successes=champion.previous_successes, n=champion.previous_n,
                                confirm_next=champion.confirm_next)
            self.set_main(previous.commit)
        w.put("champion", job.record.task, champion)

    def _regressed(self, c: Champion) -> bool:
        """Confirmation shows the new champion worse than the one it replaced, with confidence."""
        return (c.previous is not None and c.n >= self.config.scheduler.rollback_min_n
                and better_with_confidence(c.previous_successes, c.previous_n, c.successes, c.n,
                                           self.config.scheduler.alpha))

    # ------------------------------------------------------------------ queue

    def _next_episode(self, real: bool = False, cell_id: str = "") -> Episode | None:
        if not self.config.scheduler.pooled:
            return self._owned_episode(cell_id)
        if self._decisive() and (episode := self._background()) is not None:
            if not real or self._smoke_passed(episode.policy):
                return episode
            self.pending["background"].appendleft(episode)
        # Judging first, then agents: highest priority, then the agent served least so far (fair share).
        agents = sorted((a for a, q in self.pending.items() if q and a not in ("judge", "background")),
                        key=lambda a: (-self.pending[a][0].priority, self.served.get(a, 0)))
        for key in ["judge", *agents]:
            queue = self.pending.get(key)
            if not queue:
                continue
            if not real:
                return queue.popleft()
            for episode in queue:  # a real robot runs only what passed its simulated smoke test
                if self._smoke_passed(episode.policy):
                    queue.remove(episode)
                    return episode
        self._work = trio.Event() if self._work.is_set() else self._work
        episode = self._background()
        if episode is not None and real and not self._smoke_passed(episode.policy):
            self.pending["background"].appendleft(episode)  # no wake-up: nothing new to run
            return None
        return episode

    def _owned_episode(self, cell_id: str) -> Episode | None:
        """Unpooled (`[scheduler] pooled = false`, the paper's set-up): cell-i runs only agent-i's episodes
        (its evaluations and the judging of its candidates) and no background work."""
        owner = "agent-" + cell_id.rsplit("-", 1)[-1]
        for key in ("judge", owner):
            queue = self.pending.get(key)
            for episode in queue or ():
                if episode.agent == owner:
                    queue.remove(episode)
                    return episode
        self._work = trio.Event() if self._work.is_set() else self._work
        return None

    def _smoke_passed(self, policy: PolicySpec) -> bool:
        """True once the policy passed its smoke evaluation; queues that evaluation (on sim cells) if needed."""
        record = self.smoke.get(policy.ref)
        if record is not None:
            return record.passed
        job_id = f"smoke-{policy.ref}"
        if job_id not in self.jobs:
            task = self.config.task()
            seeds = list(task.tuning_seeds.seeds()[: self.config.scheduler.smoke_seeds])
            self._add_job(JobRecord(job_id, "smoke", "agent", self.config.cells.task, policy, seeds, 1, 50,
                                    time.time(), purpose="smoke"))
        return False

    def _smoke_result(self, job: Job) -> None:
        results = list(job.results.values())
        faults = [r.verdict.reason for r in results if r.verdict.reason.startswith(
            ("safety_violation", "policy_", "sandbox_denied", "output_too_large", "cpu_limit", "memory_limit"))]
        wins = sum(r.verdict.success for r in results)
        passed = not faults and wins > 0
        detail = f"{wins}/{len(results)} succeeded" + (f"; faults: {faults[:3]}" if faults else "")
        record = SmokeRecord(job.record.policy, passed, detail, time.time())
        self.smoke[job.record.policy.ref] = record
        self.board.put("smoke", job.record.policy.ref, record)
        self.log.info("smoke_tested", policy=job.record.policy.ref, passed=passed, detail=detail)
        self._work.set()

    def _requeue_episode(self, episode: Episode) -> None:
        self.pending.setdefault(_queue_key(episode.kind, episode.agent), deque()).appendleft(episode)
        self._work.set()

    def _requeue(self, lease_id: str, why: str) -> None:
        state = self.leases.pop(lease_id)
        self.lapsed[lease_id] = (state.cell_id, state.episode.episode_id)
        while len(self.lapsed) > 100_000:
            self.lapsed.popitem(last=False)
        episode = state.episode
        job = self.jobs.get(episode.job_id)
        if job is None or episode.episode_id in job.results:
            return
        self._requeue_episode(episode)
        self.board.incr("episodes_requeued")
        self.log.warning("lease_requeued", episode=episode.episode_id, cell=state.cell_id, why=why)

    def _release_cell(self, cell_id: str, why: str) -> None:
        for lease_id in [k for k, v in self.leases.items() if v.cell_id == cell_id]:
            self._requeue(lease_id, why)

    def _expire(self, now: float) -> None:
        for lease_id, state in list(self.leases.items()):
            if state.expires < now:
                self._requeue(lease_id, "lease expired")
        silent = 4 * self.config.scheduler.heartbeat_s + 1.0
        for cell_id, cell in self.cells.items():
            if cell.record.state != "offline" and now - cell.last_heartbeat > silent:
                cell.record.state = "offline"
                self.board.put("cells", cell_id, cell.record)
                self.log.warning("cell_silent", cell=cell_id, silent_s=round(now - cell.last_heartbeat, 1))
                self._release_cell(cell_id, "cell stopped heartbeating")

    def _find_episode(self, job: Job | None, episode_id: str) -> Episode | None:
        """A late report whose lease expired: the episode is queued again or leased to another cell."""
        if job is None:
            return None
        candidates = itertools.chain(*self.pending.values(), (s.episode for s in self.leases.values()))
        return next((e for e in candidates if e.episode_id == episode_id), None)

    # ------------------------------------------------------------------ records

    def _add_segments(self, cell_id: str, segments: list[Segment]) -> None:
        cell = self.cells.get(cell_id)
        if cell is None or not segments:
            return
        # A cell's segments are consecutive in its clock; one that starts before the last recorded end
        # was already delivered (a retried heartbeat), so time is never counted twice.
        last = cell.segments[-1].end if cell.segments else float("-inf")
        fresh = [s for s in segments if s.start >= last - 1e-9]
        if fresh:
            cell.segments.extend(fresh)
            self.board.append("timeline", TimelineRecord(cell_id, fresh))

    def _stored_segments(self, cell_id: str) -> list[Segment]:
        return [seg for rec in self.board.values("timeline", TimelineRecord) if rec.cell_id == cell_id
                for seg in rec.segments]

    def _write_trajectory(self, msg: EpisodeReport) -> str:
        rel = Path("episodes") / (msg.episode_id.replace(":", "_").replace("/", "_") + ".npz")
        t = msg.trajectory
        write_trajectory(self.state_dir / rel, t.observations.numpy(), t.actions.numpy(), t.rewards.numpy(),
                         t.frames.numpy() if t.frames is not None else None)
        return str(rel)

    # ------------------------------------------------------------------ status

    def utilization(self, now: float | None = None) -> dict[str, Utilization]:
        now = now or time.time()
        return {
            cid: utilization(c.segments, (c.record.last_seen if c.record.state == "offline" else now) - c.record.joined)
            for cid, c in self.cells.items()
        }


def _candidate_key(record: JobRecord) -> str:
    return f"{record.task}/{record.policy.ref}"


def _queue_key(kind: JobKind, agent: str) -> str:
    """Held-out judging first, agents' own queues next, background work last."""
    return {"heldout": "judge", "background": "background"}.get(kind, agent)
