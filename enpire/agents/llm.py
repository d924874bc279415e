"""The model agent loop: ask the model, run its tool calls through the registry, pace the next turn.

What the model sees each turn is bounded whatever the team size: a fixed system prompt and task card, a
window of its own turns (older ones leave one journal line each), and a briefing with the summarizer's
digest (never every peer's findings). A turn's tool calls that touch the agent's branch run in the order
the model wrote them; fleet work (evaluate, promote, train) returns a job id at once and its result comes
through the session's job journal. Between turns the loop sleeps without calling the model while the
agent's experiments run (see `_settle`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import structlog
import trio

from bus.backoff import backoff_delay
from bus.records import TokenRecord
from enpire import ledger
from enpire.agents import budget
from enpire.agents.model import (
    LLMConfigError,
    ModelClient,
    ModelError,
    ModelReply,
    Prompt,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Turn,
    scrub,
    sdk_error,
    truncate,
)
from enpire.agents.pacing import Pacer
from enpire.agents.prompt import SYSTEM, Window, briefing, build_prompt, journal_line
from enpire.agents.registry import REGISTRY, Session, SessionSettings, open_session
from enpire.agents.tool_fleet import EvaluateArgs
from enpire.agents.tools import Tools
from enpire.tasks import TaskCard

__all__ = ["LLMAgent", "LLMConfigError", "LLMSettings", "ModelError", "TOOL_SPECS", "scrub"]

TOOL_SPECS: list[ToolSpec] = [ToolSpec(t.name, t.description, t.schema()) for t in REGISTRY]
NUDGE = "Continue: act through the tools (evaluate, wait, post_finding, promote …)."
TRUNCATED = ("Your reply was cut off at the output limit ({n} tokens) and its tool calls were not run. Make smaller "
             "steps: edit a few lines instead of rewriting a file.")
REFUSED = "Your reply was a refusal; nothing was run. Continue with the task through the tools."
EXPERIMENTS = ("evaluate", "promote", "train")


@dataclass(frozen=True)
class LLMSettings:
    max_output_tokens: int = 4096
    max_output_ceiling: int = 16384  # a reply cut off at the limit is asked again with twice the limit, up to this
    token_budget: int = 0  # input + output tokens this agent may use; 0 = no limit
    wall_budget_s: float = 0.0  # seconds from the agent's first model call; 0 = no limit
    max_turns_window: int = 40  # own turns kept verbatim; past it (or context_chars) the oldest half leaves
    context_chars: int = 120_000
    journal_lines: int = 12  # one-line records of older turns kept in the briefing
    max_failures: int = 5  # consecutive failed calls before the backend pauses
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    pause_s: float = 300.0
    target: float = 0.0  # the fleet's target success; while the champion meets it the agent makes no calls
    leaderboard: int = 5  # the team's best candidates shown in every briefing (0 = none)
    # Paced turns (a pooled fleet): the next model call starts once some of the last turn's experiments have
    # results and the fleet's queue holds fewer than this many episodes per cell, counting teammates about to
    # ask. 0: every turn waits for all its results (the paper's agents).
    pace_per_cell: float = 0.0
    price: ledger.Price | None = None  # this model's prices: the ledger records each call's cost
    shutdown_grace_s: float = 10.0  # a request in flight when the fleet stops may still answer (and be billed)
    tools: SessionSettings = field(default_factory=SessionSettings)


def _episodes(calls: Sequence[ToolCall]) -> int:
    """Episodes a turn's evaluate calls ask for (as the registry will read them)."""
    n = 0
    for c in calls:
        if c.name == "evaluate":
            try:
                n += msgspec.json.decode(c.arguments or "{}", type=EvaluateArgs).n_seeds
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass
    return n


