"""The lease queue's bookkeeping (actors/lease_queue.py): jobs, episodes, the waiting lanes, leases and
cells as data, and the records they become on the blackboard. No actor here: the queue holds these."""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bus.blackboard import Blackboard, Txn
from bus.messages import EpisodeReport, EpisodeSummary, JobDone, JobSpec, Lease, Purpose, Segment
from bus.records import CellRecord, EpisodeRecord, JobRecord, SmokeRecord, TimelineRecord
from enpire.config import Config
from enpire.episodes import write_trajectory
from enpire.metrics import Utilization, cell_window_s, utilization


def counted(r: EpisodeRecord) -> bool:
    """Whether a recorded result counts for its job. An agent's flagged episode does not: its work runs on
    another seed (`replacement`). Held-out work keeps a flagged episode the policy acted in (an e-stop, an
    operator who did not answer after its steps) as the failure it was recorded as: a halt may be the
    policy's doing, and leaving it out could only flatter the rate. Left out: what says nothing of the
    policy, an episode held before it acted (no reset, a robot fault: no step recorded), a seed the
    verifier signed as solved at reset, and a dry run (no robot moved)."""
    if not r.flagged:
        return True
    return r.kind != "agent" and r.steps > 0 and not (r.flagged == "dry_run" or r.verdict.success)


@dataclass
class Episode:
    episode_id: str
    spec: JobSpec
    seed: int
    bundle: str  # content hash of the policy's files


@dataclass
class Job:
    spec: JobSpec
    episode_ids: list[str]
    results: dict[str, EpisodeRecord] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    cancelled: bool = False

    @property
    def complete(self) -> bool:
        return all(e in self.results for e in self.episode_ids)

    def reply(self) -> JobDone:
        return JobDone(job_id=self.spec.job_id, cancelled=self.cancelled, episodes=[
            EpisodeSummary(episode_id=r.episode_id, seed=r.seed, success=r.verdict.success,
                           success_at_k=r.success_at_k, score=r.verdict.score, reason=r.verdict.reason, steps=r.steps)
            for eid in self.episode_ids if (r := self.results.get(eid)) is not None and counted(r)])

    def record(self) -> JobRecord:
        """The finished job's record (a cancelled one says so: its missing episodes are not lost)."""
        s = self.spec
        return JobRecord(s.job_id, s.agent, s.kind, s.task, s.policy, list(s.seeds), s.attempts, s.priority,
                         time.time(), done=True, purpose=s.purpose, cancelled=self.cancelled)


def spec_of(record: JobRecord) -> JobSpec:
    return JobSpec(job_id=record.job_id, agent=record.agent, task=record.task, policy=record.policy,
                   seeds=list(record.seeds), purpose=record.purpose, attempts=record.attempts, priority=record.priority)


def lane(spec: JobSpec) -> str:
    """Judging shares one lane, each agent has its own, background work has one."""
    return {"heldout": "judge", "background": "background"}.get(spec.kind, spec.agent)


def lane_rank(lane_key: str) -> int:
    """Between lanes whose heads have the same priority: judging, then agents, then background work."""
    return {"judge": 0, "background": 2}.get(lane_key, 1)


