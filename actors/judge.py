"""The judge actor: what the team's experiments mean. It submits jobs to the lease queue and hears
"job done"; it never leases an episode itself.

- Agents' evaluations (tuning seeds only, within each agent's episode budget), tallied per candidate
  into the team's leaderboard.
- Promotion: each judging draws FRESH held-out seeds (`HeldoutRecord`: no held-out seed is judged twice,
  across candidates, confirmations and the final judging); a candidate replaces the champion only when
  it is better with statistical confidence (one-sided two-proportion z-test) than the champion's
  held-out record. One judging per candidate, however many agents ask.
- Confirmation: the champion runs on further fresh held-out seeds until a sequential rule stops
  (`metrics.sprt`: the chance to say "met" for a policy below the target is at most `[scheduler] alpha`,
  however often it is checked); a decisive confirmation goes before agents' experiments. A regression
  it finds is rolled back.
- The starting policy (`[fleet] baseline`, else the first candidate an agent evaluated) is judged by
  idle cells until there is a champion; at the end of a run `FinalJudging` runs it and the champion
  on the same fresh held-out seeds. Smoke tests clear policies for cells marked real.
"""

from __future__ import annotations

import math
import time

import trio

from actors.runtime import Actor, Ref
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import (
    CancelJob,
    ChampionChanged,
    Clearance,
    EvalRequest,
    EvalResult,
    Failure,
    FinalJudging,
    FinalResult,
    HeldoutUsage,
    JobDone,
    JobSpec,
    Message,
    PolicySpec,
    PromoteRequest,
    PromoteResult,
    Purpose,
    QueueDepth,
    SmokeNeeded,
    SubmitJob,
)
from bus.records import CandidateRecord, Champion, FinalRecord, HeldoutRecord, JobRecord, SmokeRecord
from enpire import leaderboard
from enpire.config import Config
from enpire.metrics import better_with_confidence, sprt, wilson_interval

SMOKE_FAULTS = ("safety_violation", "policy_", "sandbox_denied", "output_too_large", "cpu_limit", "memory_limit")
PRIORITY = {"decisive": 200, "judging": 100, "smoke": 50, "background": -1, "final": 300}
CONFIRM_EPISODES_PER_CELL = 4
BETA = 0.1  # the confirmation's chance to look "unlikely" for a policy at the halfway rate (sprt)


class PoolExhausted(RuntimeError):
    pass