class LLMAgent:
    """A backend (`async run(tools)`) driven by a model through a `ModelClient`."""

    def __init__(self, client: ModelClient, settings: LLMSettings, *, card: TaskCard, tuning_seeds: range,
                 rng_seed: int, clock: Callable[[], float] = time.time, probe: bool = True):
        self.client = client
        self.settings = settings
        self.system = SYSTEM
        self.card = card
        self.tuning_seeds = tuning_seeds
        self.rng_seed = rng_seed
        self.clock = clock
        self.probe = probe
        self.window = Window(settings.max_turns_window, settings.context_chars, settings.journal_lines)
        self.turns, self.journal = self.window.turns, self.window.journal
        self.last_prompt_chars = 0
        self.expected = 10  # episodes the next turn will likely ask for (teammates count them while it thinks)
        self.pacer = Pacer(settings.pace_per_cell, clock)  # turns admitted by the fleet's queue
        self.launched: list[str] = []  # job ids the last turn started

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in self.client.secrets if s)

    async def run(self, tools: Tools) -> None:
        async with open_session(tools, self.settings.tools, self.card, self.tuning_seeds, rng_seed=self.rng_seed,
                                secrets=self.secrets) as session:
            await self.drive(session)

    async def drive(self, session: Session) -> None:
        tools = session.tools
        log = structlog.get_logger().bind(actor=tools.agent, model=self.client.model)
        if self.probe:
            try:
                usage = await self.client.probe()
            except LLMConfigError as e:  # a wrong model name or key: asking again will not help
                log.error("model_unusable", error=scrub(str(e), self.secrets))
                return
            if usage is not None:
                await self._bill(tools, ModelReply("", [], usage))
        # The ledger is durable: after a restart the agent goes on with what it already spent.
        own = [r for r in tools.board.values("tokens", TokenRecord) if r.agent == tools.agent]
        used = ledger.totals(own).total
        started = min((r.t for r in own), default=None)
        while True:
            await trio.lowlevel.checkpoint()  # a client that answers without I/O must not starve the others
            await self._settle(session)
            now = self.clock()
            started = started if started is not None else now
            reason = budget.exhausted(self.settings.token_budget, self.settings.wall_budget_s, used, now - started)
            if reason:
                await budget.stop(tools, log, reason, used, now - started)
                return
            if budget.team_goal_met(tools, self.settings.target):
                self._hold(tools, 0, 0.0)
                while budget.team_goal_met(tools, self.settings.target):  # until confirmation disagrees
                    await tools.champion_changed(timeout=60.0)
                continue
            results = session.jobs.unseen()
            brief = briefing(session, budget_line=budget.line(self.settings.token_budget, self.settings.wall_budget_s, used,
                                                             now - started), journal=list(self.journal),
                             results=results, running=len(session.jobs.running()), leaders=self.settings.leaderboard)
            prompt = build_prompt(self.system, self.card.render(), self.turns, brief)
            self.last_prompt_chars = prompt.chars()
            reply, spent = await self._ask(prompt, used, tools, log)
            used += spent
            if reply is None:  # too many failures: pause (its room in the queue went at the first failure)
                await trio.sleep(self.settings.pause_s)
                continue
            session.jobs.mark_seen([j.job_id for j in results])  # shown in a request that got an answer
            self.expected = _episodes(reply.calls) or self.expected
            if reply.stop == "refusal":
                log.warning("model_refused", text=truncate(scrub(reply.refusal or reply.text, self.secrets), 300))
                turn = Turn(reply, [], REFUSED)
                self.journal.append(journal_line(turn))  # surfaced at once, not only when the turn leaves the window
                self.window.add(turn)
                continue
            if reply.stop == "max_tokens":  # still cut off at the ceiling: never run a truncated call
                self.window.add(Turn(ModelReply(reply.text, [], reply.usage, reply.stop, reply.raw_stop), [],
                                  TRUNCATED.format(n=self.settings.max_output_ceiling)))
                continue
            self._hold(tools, self.expected, 2.0)  # until the scheduler's queue shows them
            outputs = await self._dispatch(session, reply.calls, log)
            self.window.add(Turn(reply, outputs, "" if reply.calls else NUDGE))

    # ------------------------------------------------------------------ one model call

    async def _ask(self, prompt: Prompt, used: int, tools: Tools, log) -> tuple[ModelReply | None, int]:
        """Ask until an answer that is not cut off (doubling the output limit up to the ceiling); every
        answered call goes to the ledger. Returns (reply or None when paused, tokens spent)."""
        s = self.settings
        cap, spent = s.max_output_tokens, 0
        while True:
            max_out = cap
            if s.token_budget:
                max_out = max(1, min(cap, s.token_budget - used - spent))
            reply = await self._call_billed(prompt, max_out, tools, log)
            if reply is None:
                return None, spent
            spent += reply.usage.total
            log.info("llm_turn", prompt_chars=self.last_prompt_chars, input_tokens=reply.usage.input_tokens,
                     cached_input_tokens=reply.usage.cached_input_tokens,
                     cache_write_tokens=reply.usage.cache_write_tokens, output_tokens=reply.usage.output_tokens,
                     reasoning_tokens=reply.usage.reasoning_tokens, tools=[c.name for c in reply.calls],
                     stop=reply.stop, raw_stop=reply.raw_stop)
            if reply.stop != "max_tokens" or cap >= s.max_output_ceiling or max_out < cap:
                return reply, spent
            log.info("llm_reask", reason="output limit", max_output_tokens=cap * 2)
            cap = min(s.max_output_ceiling, cap * 2)

    async def _call_billed(self, prompt: Prompt, max_out: int, tools: Tools, log) -> ModelReply | None:
        """`_call`, billed on the ledger as soon as it answers. The call is shielded from cancellation: a
        fleet that stops while a request is in flight gives it `shutdown_grace_s` to answer, so a reply the
        provider charges for is still recorded."""
        box: dict = {}
        answered, shield = trio.Event(), trio.CancelScope(shield=True)

        async def call() -> None:
            with shield:
                box["reply"] = reply = await self._call(prompt, max_out, tools, log)
                if reply is not None:
                    await self._bill(tools, reply)
            answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            try:
                await answered.wait()
            except trio.Cancelled:
                shield.deadline = trio.current_time() + self.settings.shutdown_grace_s
                raise
        return box.get("reply")

    async def _bill(self, tools: Tools, reply: ModelReply) -> None:
        await tools.record_tokens(reply.usage.ledger_record(tools.agent, self.client.model, time.time(), self.settings.price))

    async def _call(self, prompt: Prompt, max_out: int, tools: Tools, log) -> ModelReply | None:
        """Call the model until it answers: back off on errors; None (the caller pauses) after too many in a
        row or on a non-retryable error (a request refused as it is: the window starts afresh). A failed call
        gives back the room its turn held: backing off or paused, the agent asks the fleet for nothing, and
        its teammates must not wait on it (the robots would run dry)."""
        failures = 0
        while True:
            try:
                return await self.client.complete(prompt, TOOL_SPECS, max_out)
            except ModelError as e:
                err = e
            except Exception as e:  # noqa: BLE001 - e.g. a malformed body the SDK could not parse
                err = sdk_error(e, self.secrets)
            failures += 1
            if failures == 1:
                self._hold(tools, 0, 0.0)
            error = scrub(str(err), self.secrets)
            if err.bad_request and self.turns:
                self.window.drop(len(self.turns))  # the request itself is refused (too long, odd history): start afresh
            if not err.retryable or failures >= self.settings.max_failures:
                log.warning("backend_paused", failures=failures, pause_s=self.settings.pause_s, error=error,
                            retryable=err.retryable)
                return None
            delay = backoff_delay(failures, self.settings.backoff_initial_s, self.settings.backoff_max_s,
                                  retry_after=err.retry_after, retry_after_max=self.settings.retry_after_max_s)
            log.info("llm_retry", failures=failures, delay_s=round(delay, 3), error=error)
            await trio.sleep(delay)

    # ------------------------------------------------------------------ tool calls

    async def _dispatch(self, session: Session, calls: Sequence[ToolCall], log) -> list[ToolOutput]:
        """Ordered calls (branch, jobs) one after another in the model's order; the others beside them."""
        outputs: list[ToolOutput | None] = [None] * len(calls)
        before = set(session.jobs.jobs)

        async def one(i: int) -> None:
            c = calls[i]
            result = await REGISTRY.call(session, c.name, c.arguments)
            if result.is_error:
                log.info("tool_error", tool=c.name, error=truncate(result.text, 200))
            outputs[i] = ToolOutput(c.id, c.name, result.text, result.is_error, result.images)

        async def lane(indices: list[int]) -> None:
            for i in indices:
                await one(i)

        ordered = [i for i, c in enumerate(calls) if (t := REGISTRY.get(c.name)) is not None and t.ordered]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lane, ordered)
            for i in range(len(calls)):
                if i not in ordered:
                    nursery.start_soon(one, i)
        self.launched = [j for j in session.jobs.jobs if j not in before]
        return [o for o in outputs if o is not None]

    # ------------------------------------------------------------------ pacing

    async def _settle(self, session: Session) -> None:
        """Wait, without calling the model, until the next turn is worth a call.

        Nothing launched by the last turn: go on (a reply without tool calls while jobs run sleeps until one
        finishes instead of being nudged at once). Unpaced: until all of the last turn's jobs finished.
        Paced: once one of them produced a result (a refusal or crash is not one) and the fleet admits a
        turn (`Pacer.admit`): robots do not wait for the model while its last episodes run."""
        jobs = session.jobs
        last = self.turns[-1] if self.turns else None
        if last is not None and not last.reply.calls and jobs.running() and not jobs.unseen():
            await jobs.changed()  # it has nothing to do until a result is in: no nudge, no call meanwhile
        mine = [jobs.jobs[j] for j in self.launched if j in jobs.jobs]
        self.launched = []
        pace = self.settings.pace_per_cell
        if not mine and not pace:
            return
        while True:
            running = [j for j in mine if j.state == "running"]
            done = not running or (pace and any(j.experiment for j in mine))
            if done and (not pace or self.pacer.admit(session.tools, self.expected)):
                return
            # Checked again when something changes: a result, the fleet's queue (an event), a teammate's
            # hold lapsing. Without a fleet's events (a bare Tools), every 0.25 s.
            wait = max(0.0, self.pacer.lapse - self.clock()) if session.tools.events else 0.25
            async with trio.open_nursery() as race:
                async def first(wake) -> None:
                    await wake()
                    race.cancel_scope.cancel()
                race.start_soon(first, jobs.changed)
                race.start_soon(first, lambda wait=wait: session.tools.room_changed(wait))

    def _hold(self, tools: Tools, episodes: int, seconds: float) -> None:
        if self.settings.pace_per_cell:
            self.pacer.hold(tools, episodes, seconds)