class Lanes:
    """Episodes waiting for a cell. The head of the highest-priority lane goes first; between lanes whose
    heads have the same priority, judging, then the agent served least so far (fair share; judging and
    background work are for the team, charged to no one), then background work. Within a lane, higher
    priority first, then in order of arrival."""

    def __init__(self) -> None:
        self.lanes: dict[str, deque[Episode]] = {}
        self.served: dict[str, int] = {}  # agents' episodes leased

    def add(self, episodes: list[Episode]) -> None:
        """A job's episodes, behind the waiting ones of its priority or higher."""
        if not episodes:
            return
        spec = episodes[0].spec
        queue = self.lanes.setdefault(lane(spec), deque())
        at = next((i for i, e in enumerate(queue) if e.spec.priority < spec.priority), len(queue))
        for episode in reversed(episodes):
            queue.insert(at, episode)

    def push_front(self, episode: Episode) -> None:
        """An episode that must run next in its lane (a lapsed lease, a re-seeded flagged episode): before
        the waiting ones of its priority, behind those of higher priority (a lapsed judging episode at the
        head of the judge's lane would rank the final judging behind it at its lower priority)."""
        queue = self.lanes.setdefault(lane(episode.spec), deque())
        queue.insert(next((i for i, e in enumerate(queue) if e.spec.priority <= episode.spec.priority), len(queue)),
                     episode)

    def take(self, fits: Callable[[Episode], bool]) -> Episode | None:
        """The first waiting episode, in the order above, that `fits` the asking cell."""
        keys = sorted((k for k, q in self.lanes.items() if q),
                      key=lambda k: (-self.lanes[k][0].spec.priority, lane_rank(k), self.served.get(k, 0)))
        for key in keys:
            queue = self.lanes[key]
            for episode in queue:
                if fits(episode):
                    queue.remove(episode)
                    if episode.spec.kind == "agent":
                        self.served[episode.spec.agent] = self.served.get(episode.spec.agent, 0) + 1
                    return episode
        return None

    def discard(self, episode_id: str) -> None:
        """Drop every queued copy of an episode (its result is in)."""
        for queue in self.lanes.values():
            for queued in [e for e in queue if e.episode_id == episode_id]:
                queue.remove(queued)

    def cancel(self, spec: JobSpec) -> None:
        key = lane(spec)
        self.lanes[key] = deque(e for e in self.lanes.get(key, ()) if e.spec.job_id != spec.job_id)

    def find(self, episode_id: str) -> Episode | None:
        return next((e for q in self.lanes.values() for e in q if e.episode_id == episode_id), None)

    def depth(self) -> tuple[int, int]:
        """(agents' and judging episodes waiting, background episodes waiting)."""
        return (sum(len(q) for k, q in self.lanes.items() if k != "background"),
                len(self.lanes.get("background", ())))

    def __len__(self) -> int:
        return sum(len(q) for q in self.lanes.values())


def replacement(job: Job, episode: Episode, pool_start: int, pool_count: int) -> Episode:
    """A flagged episode (solved at reset) of an agent's evaluation gets another tuning seed, numbered by
    the flagged results so far (this one included): unique however many are replaced."""
    seed = pool_start + (episode.seed - pool_start + 7919) % pool_count
    eid = f"{job.spec.job_id}:r{sum(1 for r in job.results.values() if r.flagged)}"
    job.episode_ids.remove(episode.episode_id)
    job.episode_ids.append(eid)
    return Episode(eid, job.spec, seed, episode.bundle)


def restore(spec: JobSpec, done: dict[str, EpisodeRecord], bundle: str, pool_start: int,
            pool_count: int) -> tuple[Job, list[Episode]]:
    """A job as a restart finds it (`done`: its recorded episodes): its results, and the episodes still to
    run. Flagged episodes of an agent's job are replaced again in the order they were recorded, so the
    replacements get the ids and seeds they had ("JOB:rK"): recorded ones count, missing ones run."""
    ids = [f"{spec.job_id}:{i}" for i in range(len(spec.seeds))]
    episodes = {eid: Episode(eid, spec, seed, bundle) for eid, seed in zip(ids, spec.seeds, strict=True)}
    job = Job(spec, ids)
    for record in sorted((r for r in done.values() if r.job_id == spec.job_id), key=lambda r: r.finished):
        if record.episode_id not in job.episode_ids:
            continue  # a replacement no flag of this replay asked for (the order of two flags was a tie)
        job.results[record.episode_id] = record
        if record.flagged and spec.kind == "agent":
            new = replacement(job, episodes[record.episode_id], pool_start, pool_count)
            episodes[new.episode_id] = new
    return job, [episodes[eid] for eid in job.episode_ids if eid not in job.results]


@dataclass
class LeaseState:
    episode: Episode
    cell_id: str
    expires: float


