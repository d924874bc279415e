"""The judge actor: what the team's experiments mean. It submits jobs to the lease queue and hears
"job done"; it never leases an episode itself. Its rules are pure functions in `enpire/judging.py`.

- Agents' evaluations (tuning seeds only, within each agent's episode budget), tallied per candidate
  into the team's leaderboard (`enpire/leaderboard.py`).
- Promotion: each judging draws FRESH held-out seeds (`enpire/heldout.py`: no held-out seed is judged twice,
  across candidates, confirmations and the final judging); one judging per candidate, however many ask.
- Confirmation of the champion on further fresh held-out seeds until the sequential rule stops (a
  policy champion again goes on from its earlier tally); a regression it finds is rolled back.
- The starting policy (`[fleet] baseline`, else the first candidate an agent evaluated) is judged by
  idle cells until there is a champion; at the end of a run `FinalJudging` runs it and the champion
  on the same fresh held-out seeds. Smoke tests clear policies for cells marked real.
- Each finished job is counted once (`judging.count_*`); a restart counts those a crash left uncounted.
"""

from __future__ import annotations

import math
import time

import msgspec
import trio

from actors.runtime import Actor, Ref
from bus import messages as m
from bus.backoff import backoff_delay
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.records import Champion, HeldoutRecord, JobRecord, SmokeRecord
from enpire import judging, leaderboard
from enpire.config import Config
from enpire.heldout import PoolExhausted, draw, running_low, unfinished_final_seeds
from enpire.judging import PRIORITY, tally
from enpire.queueing import finished, spec_of

Purpose = m.Purpose


class JobRefused(RuntimeError):
    pass


