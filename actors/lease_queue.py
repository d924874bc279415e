"""The lease queue actor: turns jobs into episodes and leases them to free cells, exactly once.

- Cells pull work (`LeaseRequest`, long-polled) so a free robot never waits for a push. A lease names
  the policy's files by content hash; the cell fetches a bundle it has not cached (`BundleRequest`).
- Every episode is leased with a deadline. A lease that expires, or whose cell stops heartbeating, is
  queued again under the same episode id; the first report for an episode id is recorded and any later
  one is acknowledged and ignored, so each episode ends with exactly one result.
- Order (`enpire.queueing.Lanes`): by the priority the judge set, then fair share between agents.
- The judge submits jobs (`SubmitJob`) and hears `JobDone` when every episode is recorded. Jobs,
  episodes, leases, cells and timelines are on the blackboard, written off the event loop; `setup()`
  rebuilds the queue from it. Queue depth and cell states are published as events.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import trio

from actors.runtime import Actor
from bus import messages as m
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.records import CellRecord, EpisodeRecord, JobRecord, LeaseRecord, QueueRecord
from enpire.bundles import BundleError, BundleStore
from enpire.config import Config
from enpire.queueing import (
    CellState,
    Episode,
    Job,
    Lanes,
    LeaseBook,
    LeaseState,
    eligible,
    finished,
    lease_of,
    record_episode,
    replacement,
    restore,
    save_cell,
    spec_of,
    stored_segments,
    unfinished,
)
from enpire.seal import refuse_report


class LeaseQueue(Actor):
    name = "queue"
    concurrent_handlers = True  # lease requests long-poll; the judge waits for its jobs

    def __init__(self, config: Config, board: Blackboard, bundles: BundleStore, state_dir: Path, run_id: str,
                 events: EventHub, verdict_key: bytes | None = None):
        """`verdict_key`: the verifier's signing key; every recorded verdict must be signed with it."""
        super().__init__()
        self.verdict_key = verdict_key
        self.config, self.board, self.bundles, self.events = config, board, bundles, events
        self.state_dir, self.run_id = state_dir, run_id
        self.jobs: dict[str, Job] = {}
        self.pending = Lanes()
        self.leases = LeaseBook()
        self.cells: dict[str, CellState] = {}
        self.cleared: dict[str, bool] = {}  # smoke verdicts by policy ref (cells marked real run cleared ones)
        self.cancelled: set[str] = set()  # job ids cancelled before they were submitted
        self.recording: set[str] = set()  # episode ids whose first report is being written
        self._work = trio.Event()
        self._depth: tuple[int, int, int] | None = None
        self._depth_dirty = trio.Event()
        self._requeued, self._unsaved = 0, False
        self.recorded = 0  # episodes on the blackboard (its counter, kept here for progress lines)

    # ------------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        """Rebuild the queue from the blackboard: unfinished jobs, minus episodes already recorded."""
        jobs, done, self.cleared = await trio.to_thread.run_sync(unfinished, self.board)
        self.recorded = self.board.counter("episodes")
        for record in jobs:
            try:
                await self._add(spec_of(record), done)
            except (BundleError, OSError) as e:  # its policy is gone: it cannot run again
                self.log.error("job_dropped", job=record.job_id, error=str(e))
        if jobs:
            self.log.info("queue_restored", jobs=len(jobs), episodes=len(self.pending))

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_depth)
            while True:  # a timer of its own leases, not a poll of anyone else
                await trio.sleep(0.25)
                self._expire(time.time())
                if self._unsaved:
                    requeued, self._requeued, self._unsaved = self._requeued, 0, False
                    offline = [c.record for c in self.cells.values() if c.record.state == "offline"]

                    def save(w, requeued=requeued, offline=offline):
                        w.incr("episodes_requeued", requeued)
                        for record in offline:
                            w.put("cells", record.cell_id, record)
                    await self.board.transact(save)

    # ------------------------------------------------------------------ messages

    async def handle(self, msg: m.Message) -> m.Message:
        match msg:
            case m.LeaseRequest():
                return await self._lease(msg)
            case m.EpisodeReport():
                return await self._report(msg)
            case m.Heartbeat():
                return await self._heartbeat(msg)
            case m.Hello():
                return await self._hello(msg)
            case m.BundleRequest():
                bundle = await self.bundles.bundle(msg.digest)
                return bundle or m.Failure(error=f"no policy bundle {msg.digest}")
            case m.SubmitJob():
                return await self._submit(msg.job)
            case m.CancelJob():
                return await self._cancel(msg.job_id)
            case m.UtilizationRequest():
                return m.UtilizationReport(cells=self.utilization(), recorded=self.recorded)
            case m.Clearance():
                self.cleared[msg.policy.ref] = msg.passed
                self._wake()
                return m.Ack()
        return m.Failure(error=f"the lease queue does not handle {type(msg).__name__}")

    async def _hello(self, msg: m.Hello) -> m.Welcome:
        now = time.time()
        previous = self.cells.get(msg.cell_id)
        known = self.board.get("cells", msg.cell_id, CellRecord)
        # A restarted cell (or daemon) keeps the cell's MRU window: downtime counts as not running.
        joined = known.joined if known is not None else now
        record = CellRecord(msg.cell_id, msg.driver, msg.host, msg.pid, joined=joined, last_seen=now, real=msg.real)
        if previous is not None:
            self._release_cell(msg.cell_id, "cell restarted")
        segments = previous.segments if previous else await trio.to_thread.run_sync(stored_segments, self.board,
                                                                                    msg.cell_id)
        self.cells[msg.cell_id] = CellState(record, frozenset(msg.tasks), segments, now)
        await self.board.transact(lambda w: save_cell(w, msg.cell_id, record, []))
        self._cell_changed(msg.cell_id)
        self.log.info("cell_joined", cell=msg.cell_id, host=msg.host, pid=msg.pid, driver=msg.driver, tasks=msg.tasks)
        return m.Welcome(run_id=self.run_id, heartbeat_s=self.config.scheduler.heartbeat_s)

    async def _heartbeat(self, msg: m.Heartbeat) -> m.Message:
        cell = self.cells.get(msg.cell_id)
        if cell is None:
            return m.Failure(error=f"unknown cell {msg.cell_id!r}: say m.Hello first", retry=False)
        cell.last_heartbeat = cell.record.last_seen = time.time()
        changed = cell.record.state != msg.state
        cell.record.state = msg.state
        fresh = cell.fresh(msg.segments)
        if changed or fresh:
            record = cell.record if changed else None
            await self.board.transact(lambda w: save_cell(w, msg.cell_id, record, fresh))
        if changed:
            self._cell_changed(msg.cell_id)
        return m.Ack()

    async def _lease(self, msg: m.LeaseRequest) -> m.Message:
        cell = self.cells.get(msg.cell_id)
        if cell is None:
            return m.Failure(error=f"unknown cell {msg.cell_id!r}: say m.Hello first", retry=False)
        with trio.move_on_after(min(msg.wait_s, 10.0)):
            while True:
                episode = self.pending.take(lambda e: self._eligible(e, cell))
                if episode is not None:
                    return await self._grant(episode, msg.cell_id)
                self._work = trio.Event() if self._work.is_set() else self._work
                await self._work.wait()
        return m.NoWork(retry_after_s=0.0)

    async def _grant(self, episode: Episode, cell_id: str) -> m.Lease:
        lease_id, now = uuid.uuid4().hex[:12], time.time()
        self.leases.held[lease_id] = LeaseState(episode, cell_id, now + self.config.scheduler.lease_s)
        self._depth_changed()
        # Recorded before the cell hears of it; should this be cancelled, the lease expires and is re-queued.
        record = LeaseRecord(lease_id, episode.episode_id, episode.spec.job_id, cell_id, now)
        await self.board.transact(lambda w: w.put("leases", lease_id, record))
        return lease_of(lease_id, episode, self.config)

    async def _report(self, msg: m.EpisodeReport) -> m.Message:
        lease = self.leases.held.get(msg.lease_id)
        # Only the cell the lease was granted to (also once it lapsed while that cell was late) may report,
        # with verdicts the verifier signed for that lease; anything else is refused and logged.
        held = self.leases.holder(msg.lease_id)
        real = (c := self.cells.get(msg.cell_id)) is not None and c.record.real  # a person may judge
        recorded = msg.episode_id in self.recording or (
            (j := self.jobs.get(msg.episode_id.rsplit(":", 1)[0])) is not None and msg.episode_id in j.results)
        if not recorded and (why := refuse_report(msg, held, self.verdict_key, real)):
            self.log.warning("report_refused", cell=msg.cell_id, lease=msg.lease_id, episode=msg.episode_id, why=why)
            return m.Failure(error=f"report refused: {why}", retry=False)
        if held is not None and held[0] == msg.cell_id:
            self.leases.held.pop(msg.lease_id, None)
        else:
            lease = None
        job = self.jobs.get(lease.episode.spec.job_id if lease else msg.episode_id.rsplit(":", 1)[0])
        cell = self.cells.get(msg.cell_id)
        fresh = cell.fresh(msg.segments) if cell else []
        # A late report on a lapsed lease: the episode is queued again or leased to another cell.
        episode = lease.episode if lease else (self.pending.find(msg.episode_id)
                                               or self.leases.episode(msg.episode_id))
        if job is None or episode is None or msg.episode_id in job.results or msg.episode_id in self.recording:
            if fresh:
                await self.board.transact(lambda w: save_cell(w, msg.cell_id, None, fresh))
            return m.Ack(detail="duplicate or unknown episode; ignored")
        self.pending.discard(msg.episode_id)  # a re-leased copy may be queued or running: this result wins
        self.leases.end(msg.episode_id)
        self.recording.add(msg.episode_id)
        try:
            record, first = await trio.to_thread.run_sync(
                record_episode, self.board, self.state_dir, msg, episode,
                self.config.task(episode.spec.task).record_trajectories, fresh)
        finally:
            self.recording.discard(msg.episode_id)
        job.results[msg.episode_id] = record  # the recorded result, whichever report it came from
        self.recorded += first
        if first and record.flagged and job.spec.kind == "agent":  # solved at reset: the seed says nothing
            pool = self.config.task(job.spec.task).tuning_seeds  # (held-out work: `counted` says)
            self.pending.push_front(replacement(job, episode, pool.start, pool.count))
            self._wake()
        await self._progress(job)
        self._depth_changed()
        return m.Ack() if first else m.Ack(detail="already recorded")

    # ------------------------------------------------------------------ jobs

    async def _submit(self, spec: m.JobSpec) -> m.Message:
        """Queue a job once; every submission of its id waits for the same job and gets its episodes."""
        job = self.jobs.get(spec.job_id)
        if job is None and spec.job_id in self.cancelled:
            return m.JobDone(job_id=spec.job_id, episodes=[], cancelled=True)
        if job is None:
            stored = self.board.get("jobs", spec.job_id, JobRecord)
            if stored is not None and stored.done:
                return await trio.to_thread.run_sync(finished, self.board, stored)
            try:  # a policy that cannot be served (a checkpoint that is not there) is refused, not queued
                await self.bundles.digest(spec.policy)
            except (BundleError, OSError) as e:
                return m.Failure(error=f"policy {spec.policy.ref} cannot be served: {e}", retry=False)
            if stored is None:
                record = JobRecord(spec.job_id, spec.agent, spec.kind, spec.task, spec.policy, list(spec.seeds),
                                   spec.attempts, spec.priority, time.time(), purpose=spec.purpose)
                await self.board.transact(lambda w: w.put("jobs", spec.job_id, record))
            job = self.jobs.get(spec.job_id) or await self._add(spec, {})
        await job.done.wait()
        return job.reply()

    async def _add(self, spec: m.JobSpec, done: dict[str, EpisodeRecord]) -> Job:
        bundle = await self.bundles.digest(spec.policy)
        if spec.job_id in self.jobs:  # submitted twice while the bundle was read
            return self.jobs[spec.job_id]
        pool = self.config.task(spec.task).tuning_seeds
        job, waiting = restore(spec, done, bundle, pool.start, pool.count)
        self.jobs[spec.job_id] = job
        self.pending.add(waiting)
        await self._progress(job)
        self._wake()
        return job

    async def _cancel(self, job_id: str) -> m.Message:
        job = self.jobs.get(job_id)
        if job is None:  # not here (yet): a submission that arrives later is refused
            self.cancelled.add(job_id)
            return m.Ack(detail="no such job running")
        self.pending.cancel(job.spec)
        job.cancelled = True
        job.episode_ids = [eid for eid in job.episode_ids if eid in job.results]
        del self.jobs[job_id]
        await self.board.transact(lambda w: w.put("jobs", job_id, job.record()))
        job.done.set()
        self._depth_changed()
        return m.Ack()

    async def _progress(self, job: Job) -> None:
        if job.complete and not job.done.is_set():
            await self.board.transact(lambda w: w.put("jobs", job.spec.job_id, job.record()))
            self.jobs.pop(job.spec.job_id, None)
            job.done.set()

    # ------------------------------------------------------------------ cells and leases

    def _eligible(self, episode: Episode, cell: CellState) -> bool:
        fits = eligible(episode, cell, self.config, self.cleared)
        if fits is None:
            self.events.publish(m.SmokeNeeded(policy=episode.spec.policy))
        return bool(fits)

    def _wake(self) -> None:
        self._work.set()
        self._depth_changed()

    def _requeue(self, lease_id: str, why: str) -> None:
        state = self.leases.lapse(lease_id)
        episode = state.episode
        job = self.jobs.get(episode.spec.job_id)
        if job is None or episode.episode_id in job.results:
            return
        self.pending.push_front(episode)
        self._wake()
        self._requeued += 1  # counted on the blackboard by main(), off the event loop
        self._unsaved = True
        self.log.warning("lease_requeued", episode=episode.episode_id, cell=state.cell_id, why=why)

    def _release_cell(self, cell_id: str, why: str) -> None:
        for lease_id in self.leases.of_cell(cell_id):
            self._requeue(lease_id, why)

    def _expire(self, now: float) -> None:
        for lease_id in self.leases.expired(now):
            self._requeue(lease_id, "lease expired")
        silent = 4 * self.config.scheduler.heartbeat_s + 1.0
        for cell_id, cell in self.cells.items():
            if cell.record.state != "offline" and now - cell.last_heartbeat > silent:
                cell.record.state = "offline"
                self._unsaved = True
                self._cell_changed(cell_id)
                self.log.warning("cell_silent", cell=cell_id, silent_s=round(now - cell.last_heartbeat, 1))
                self._release_cell(cell_id, "cell stopped heartbeating")

    # ------------------------------------------------------------------ events and records

    def _cell_changed(self, cell_id: str) -> None:
        self.events.publish(m.CellStateChanged(cell_id=cell_id, state=self.cells[cell_id].record.state, t=time.time()))
        self._depth_changed()

    def _depth_changed(self) -> None:
        depth = (*self.pending.depth(), sum(c.record.state != "offline" for c in self.cells.values()))
        if depth != self._depth:
            self._depth = depth
            self.events.publish(m.QueueDepth(waiting=depth[0], background=depth[1], cells=depth[2], t=time.time()))
            self._depth_dirty.set()

    async def _publish_depth(self) -> None:
        """The durable copy of the queue depth (for `status` and agents' pacing), coalesced, off the loop."""
        while True:
            await self._depth_dirty.wait()
            self._depth_dirty = trio.Event()
            record = QueueRecord(self._depth[0], self._depth[2], time.time())
            await self.board.transact(lambda w, record=record: w.put("meta", "queue", record))
            await trio.sleep(0.1)

    def utilization(self, now: float | None = None) -> dict[str, m.Utilization]:
        now = now or time.time()
        return {cid: c.utilization(now) for cid, c in self.cells.items()}