class LeaseBook:
    """Leases held by cells, each with a deadline, and the ones that lapsed (kept a while, bounded): a
    cell that reports late on a lapsed lease of its own is still heard."""

    def __init__(self, remember: int = 100_000) -> None:
        self.held: dict[str, LeaseState] = {}
        self.lapsed: OrderedDict[str, tuple[str, str]] = OrderedDict()  # lease id -> (cell, episode)
        self.remember = remember

    def holder(self, lease_id: str) -> tuple[str, str] | None:
        """(cell, episode id) the lease was granted for, held or lapsed; None for a lease never granted."""
        state = self.held.get(lease_id)
        return (state.cell_id, state.episode.episode_id) if state else self.lapsed.get(lease_id)

    def lapse(self, lease_id: str) -> LeaseState:
        state = self.held.pop(lease_id)
        self.lapsed[lease_id] = (state.cell_id, state.episode.episode_id)
        while len(self.lapsed) > self.remember:
            self.lapsed.popitem(last=False)
        return state

    def of_cell(self, cell_id: str) -> list[str]:
        return [k for k, v in self.held.items() if v.cell_id == cell_id]

    def expired(self, now: float) -> list[str]:
        return [k for k, v in self.held.items() if v.expires < now]

    def episode(self, episode_id: str) -> Episode | None:
        return next((s.episode for s in self.held.values() if s.episode.episode_id == episode_id), None)

    def end(self, episode_id: str) -> None:
        """The episode's result is in: no lease of it is held any more (a re-leased copy included)."""
        for lease_id in [k for k, v in self.held.items() if v.episode.episode_id == episode_id]:
            del self.held[lease_id]


# An agent's own work, which unpooled fleets run only on that agent's cell; smoke tests, the final
# judging and the confirmation of a champion no agent promoted (the baseline, one rolled back to) are
# the run's and go to any cell that may run them.
AGENTS_OWN = frozenset({Purpose.EVAL, Purpose.PROMOTE, Purpose.CONFIRM})
AGENT = re.compile(r"agent-\d+")


def eligible(episode: Episode, cell: CellState, config: Config, cleared: dict[str, bool]) -> bool | None:
    """Whether `cell` may run `episode`; None when it may once the policy passed a smoke test."""
    spec = episode.spec
    driver = config.task(spec.task).driver  # a cell names its driver and the driver's tasks
    if driver != cell.record.driver and driver not in cell.tasks:
        return False
    if (not config.scheduler.pooled and spec.purpose in AGENTS_OWN and AGENT.fullmatch(spec.agent)
            and spec.agent != "agent-" + cell.record.cell_id.rsplit("-", 1)[-1]):
        return False  # the paper's set-up: cell-i runs only agent-i's work (the run's own jobs go anywhere)
    if cell.record.real:  # a real robot runs only what passed its simulated smoke test
        return cleared.get(spec.policy.ref)
    return True


def lease_of(lease_id: str, episode: Episode, config: Config) -> Lease:
    """What a cell needs to run the episode: the task's settings and the policy by content hash."""
    spec, task = episode.spec, config.task(episode.spec.task)
    return Lease(
        lease_id=lease_id, episode_id=episode.episode_id, job_id=spec.job_id, kind=spec.kind, task=spec.task,
        seed=episode.seed, attempts=spec.attempts, policy=spec.policy, bundle=episode.bundle,
        deadline_s=config.scheduler.lease_s, horizon=task.horizon, max_delta=task.limits.max_delta,
        verifier=task.verifier, observation=task.observation, control_hz=task.control_hz, joints=task.limits.joints)


@dataclass
class CellState:
    record: CellRecord
    tasks: frozenset[str]
    segments: list[Segment] = field(default_factory=list)
    last_heartbeat: float = 0.0

    def fresh(self, segments: list[Segment]) -> list[Segment]:
        """Keep the segments not seen before and return them. A cell's segments are consecutive in its
        clock; one that starts before the last recorded end was already delivered (a retried heartbeat),
        so time is never counted twice."""
        last = self.segments[-1].end if self.segments else float("-inf")
        new = [s for s in segments if s.start >= last - 1e-9]
        self.segments.extend(new)
        return new

    def utilization(self, now: float) -> Utilization:
        r = self.record
        return utilization(self.segments, cell_window_s(r.joined, r.last_seen, r.state != "offline", now))