class Judge(Actor):
    name = "judge"
    concurrent_handlers = True  # agents wait for their jobs

    def __init__(self, config: Config, board: Blackboard, queue: Ref, events: EventHub, set_main=None,
                 baseline: m.PolicySpec | None = None, ended: trio.Event | None = None):
        """`set_main(commit)` points the workspace's main branch at the champion (blocking: git); `ended`:
        the fleet's, set as the run ends: from then on nothing is decided, its final judging aside."""
        super().__init__()
        self.config, self.board, self.queue, self.events = config, board, queue, events
        self.set_main = set_main or (lambda commit: None)
        self.baseline, self.task = baseline, config.cells.task
        self.ended = ended if ended is not None else trio.Event()
        self.promotions: dict[str, str] = {}  # policy ref -> its judging job
        self.committed: dict[str, int] = {}  # episodes asked per agent, for the episode budget
        self.cells = self._confirming = 0  # cells; background episodes submitted and not done
        self._background: set[str] = set()  # background jobs running (their ids)
        self._changed = trio.Event()
        self._deciding = trio.Lock()  # teammates waiting on one judging: the first decides, the others see it

    async def setup(self) -> None:
        self.promotions, self.committed = judging.restored(record for _, record in self.board.items("jobs", JobRecord))
        self._confirming, self._background = 0, set()
        if (champion := self.champion()) is not None:
            before = champion.decision
            if judging.decide(champion, self.config):  # its stop against another target (an earlier run's), its lead
                self.log.info("confirmation_decided_again", decision=champion.decision, was=before, leads=champion.leads)
                await self.board.transact(lambda w: w.put("champion", champion.task, champion))  # before it is heard
            self._publish(champion)
        self._publish_pool(self.board.get("heldout", self.task, HeldoutRecord) or HeldoutRecord(self.task))

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, nursery)
            for record in await self.board.transact(lambda w: judging.uncounted(w, time.time())):  # before resuming a judging
                await self._count(spec_of(record), await trio.to_thread.run_sync(finished, self.board, record))
            for _, record in [] if self.ended.is_set() else self.board.items("jobs", JobRecord):  # interrupted
                if not record.done and record.purpose in (Purpose.BASELINE, Purpose.CONFIRM):
                    self._start_background(nursery, spec_of(record))
                elif record.purpose is Purpose.EVAL and not record.done or judging.undecided(self.board, record):
                    nursery.start_soon(self.handle, judging.request_of(record))  # its asker may be gone
            while not self.ended.is_set():  # after the run's end, no more confirmation
                await self._top_up(nursery)
                await self._changed.wait()
                self._changed = trio.Event()

    async def _listen(self, nursery: trio.Nursery) -> None:
        with self.events.subscribe(m.QueueDepth, m.SmokeNeeded) as events:
            async for event in events:
                if isinstance(event, m.QueueDepth) and event.cells != self.cells:
                    self.cells = event.cells
                    self._changed.set()
                elif isinstance(event, m.SmokeNeeded):
                    nursery.start_soon(self._smoke, event.policy)

    async def handle(self, msg: m.Message) -> m.Message:
        try:
            match msg:
                case m.EvalRequest():
                    return await self._eval(msg)
                case m.PromoteRequest():
                    return await self._promote(msg)
                case m.FinalJudging():
                    return await self._final(msg)
        except JobRefused as e:
            return m.Failure(error=str(e))
        return m.Failure(error=f"the judge does not handle {type(msg).__name__}")

    # ------------------------------------------------------------------ agents' evaluations

    async def _eval(self, msg: m.EvalRequest) -> m.Message:
        if (task := self.config.tasks.get(msg.task)) is None:
            return m.Failure(error=f"unknown task {msg.task!r}")
        if not msg.seeds:
            return m.Failure(error="an evaluation needs at least one seed")
        if any(s in task.heldout_seeds.seeds() for s in msg.seeds):
            return m.Failure(error="held-out seeds are reserved for judging; evaluate on tuning seeds")
        spec = m.JobSpec(job_id=msg.job_id, agent=msg.agent, task=msg.task, policy=msg.policy, seeds=list(msg.seeds),
                         purpose=Purpose.EVAL, attempts=msg.attempts or task.attempts, priority=msg.priority)
        fresh = self.board.get("jobs", msg.job_id, JobRecord) is None
        if fresh:  # a retried request is not charged twice
            budget, spent = self.config.agents.episode_budget, self.committed.get(msg.agent, 0)
            if budget and spent + len(msg.seeds) > budget:
                return m.Failure(error=f"episode budget exhausted: {spent} of {budget} used, {len(msg.seeds)} asked")
            self.committed[msg.agent] = spent + len(msg.seeds)

            def pending(w) -> int:
                if self.baseline is None and w.get("meta", "start", m.PolicySpec) is None:
                    w.put("meta", "start", msg.policy)  # the run starts from the first candidate evaluated
                return leaderboard.expect(w, spec.task, spec.policy, spec.agent, len(spec.seeds), time.time())
            if await self.board.transact(pending):  # more evidence on a measured candidate goes first
                spec = msgspec.structs.replace(spec, priority=spec.priority + 1)
        done = await self._run(spec)
        await self._count(spec, done)
        return m.EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=done.episodes)

    # ------------------------------------------------------------------ promotion

    async def _promote(self, msg: m.PromoteRequest) -> m.Message:
        if msg.task not in self.config.tasks or self.ended.is_set():  # after the end: no seeds for a judging
            return m.Failure(error="the run has ended" if self.ended.is_set() else f"unknown task {msg.task!r}")
        # One judging per candidate: teammates who ask for the same one wait for that verdict.
        job_id = self.promotions.setdefault(msg.policy.ref, msg.job_id)
        if (record := self.board.get("jobs", job_id, JobRecord)) is None:
            try:
                seeds = await self._draw(msg.task, self.config.scheduler.promote_seeds)
            except PoolExhausted as e:
                del self.promotions[msg.policy.ref]
                return m.Failure(error=str(e))
            spec = m.JobSpec(job_id=job_id, agent=msg.agent, task=msg.task, policy=msg.policy, seeds=seeds,
                             purpose=Purpose.PROMOTE, priority=PRIORITY["judging"])
            await self.board.transact(lambda w: leaderboard.mark(w, spec.task, spec.policy, spec.agent, "judging",
                                                                 time.time()))
        else:
            spec = spec_of(record)
        done = await self._run(spec)
        async with self._deciding:
            return await self._decide(spec, done)

    async def _decide(self, spec: m.JobSpec, done: m.JobDone) -> m.PromoteResult:
        now, (s, n) = time.time(), tally(done.episodes)
        decision, champion = await self.board.transact(
            lambda w: judging.count_promotion(w, spec, done.episodes, self.config, now, self.ended.is_set()))
        if decision.crowned is not None:
            self.log.info("champion_promoted", task=spec.task, policy=spec.policy.ref, successes=s, n=n,
                          previous=champion.policy.ref if champion else "")
            await self._crowned(decision.crowned)
        cs, cn = judging.heldout_record(champion)
        return m.PromoteResult(job_id=spec.job_id, policy=spec.policy, promoted=decision.promoted, successes=s, n=n,
                               champion_successes=cs, champion_n=cn, detail=decision.detail)

    async def _crowned(self, champion: Champion) -> None:  # once its durable record is written
        await self._cancel_background()  # the old champion's confirmation (or the baseline's judging) is moot
        await trio.to_thread.run_sync(self.set_main, champion.policy.commit)
        if champion.decision:  # a policy champion again whose carried confirmation already decides it
            self._stopped(champion)
        self._publish(champion)

    def _stopped(self, c: Champion) -> None:
        self.log.info("confirmation_stopped", policy=c.policy.ref, decision=c.decision, confirmed=f"{c.successes}/{c.n}")

    # ------------------------------------------------------------------ background: baseline, confirmation

    async def _top_up(self, nursery: trio.Nursery) -> None:
        """Keep two jobs of the champion's confirmation queued (with no champion: the baseline's judging)."""
        sched = self.config.scheduler
        champion = self.champion()
        if champion is None:
            job_id = f"baseline-{self.baseline.ref}" if self.baseline else ""
            if (job_id and sched.pooled and sched.background and self._confirming == 0
                    and self.board.get("jobs", job_id, JobRecord) is None):
                await self._submit_background(nursery, Purpose.BASELINE, self.baseline, "baseline",
                                              sched.promote_seeds, PRIORITY["background"], job_id)
            return
        plan = judging.confirmation_plan(champion, self.config, self.cells)
        while plan is not None and self._confirming < 2 * plan[0]:
            if not await self._submit_background(nursery, Purpose.CONFIRM, champion.policy, champion.agent, *plan):
                return

    async def _submit_background(self, nursery, purpose: m.Purpose, policy: m.PolicySpec, agent: str, n: int,
                                 priority: int, job_id: str = "") -> bool:
        try:
            seeds = await self._draw(self.task, n)
        except PoolExhausted as e:
            self.log.warning("heldout_pool_exhausted", detail=str(e))
            return False
        if self.ended.is_set() or purpose is Purpose.CONFIRM and (c := self.champion()) is not None and c.policy != policy:
            return False  # the run ended, or promoted meanwhile: these seeds stay unused (never judged)
        self._start_background(nursery, m.JobSpec(
            job_id=job_id or f"{purpose.value}-{policy.ref}-{seeds[0]}", agent=agent, task=self.task, policy=policy,
            seeds=seeds, purpose=purpose, priority=priority))
        return True

    def _start_background(self, nursery: trio.Nursery, spec: m.JobSpec) -> None:
        self._confirming += len(spec.seeds)
        self._background.add(spec.job_id)
        nursery.start_soon(self._background_job, spec)

    async def _background_job(self, spec: m.JobSpec) -> None:
        try:
            done = await self._run(spec)
        except JobRefused as e:  # its policy cannot be served: nothing to confirm (the log says why)
            self.log.error("background_job_refused", job=spec.job_id, error=str(e))
            return
        finally:
            self._confirming -= len(spec.seeds)
            self._background.discard(spec.job_id)
        if not done.cancelled:
            await self._count(spec, done)
        self._changed.set()

    async def _count(self, spec: m.JobSpec, done: m.JobDone) -> None:
        """A finished job's verdicts, counted where they belong, once."""
        if self.ended.is_set() and spec.purpose is not Purpose.EVAL:  # could change the champion: counted at the
            return  # next start that is not the run's end (a confirmation, the baseline's judging)
        if spec.purpose is Purpose.CONFIRM:
            return await self._confirmed(spec, done)
        now = time.time()
        if spec.purpose is Purpose.EVAL:
            await self.board.transact(lambda w: judging.count_evaluation(w, spec, done.episodes, now))
        elif crowned := await self.board.transact(lambda w: judging.count_baseline(w, spec, done.episodes,
                                                                                    self.config, now)):
            await self._crowned(crowned)
            self.log.info("baseline_judged", policy=spec.policy.ref, judged=f"{crowned.judged_successes}/{crowned.judged_n}")

    async def _cancel_background(self) -> None:
        for job_id in list(self._background):
            await self.queue.ask(m.CancelJob(job_id=job_id))

    async def _confirmed(self, spec: m.JobSpec, done: m.JobDone) -> None:
        counted = await self.board.transact(
            lambda w: judging.count_confirmation(w, spec, done.episodes, self.config, time.time()))
        if counted is None:
            return
        champion, previous, stopped = counted
        if previous is not None:
            self.log.warning("champion_rolled_back", task=champion.task, policy=champion.policy.ref,
                             confirmed=f"{champion.successes}/{champion.n}", back_to=previous.policy.ref)
            await self._crowned(previous)
            return
        if stopped:  # said once, before it is heard: a "met" ends the run, and this actor with it
            self._stopped(champion)
        self._publish(champion)
        if champion.decision:
            await self._cancel_background()  # what is still queued of it is not needed

    # ------------------------------------------------------------------ smoke tests, final judging

    async def _smoke(self, policy: m.PolicySpec) -> None:
        record = self.board.get("smoke", policy.ref, SmokeRecord)
        if record is None:
            seeds = list(self.config.task().tuning_seeds.seeds()[: self.config.scheduler.smoke_seeds])
            try:
                done = await self._run(m.JobSpec(job_id=f"smoke-{policy.ref}", agent="smoke", task=self.task,
                                                 policy=policy, seeds=seeds, purpose=Purpose.SMOKE,
                                                 priority=PRIORITY["smoke"]))
            except JobRefused as e:
                done = m.JobDone(job_id=f"smoke-{policy.ref}", episodes=[
                    m.EpisodeSummary("", 0, False, False, 0.0, f"policy_error: {e}", 0)])
            record = judging.smoke_record(policy, done.episodes, time.time())
            await self.board.transact(lambda w: w.put("smoke", policy.ref, record))
            self.log.info("smoke_tested", policy=policy.ref, passed=record.passed, detail=record.detail)
        await self.queue.ask(m.Clearance(policy=policy, passed=record.passed))

    async def _final(self, msg: m.FinalJudging) -> m.Message:
        """The starting policy and the champion on the same fresh held-out seeds (paired), before all else."""
        self.ended.set()  # the run ended (the fleet's too): a judging or a confirmation finishing now decides nothing
        await self._cancel_background()
        start = self.baseline or self.board.get("meta", "start", m.PolicySpec)
        if start is None:
            return m.Failure(error="no starting policy: no baseline and no agent evaluated anything")
        try:  # one cut short (a stop signal) goes on with its seeds, so its recorded episodes count
            seeds = (await trio.to_thread.run_sync(unfinished_final_seeds, self.board, msg.task, msg.seeds)
                     or await self._draw(msg.task, msg.seeds))
        except PoolExhausted as e:
            return m.Failure(error=str(e))
        best = c.policy if (c := self.champion()) else None
        results: dict[str, tuple[int, int]] = {}

        async def judge(policy: m.PolicySpec) -> None:
            done = await self._run(m.JobSpec(job_id=f"final-{policy.ref}-{seeds[0]}", agent="final", task=msg.task,
                                             policy=policy, seeds=seeds, purpose=Purpose.FINAL,
                                             priority=PRIORITY["final"]))
            results[policy.ref] = tally(done.episodes)
        async with trio.open_nursery() as nursery:
            for policy in {p.ref: p for p in (start, best) if p is not None}.values():
                nursery.start_soon(judge, policy)
        (s0, n0), (s1, n1) = results[start.ref], results[best.ref] if best else (0, 0)
        record = m.FinalJudged(msg.task, seeds, start, s0, n0, best, s1, n1, time.time())
        await self.board.transact(lambda w: w.put("meta", "final", record))
        self.log.info("final_judging", start=start.ref, start_judged=f"{s0}/{n0}",
                      champion=best.ref if best else "", champion_judged=f"{s1}/{n1}")
        return m.FinalResult(final=record)

    # ------------------------------------------------------------------ the held-out pool, jobs, events

    async def _draw(self, task: str, k: int) -> list[int]:
        seeds, record = await trio.to_thread.run_sync(draw, self.board, self.config, task, k)
        self._publish_pool(record)
        return seeds

    def _publish_pool(self, record: HeldoutRecord) -> None:
        total, low = self.config.task(record.task).heldout_seeds.count, running_low(self.config, record)
        self.events.publish(m.HeldoutUsage(task=record.task, used=record.used, total=total, low=low, t=time.time()))
        if low:
            self.log.warning("heldout_pool_low", task=record.task, used=record.used, total=total)

    async def _run(self, spec: m.JobSpec) -> m.JobDone:
        """Submit a job and wait for it; a restart of the queue is answered by submitting again (idempotent)."""
        tries = 0
        while True:
            reply = await self.queue.ask(m.SubmitJob(job=spec), timeout=math.inf)
            if isinstance(reply, m.JobDone):
                return reply
            if isinstance(reply, m.Failure) and not reply.retry:
                raise JobRefused(reply.error)
            tries += 1
            self.log.warning("job_resubmitted", job=spec.job_id, reply=str(reply)[:200])
            await trio.sleep(backoff_delay(tries, 0.5, 5.0))

    def champion(self) -> Champion | None:
        return self.board.get("champion", self.task, Champion)

    def _publish(self, c: Champion) -> None:
        self.events.publish(judging.announce(c, self.config, time.time()))
        self._changed.set()

