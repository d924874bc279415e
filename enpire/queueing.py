"""The lease queue's bookkeeping (actors/lease_queue.py): jobs, episodes, leases and cells as data, and
the records they become on the blackboard. No actor here: the queue holds these and decides."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bus.blackboard import Blackboard
from bus.messages import EpisodeReport, EpisodeSummary, JobDone, JobSpec, Segment
from bus.records import CellRecord, EpisodeRecord, JobRecord, TimelineRecord
from enpire.episodes import write_trajectory
from enpire.metrics import Utilization, utilization


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
            for eid in self.episode_ids if (r := self.results.get(eid)) is not None and not r.flagged])

    def record(self) -> JobRecord:
        """The finished job's record (a cancelled one says so: its missing episodes are not lost)."""
        s = self.spec
        return JobRecord(s.job_id, s.agent, s.kind, s.task, s.policy, list(s.seeds), s.attempts, s.priority,
                         time.time(), done=True, purpose=s.purpose, cancelled=self.cancelled)


def spec_of(record: JobRecord) -> JobSpec:
    return JobSpec(job_id=record.job_id, agent=record.agent, task=record.task, policy=record.policy,
                   seeds=list(record.seeds), purpose=record.purpose, attempts=record.attempts, priority=record.priority)


def lane(spec: JobSpec) -> str:
    """Judging shares one queue, each agent has its own, background work has one."""
    return {"heldout": "judge", "background": "background"}.get(spec.kind, spec.agent)


def lane_rank(lane_key: str) -> int:
    """Between queues whose heads have the same priority: judging, then agents, then background work."""
    return {"judge": 0, "background": 2}.get(lane_key, 1)


@dataclass
class LeaseState:
    episode: Episode
    cell_id: str
    expires: float


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
        end = self.record.last_seen if self.record.state == "offline" else now
        return utilization(self.segments, end - self.record.joined)


def stored_segments(board: Blackboard, cell_id: str) -> list[Segment]:
    return [seg for rec in board.values("timeline", TimelineRecord) if rec.cell_id == cell_id for seg in rec.segments]


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
        if fresh:
            w.append("timeline", TimelineRecord(msg.cell_id, fresh))
        if not w.put("episodes", msg.episode_id, record, overwrite=False):
            return w.get("episodes", msg.episode_id, EpisodeRecord), False
        w.incr("episodes")
        if msg.flagged:
            w.incr("episodes_flagged")
    return record, True