class Judge(Actor):
    name = "judge"
    concurrent_handlers = True  # agents wait for their jobs

    def __init__(self, config: Config, board: Blackboard, queue: Ref, events: EventHub, set_main=None,
                 baseline: PolicySpec | None = None):
        """`set_main(commit)` points the workspace's main branch at the champion (blocking: git)."""
        super().__init__()
        self.config, self.board, self.queue, self.events = config, board, queue, events
        self.set_main = set_main or (lambda commit: None)
        self.baseline = baseline
        self.task = config.cells.task
        self.promotions: dict[str, str] = {}  # policy ref -> its judging job
        self.committed: dict[str, int] = {}  # episodes asked per agent, for the episode budget
        self.cells = 0
        self._confirming = 0  # background episodes (confirmation, baseline) submitted and not done
        self._background: set[str] = set()  # background jobs running (their ids)
        self._changed = trio.Event()

    async def setup(self) -> None:
        self.promotions.clear()
        self.committed.clear()
        for _, record in self.board.items("jobs", JobRecord):
            if record.purpose is Purpose.EVAL:
                self.committed[record.agent] = self.committed.get(record.agent, 0) + len(record.seeds)
            elif record.purpose is Purpose.PROMOTE:
                self.promotions.setdefault(record.policy.ref, record.job_id)
        self._confirming = 0
        self._background.clear()
        if (champion := self.champion()) is not None:
            self._publish(champion)
        self._publish_pool(self.board.get("heldout", self.task, HeldoutRecord) or HeldoutRecord(self.task))

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, nursery)
            for _, record in self.board.items("jobs", JobRecord):  # resume what a restart interrupted
                if not record.done and record.purpose in (Purpose.BASELINE, Purpose.CONFIRM):
                    self._confirming += len(record.seeds)
                    self._background.add(record.job_id)
                    nursery.start_soon(self._background_job, _spec(record))
            while True:
                self._top_up(nursery)
                await self._changed.wait()
                self._changed = trio.Event()

    async def _listen(self, nursery: trio.Nursery) -> None:
        with self.events.subscribe(QueueDepth, SmokeNeeded) as events:
            async for event in events:
                if isinstance(event, QueueDepth) and event.cells != self.cells:
                    self.cells = event.cells
                    self._changed.set()
                elif isinstance(event, SmokeNeeded):
                    nursery.start_soon(self._smoke, event.policy)

    async def handle(self, msg: Message) -> Message:
        match msg:
            case EvalRequest():
                return await self._eval(msg)
            case PromoteRequest():
                return await self._promote(msg)
            case FinalJudging():
                return await self._final(msg)
        return Failure(error=f"the judge does not handle {type(msg).__name__}")

    # ------------------------------------------------------------------ agents' evaluations

    async def _eval(self, msg: EvalRequest) -> Message:
        task = self.config.tasks.get(msg.task)
        if task is None:
            return Failure(error=f"unknown task {msg.task!r}")
        if not msg.seeds:
            return Failure(error="an evaluation needs at least one seed")
        if any(s in task.heldout_seeds.seeds() for s in msg.seeds):
            return Failure(error="held-out seeds are reserved for judging; evaluate on tuning seeds")
        spec = JobSpec(job_id=msg.job_id, agent=msg.agent, task=msg.task, policy=msg.policy, seeds=list(msg.seeds),
                       purpose=Purpose.EVAL, attempts=msg.attempts or task.attempts, priority=msg.priority)
        fresh = self.board.get("jobs", msg.job_id, JobRecord) is None
        if fresh:  # a retried request is neither charged nor tallied twice
            budget, spent = self.config.agents.episode_budget, self.committed.get(msg.agent, 0)
            if budget and spent + len(msg.seeds) > budget:
                return Failure(error=f"episode budget exhausted: {spent} of {budget} used, {len(msg.seeds)} asked")
            self.committed[msg.agent] = spent + len(msg.seeds)
            if self.baseline is None and self.board.get("meta", "start", PolicySpec) is None:
                self.board.put("meta", "start", msg.policy)  # the run starts from the first candidate evaluated
            with self.board.write() as w:  # teammates see what is being measured right now
                candidate = self._candidate(w, spec)
                if candidate.n:  # more evidence on a measured candidate is on the way to a promotion: first
                    spec = JobSpec(**{**_fields(spec), "priority": spec.priority + 1})
                candidate.pending += len(spec.seeds)
                w.put("candidates", _key(spec.task, spec.policy), candidate)
        done = await self._run(spec)
        with self.board.write() as w:  # the tally, from verdicts (never from what an agent says)
            if not fresh:
                return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=done.episodes)
            candidate = leaderboard.add(self._candidate(w, spec), [(e.success, e.score, e.steps) for e in done.episodes],
                                        len(spec.seeds), time.time())
            w.put("candidates", _key(spec.task, spec.policy), candidate)
        return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=done.episodes)

    def _candidate(self, w, spec: JobSpec) -> CandidateRecord:
        return w.get("candidates", _key(spec.task, spec.policy), CandidateRecord) or CandidateRecord(
            spec.task, spec.policy, spec.agent, t=time.time())

    # ------------------------------------------------------------------ promotion

    async def _promote(self, msg: PromoteRequest) -> Message:
        if msg.task not in self.config.tasks:
            return Failure(error=f"unknown task {msg.task!r}")
        # One judging per candidate: teammates who ask for the same one wait for that verdict.
        job_id = self.promotions.setdefault(msg.policy.ref, msg.job_id)
        record = self.board.get("jobs", job_id, JobRecord)
        if record is None:
            try:
                seeds = self._draw(msg.task, self.config.scheduler.promote_seeds)
            except PoolExhausted as e:
                del self.promotions[msg.policy.ref]
                return Failure(error=str(e))
            spec = JobSpec(job_id=job_id, agent=msg.agent, task=msg.task, policy=msg.policy, seeds=seeds,
                           purpose=Purpose.PROMOTE, priority=PRIORITY["judging"])
            self._mark(spec, "judging")
        else:
            spec = _spec(record)
        done = await self._run(spec)
        return await self._decide(spec, done)

    async def _decide(self, spec: JobSpec, done: JobDone) -> PromoteResult:
        s, n = sum(e.success for e in done.episodes), len(done.episodes)
        champion = self.champion()
        # The champion's held-out record: its judging plus its confirmation, all on fresh seeds.
        cs, cn = (champion.judged_successes + champion.successes, champion.judged_n + champion.n) if champion else (0, 0)
        alpha = self.config.scheduler.alpha
        if champion and champion.policy == spec.policy:
            promoted, detail = True, "already the champion"
        elif better_with_confidence(s, n, cs, cn, alpha):
            promoted, detail = True, f"{s}/{n} beats {cs}/{cn} (one-sided z-test, alpha {alpha})"
            await self._crown(Champion(
                spec.task, spec.policy, judged_successes=s, judged_n=n, promoted=time.time(), agent=spec.agent,
                previous=champion.policy if champion else None, previous_successes=cs, previous_n=cn))
            self.log.info("champion_promoted", task=spec.task, policy=spec.policy.ref, successes=s, n=n,
                          previous=champion.policy.ref if champion else "")
        else:
            promoted, detail = False, f"{s}/{n} is not better than {cs}/{cn} with confidence"
        self._mark(spec, "promoted" if promoted else "rejected")
        return PromoteResult(job_id=spec.job_id, policy=spec.policy, promoted=promoted, successes=s, n=n,
                             champion_successes=cs, champion_n=cn, detail=detail)

    async def _crown(self, champion: Champion) -> None:
        self.board.put("champion", champion.task, champion)
        # The old champion's confirmation (or the baseline's judging) no longer counts: drop what is queued.
        for job_id in list(self._background):
            await self.queue.ask(CancelJob(job_id=job_id))
        await trio.to_thread.run_sync(self.set_main, champion.policy.commit)
        self._publish(champion)

    def _mark(self, spec: JobSpec, judged: str) -> None:
        with self.board.write() as w:
            candidate = w.get("candidates", _key(spec.task, spec.policy), CandidateRecord)
            if candidate is not None and candidate.judged != judged:
                candidate.judged = judged
                w.put("candidates", _key(spec.task, spec.policy), candidate)

    # ------------------------------------------------------------------ background: baseline, confirmation

    def _top_up(self, nursery: trio.Nursery) -> None:
        """Keep about two episodes per cell of the champion's confirmation in the queue (or the
        baseline's judging while there is no champion)."""
        sched = self.config.scheduler
        champion = self.champion()
        if champion is None:
            if (self.baseline and sched.pooled and sched.background and self._confirming == 0
                    and self.board.get("jobs", f"baseline-{self.baseline.ref}", JobRecord) is None):
                self._submit_background(nursery, Purpose.BASELINE, self.baseline, "baseline",
                                        sched.promote_seeds, f"baseline-{self.baseline.ref}")
            return
        state = self._confirmation(champion)
        if state in ("met", "not_met"):
            return
        decisive = state == "" and wilson_interval(champion.judged_successes, champion.judged_n)[1] >= self.config.fleet.target
        if not (decisive or sched.background):
            return
        # Jobs of a few episodes per cell: each judging job runs in a sandbox jail of its own (a start-up
        # cost), and the sequential rule is checked as each job ends.
        batch = CONFIRM_EPISODES_PER_CELL * max(1, self.cells)
        while self._confirming < 2 * batch:
            self._submit_background(nursery, Purpose.CONFIRM, champion.policy, champion.agent, batch,
                                    priority=PRIORITY["decisive" if decisive else "background"])

    def _submit_background(self, nursery, purpose: Purpose, policy: PolicySpec, agent: str, n: int,
                           job_id: str = "", priority: int = PRIORITY["background"]) -> None:
        try:
            seeds = self._draw(self.task, n)
        except PoolExhausted as e:
            self.log.warning("heldout_pool_exhausted", detail=str(e))
            self._confirming = math.inf  # nothing more to draw: no more background work
            return
        job_id = job_id or f"{purpose.value}-{policy.ref}-{seeds[0]}"
        spec = JobSpec(job_id=job_id, agent=agent, task=self.task, policy=policy, seeds=seeds, purpose=purpose,
                       priority=priority)
        self._confirming += len(seeds)
        self._background.add(job_id)
        nursery.start_soon(self._background_job, spec)

    async def _background_job(self, spec: JobSpec) -> None:
        try:
            done = await self._run(spec)
        finally:
            self._confirming -= len(spec.seeds)
            self._background.discard(spec.job_id)
        if not done.cancelled:
            await (self._baseline_judged if spec.purpose is Purpose.BASELINE else self._confirmed)(spec, done)
        self._changed.set()

    async def _baseline_judged(self, spec: JobSpec, done: JobDone) -> None:
        if self.champion() is not None:
            return  # a promotion came first; the baseline's episodes stay recorded
        s = sum(e.success for e in done.episodes)
        await self._crown(Champion(spec.task, spec.policy, judged_successes=s, judged_n=len(done.episodes),
                                   promoted=time.time(), agent="baseline"))
        self.log.info("baseline_judged", policy=spec.policy.ref, judged=f"{s}/{len(done.episodes)}")

    async def _confirmed(self, spec: JobSpec, done: JobDone) -> None:
        champion = self.champion()
        if champion is None or champion.policy != spec.policy:
            return  # the champion changed while this ran: the episodes stay recorded, not counted
        champion.successes += sum(e.success for e in done.episodes)
        champion.n += len(done.episodes)
        sched = self.config.scheduler
        if (champion.previous is not None and champion.n >= sched.rollback_min_n
                and better_with_confidence(champion.previous_successes, champion.previous_n, champion.successes,
                                           champion.n, sched.alpha)):
            self.log.warning("champion_rolled_back", task=champion.task, policy=champion.policy.ref,
                             confirmed=f"{champion.successes}/{champion.n}", back_to=champion.previous.ref)
            await self._crown(Champion(champion.task, champion.previous, judged_successes=champion.previous_successes,
                                       judged_n=champion.previous_n, promoted=time.time(), agent="rollback"))
            return
        decision = self._confirmation(champion)
        champion.decision = decision if decision in ("met", "not_met") else ""
        self.board.put("champion", champion.task, champion)
        self._publish(champion)
        if champion.decision in ("met", "not_met"):
            for job_id in list(self._background):  # what is still queued of it is not needed
                await self.queue.ask(CancelJob(job_id=job_id))
            self.log.info("confirmation_stopped", policy=champion.policy.ref, decision=champion.decision,
                          confirmed=f"{champion.successes}/{champion.n}")

    def _confirmation(self, c: Champion) -> str:
        """The sequential rule on the champion's confirmation so far ("met" can end the run)."""
        return "met" if c.decision == "met" else sprt(
            c.successes, c.n, self.config.fleet.target, self.config.scheduler.alpha, BETA,
            min_n=self.config.fleet.min_heldout, max_n=5 * self.config.fleet.min_heldout)

    # ------------------------------------------------------------------ smoke tests, final judging

    async def _smoke(self, policy: PolicySpec) -> None:
        record = self.board.get("smoke", policy.ref, SmokeRecord)
        if record is None:
            seeds = list(self.config.task().tuning_seeds.seeds()[: self.config.scheduler.smoke_seeds])
            done = await self._run(JobSpec(job_id=f"smoke-{policy.ref}", agent="smoke", task=self.task, policy=policy,
                                           seeds=seeds, purpose=Purpose.SMOKE, priority=PRIORITY["smoke"]))
            faults = [e.reason for e in done.episodes if e.reason.startswith(SMOKE_FAULTS)]
            wins = sum(e.success for e in done.episodes)
            detail = f"{wins}/{len(done.episodes)} succeeded" + (f"; faults: {faults[:3]}" if faults else "")
            record = SmokeRecord(policy, not faults and wins > 0, detail, time.time())
            self.board.put("smoke", policy.ref, record)
            self.log.info("smoke_tested", policy=policy.ref, passed=record.passed, detail=detail)
        await self.queue.ask(Clearance(policy=policy, passed=record.passed))

    async def _final(self, msg: FinalJudging) -> Message:
        """The starting policy and the champion on the same fresh held-out seeds (paired), with priority."""
        start = self.baseline or self.board.get("meta", "start", PolicySpec)
        if start is None:
            return Failure(error="no starting policy: no baseline and no agent evaluated anything")
        champion = self.champion()
        try:
            seeds = self._draw(msg.task, msg.seeds)
        except PoolExhausted as e:
            return Failure(error=str(e))
        policies = [start] + ([champion.policy] if champion and champion.policy != start else [])
        results: dict[str, JobDone] = {}

        async def judge(policy: PolicySpec) -> None:
            results[policy.ref] = await self._run(JobSpec(
                job_id=f"final-{policy.ref}-{seeds[0]}", agent="final", task=msg.task, policy=policy, seeds=seeds,
                purpose=Purpose.FINAL, priority=PRIORITY["final"]))
        async with trio.open_nursery() as nursery:
            for policy in policies:
                nursery.start_soon(judge, policy)
        tally = {ref: (sum(e.success for e in d.episodes), len(d.episodes)) for ref, d in results.items()}
        best = champion.policy if champion else None
        (s0, n0), (s1, n1) = tally[start.ref], tally[best.ref] if best else (0, 0)
        record = FinalRecord(msg.task, seeds, start, s0, n0, best, s1, n1, time.time())
        self.board.put("meta", "final", record)
        self.log.info("final_judging", start=start.ref, start_judged=f"{s0}/{n0}",
                      champion=best.ref if best else "", champion_judged=f"{s1}/{n1}")
        return FinalResult(task=msg.task, seeds=seeds, start=start, start_successes=s0, start_n=n0, champion=best,
                           champion_successes=s1, champion_n=n1)

    # ------------------------------------------------------------------ the held-out pool, jobs, events

    def _draw(self, task: str, k: int) -> list[int]:
        """The next `k` held-out seeds never drawn before (the pool's cursor is durable)."""
        pool = self.config.task(task).heldout_seeds
        with self.board.write() as w:
            record = w.get("heldout", task, HeldoutRecord) or HeldoutRecord(task)
            if record.used + k > pool.count:
                raise PoolExhausted(f"held-out pool of task {task!r} exhausted: {record.used} of {pool.count} "
                                    f"seeds used, {k} more needed (raise tasks.{task}.heldout_seeds.count)")
            seeds = list(range(pool.start + record.used, pool.start + record.used + k))
            record.used, record.draws = record.used + k, record.draws + 1
            w.put("heldout", task, record)
        self._publish_pool(record)
        return seeds

    def _publish_pool(self, record: HeldoutRecord) -> None:
        total = self.config.task(record.task).heldout_seeds.count
        need = self.config.scheduler.promote_seeds + self.config.fleet.min_heldout
        low = total - record.used < need
        self.events.publish(HeldoutUsage(task=record.task, used=record.used, total=total, low=low, t=time.time()))
        if low:
            self.log.warning("heldout_pool_low", task=record.task, used=record.used, total=total, need=need)

    async def _run(self, spec: JobSpec) -> JobDone:
        """Submit a job and wait for it; a restart of the queue is answered by submitting again (idempotent)."""
        while True:
            reply = await self.queue.ask(SubmitJob(job=spec), timeout=math.inf)
            if isinstance(reply, JobDone):
                return reply
            self.log.warning("job_resubmitted", job=spec.job_id, reply=str(reply)[:200])
            await trio.sleep(0.5)

    def champion(self) -> Champion | None:
        return self.board.get("champion", self.task, Champion)

    def _publish(self, c: Champion) -> None:
        self.events.publish(ChampionChanged(
            task=c.task, policy=c.policy, agent=c.agent, judged_successes=c.judged_successes, judged_n=c.judged_n,
            successes=c.successes, n=c.n, decision=c.decision, t=time.time()))
        self._changed.set()


def _key(task: str, policy: PolicySpec) -> str:
    return f"{task}/{policy.ref}"


def _fields(spec: JobSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__struct_fields__}


def _spec(record: JobRecord) -> JobSpec:
    return JobSpec(job_id=record.job_id, agent=record.agent, task=record.task, policy=record.policy,
                   seeds=list(record.seeds), purpose=record.purpose, attempts=record.attempts, priority=record.priority)