def save_cell(w: Txn, cell_id: str, record: CellRecord | None, fresh: list[Segment]) -> None:
    """A cell's live state (`status` reads it here) and the timeline segments it just reported."""
    if record is not None:
        w.put("cells", cell_id, record)
    if fresh:
        w.append("timeline", TimelineRecord(cell_id, fresh))


def stored_segments(board: Blackboard, cell_id: str) -> list[Segment]:
    return [seg for rec in board.values("timeline", TimelineRecord) if rec.cell_id == cell_id for seg in rec.segments]


def unfinished(board: Blackboard) -> tuple[list[JobRecord], dict[str, EpisodeRecord], dict[str, bool]]:
    """Blocking: what a restarted queue resumes: unfinished jobs, their recorded episodes, smoke verdicts."""
    with board.read() as r:
        jobs = [j for _, j in r.items("jobs", JobRecord) if not j.done]
        done = {eid: e for j in jobs for eid, e in r.items("episodes", EpisodeRecord, prefix=f"{j.job_id}:")}
        return jobs, done, {s.policy.ref: s.passed for _, s in r.items("smoke", SmokeRecord)}


def finished(board: Blackboard, record: JobRecord) -> JobDone:
    """Blocking: the reply to a job that finished before (a resubmission after a restart), replacements of
    flagged episodes (ids "JOB:rK") included."""
    ids = [f"{record.job_id}:{i}" for i in range(len(record.seeds))]
    with board.read() as r:
        results = dict(r.items("episodes", EpisodeRecord, prefix=f"{record.job_id}:"))
    return Job(spec_of(record), ids + sorted(results.keys() - set(ids)), results, cancelled=record.cancelled).reply()


def record_episode(board: Blackboard, state_dir: Path, msg: EpisodeReport, episode: Episode, trajectory: bool,
                   fresh: list[Segment]) -> tuple[EpisodeRecord, bool]:
    """Blocking (run it in a worker thread): the trajectory file, then the episode, its counters and the
    cell's time in one transaction. The first report of an episode id wins: returns the recorded episode
    and whether this report was it."""
    with board.read() as r:
        known = r.get("episodes", msg.episode_id, EpisodeRecord)
    if known is not None:
        return known, False
    spec = episode.spec
    trajectory_file = ""
    if msg.trajectory is not None and trajectory:
        rel = Path("episodes") / (msg.episode_id.replace(":", "_").replace("/", "_") + ".npz")
        t = msg.trajectory
        write_trajectory(state_dir / rel, t.observations.numpy(), t.actions.numpy(), t.rewards.numpy(),
                         t.frames.numpy() if t.frames is not None else None)
        trajectory_file = str(rel)
    record = EpisodeRecord(
        episode_id=msg.episode_id, job_id=spec.job_id, kind=spec.kind, task=spec.task, seed=episode.seed,
        policy=spec.policy, cell_id=msg.cell_id, verdict=msg.verdict,
        success_at_k=any(a.verdict.success for a in msg.attempts) or msg.verdict.success,
        attempts=len(msg.attempts), steps=msg.steps, reset_s=msg.reset_s, run_s=msg.run_s, verify_s=msg.verify_s,
        finished=time.time(), trajectory_file=trajectory_file, flagged=msg.flagged, purpose=spec.purpose,
    )
    with board.write() as w:
        save_cell(w, msg.cell_id, None, fresh)
        if not w.put("episodes", msg.episode_id, record, overwrite=False):
            return w.get("episodes", msg.episode_id, EpisodeRecord), False
        w.incr("episodes")
        if msg.flagged:
            w.incr("episodes_flagged")
    return record, True
