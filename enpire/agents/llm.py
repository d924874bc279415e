"""Model-driven agent backends: the tool protocol, its dispatcher, a bounded context and the agent loop.

The model acts only through `Tools` (the surface the built-in researcher uses too). What it sees each
turn is bounded whatever the team size: a fixed system prompt, a briefing with the summarizer's digest
(never every peer's findings), a short journal of its own older actions, and a sliding window of its
last turns with every tool output cut to a fixed length. Peers' raw findings are only a tool away
(`read_findings`, capped).

Provider specifics (wire format, usage fields, SDK errors) live in `anthropic_backend.py` and
`openai_backend.py`; both fill the small `ModelClient` protocol below.
"""

from __future__ import annotations

import random
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import msgspec
import structlog
import trio
from msgspec import Meta

from bus.messages import EvalResult, PolicySpec
from bus.records import CandidateRecord, Finding, QueueRecord, TokenRecord, TurnHold
from enpire import leaderboard, ledger
from enpire.agents.tools import Tools, failure_summary, fingerprint

# ----------------------------------------------------------------------------- conversation values


@dataclass(frozen=True)
class Usage:
    """Tokens of one model call. input_tokens includes the cached ones (the same rule for every provider)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it (it may be invalid: the dispatcher says so)


@dataclass(frozen=True)
class ModelReply:
    text: str
    calls: list[ToolCall]
    usage: Usage
    stop: str = ""


@dataclass(frozen=True)
class ToolOutput:
    call_id: str
    name: str
    content: str
    is_error: bool = False


@dataclass(frozen=True)
class Turn:
    """One model reply and what came back to it (tool outputs, or a nudge when it called no tool)."""

    reply: ModelReply
    outputs: list[ToolOutput]
    nudge: str = ""


@dataclass(frozen=True)
class Prompt:
    system: str
    briefing: str  # the first user message, rebuilt every call (digest, champion, budget, journal)
    turns: list[Turn]

    def chars(self) -> int:
        """Size of what is sent, in characters (a provider-independent proxy for input tokens)."""
        n = len(self.system) + len(self.briefing)
        for t in self.turns:
            n += len(t.reply.text) + len(t.nudge)
            n += sum(len(c.name) + len(c.arguments) for c in t.reply.calls)
            n += sum(len(o.content) for o in t.outputs)
        return n


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object


class ModelError(Exception):
    """A failed model call, already scrubbed of secrets. `retryable` False means retrying as-is won't help."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float | None = None,
                 auth: bool = False, bad_request: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.auth = auth
        self.bad_request = bad_request


class LLMConfigError(ValueError):
    """A backend cannot start (e.g. its key variable is unset); one line naming the variable, never a value."""


class ModelClient(Protocol):
    model: str
    secrets: tuple[str, ...]  # values to scrub from every text the agent logs or posts

    async def complete(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> ModelReply: ...


# ----------------------------------------------------------------------------- secrets


# Header-shaped or key-shaped text an error body might echo back.
_SECRETISH = re.compile(
    r"(?i)(bearer\s+[A-Za-z0-9._~+/=\-]+"
    r"|(x-api-key|api[_-]?key|authorization)[\"']?\s*[:=]\s*[\"']?(bearer\s+)?[^\s,\"'}]+"
    r"|sk-[A-Za-z0-9_\-]{8,})"
)


def scrub(text: str, secrets: Sequence[str] = (), *, headers: bool = True) -> str:
    """Replace the secrets' values and, with `headers`, anything shaped like an auth header or key.

    Tool outputs (policy code, notes) are scrubbed with headers=False so that code is never mangled;
    error texts, logs and findings get both."""
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
    return _SECRETISH.sub("[redacted]", text) if headers else text


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 40)] + f"\n…[cut: {len(text) - limit + 40} more chars]"


def sdk_error(e: Exception, secrets: Sequence[str]) -> ModelError:
    """Classify an exception from either SDK (both are generated alike: status_code, response.headers)."""
    message = truncate(scrub(f"{type(e).__name__}: {e}", secrets), 400)
    status = getattr(e, "status_code", None)
    if isinstance(status, int):
        retry_after = None
        response = getattr(e, "response", None)
        headers = getattr(response, "headers", None) or {}
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                retry_after = float(headers.get(name)) * scale
                break
            except (TypeError, ValueError):
                continue
        if status in (401, 403):
            return ModelError(message, retryable=False, auth=True)
        if status in (408, 409, 429) or status >= 500:
            return ModelError(message, retry_after=retry_after)
        return ModelError(message, retryable=False, bad_request=True)
    return ModelError(message)  # timeouts, dropped connections, unparsable bodies: try again


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LLMSettings:
    max_output_tokens: int = 4096
    token_budget: int = 0  # input + output tokens this agent may use; 0 = no limit
    wall_budget_s: float = 0.0  # seconds from the agent's first model call; 0 = no limit
    max_turns_window: int = 6  # own turns kept verbatim in the context
    journal_lines: int = 12  # one-line records of older turns kept in the briefing
    tool_output_chars: int = 3000
    digest_chars: int = 3000
    max_eval_seeds: int = 50
    max_findings: int = 20  # cap of read_findings
    notes_dir: str = ""
    max_failures: int = 5  # consecutive failed calls before the backend pauses
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    pause_s: float = 300.0
    target: float = 0.0  # the fleet's target success; while the champion meets it the agent makes no calls
    digest: bool = True  # False (ablation): the briefing lists every peer finding instead of the digest
    leaderboard: int = 5  # the team's best candidates shown in every briefing (0 = none)
    # Paced turns (a pooled fleet): the next model call starts once some results are in and the fleet's
    # queue holds fewer than this many episodes per cell, counting teammates about to ask; calls still
    # running then report later. 0: every turn waits for all its results (the paper's agents).
    pace_per_cell: float = 0.0
    horizon: int = 300  # the task's episode length, for the leaderboard's score


# ----------------------------------------------------------------------------- tool protocol


class _Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ReadFilesArgs(_Args):
    commit: Annotated[str, Meta(description="commit id; empty = your branch head (or main)")] = ""
    paths: Annotated[list[str], Meta(description="only these files; empty = all")] = []


class CommitArgs(_Args):
    files: Annotated[dict[str, str | None], Meta(description="path -> full new text; null deletes the file")]
    message: Annotated[str, Meta(min_length=1, max_length=500)]


class EvaluateArgs(_Args):
    commit: Annotated[str, Meta(description="commit id; empty = your branch head")] = ""
    params: Annotated[dict[str, float], Meta(description="passed to Policy(params)")] = {}
    n_seeds: Annotated[int, Meta(ge=1, le=200, description="episodes on tuning seeds the harness picks")] = 10
    attempts: Annotated[int, Meta(ge=1, le=5, description="k of pass@k")] = 1


class PromoteArgs(_Args):
    commit: Annotated[str, Meta(description="commit id; empty = your branch head")] = ""
    params: dict[str, float] = {}


class NoArgs(_Args):
    pass


class ReadFindingsArgs(_Args):
    limit: Annotated[int, Meta(ge=1, le=50)] = 10


class PostFindingArgs(_Args):
    hypothesis: Annotated[str, Meta(min_length=1, max_length=1000)]
    change: Annotated[str, Meta(min_length=1, max_length=1000)]
    evidence: Annotated[str, Meta(min_length=1, max_length=2000)]
    outcome: Literal["improved", "no_change", "worse", "inconclusive", "note"]


class FailureSummaryArgs(_Args):
    job: Annotated[str, Meta(description="job id an evaluate call returned")]


class SearchNotesArgs(_Args):
    query: Annotated[str, Meta(min_length=1, max_length=200)]
    limit: Annotated[int, Meta(ge=1, le=10)] = 5


_TOOLS: dict[str, tuple[type[_Args], str]] = {
    "read_files": (ReadFilesArgs, "Read policy files of a commit of the workspace."),
    "commit": (CommitArgs, "Write files to your own branch and commit; returns the commit id (the policy reference). "
               "Protected paths (verifier, reset, eval, seeds, safety) are refused."),
    "evaluate": (EvaluateArgs, "Run the policy on tuning seeds chosen by the harness; returns successes, a failure "
                 "summary and a job id when the episodes finish, or 'still running' when the fleet needs your next "
                 "decision first (the result then comes under Late results)."),
    "promote": (PromoteArgs, "Ask for the candidate to be judged against the champion on held-out seeds you never see."),
    "read_digest": (NoArgs, "The team digest (condensed findings of all agents) and the champion."),
    "read_findings": (ReadFindingsArgs, "The latest raw findings of the team, newest last (capped)."),
    "post_finding": (PostFindingArgs, "Share what you learned with the team."),
    "failure_summary": (FailureSummaryArgs, "Per-episode outcomes of one of your evaluation jobs."),
    "search_notes": (SearchNotesArgs, "Keyword search over the local research notes; returns snippets."),
}


def _schema(args: type[_Args]) -> dict[str, Any]:
    schema = msgspec.json.schema(args)
    body = dict(schema["$defs"][args.__name__])
    body.pop("title", None)
    return body


TOOL_SPECS: list[ToolSpec] = [ToolSpec(name, text, _schema(args)) for name, (args, text) in _TOOLS.items()]


# What the model is told about each driver's task (observations, actions, success); the lead may extend it.
TASK_TEXTS = {
    "pusht": "Push-T (gym-pusht, state observations): push the T-shaped block onto the goal pose with a round "
    "pusher. obs = [agent_x, agent_y, block_x, block_y, block_angle] (the block position is the centre of "
    "the top edge of the T bar); action = absolute target [x, y] in [0, 512]^2 for the PD-controlled "
    "pusher, 10 Hz, 300 steps; the change between consecutive actions is limited. Success: the block "
    "covers more than 95% of the goal area. Score = coverage (progress in [0, 1]).",
}


POLICY_PROTOCOL = """\
A policy is the file policy.py in the workspace, defining
    class Policy:
        def __init__(self, params: dict[str, float]): ...
        def reset(self) -> None: ...          # called at the start of every episode
        def act(self, obs) -> action: ...     # called every control step; must be fast
        def on_failure(self, info) -> None: ...  # pass@k: told why the previous attempt failed
It runs in a sandbox that sees only observations (numpy and math are available); every action is
checked for shape, finiteness, bounds and per-step change, and a violation ends the episode."""


def system_prompt(task_text: str) -> str:
    return (
        "You are a member of a team of agents improving a robot manipulation policy in a closed loop "
        "(reset, run, verify, record, refine). You act only through the tools.\n\n"
        f"## Task\n{task_text}\n\n## Policy protocol\n{POLICY_PROTOCOL}\n\n"
        "## How to work\n"
        "- Read the current files, commit an improved policy to your branch, evaluate it, read failure "
        "summaries, post a finding (hypothesis, change, evidence, outcome) after every experiment.\n"
        "- The team digest tells you what peers tried; do not repeat a change they already tested.\n"
        "- Promote a candidate only when its evaluations beat the champion; promotion is judged on "
        "held-out seeds you never see. The verifier alone decides success.\n"
        "- Every call costs tokens from a fixed budget: be brief."
    )


# ----------------------------------------------------------------------------- notes


def search_notes(root: Path, query: str, limit: int = 5, snippet_chars: int = 400,
                 max_files: int = 500, max_bytes: int = 1_000_000) -> list[str]:
    """Paragraphs of *.md / *.txt / *.rst files under `root` ranked by how many query words they contain."""
    words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1]
    if not words or not root.is_dir():
        return []
    scored: list[tuple[float, str]] = []
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".md", ".txt", ".rst") and p.is_file())
    for path in files[:max_files]:
        try:
            text = path.read_bytes()[:max_bytes].decode("utf-8", errors="replace")
        except OSError:
            continue
        for para in re.split(r"\n\s*\n", text):
            low = para.lower()
            hits = sum(low.count(w) for w in words)
            distinct = sum(w in low for w in words)
            if distinct:
                rel = path.relative_to(root)
                scored.append((distinct * 10 + hits, f"{rel}: {truncate(para.strip(), snippet_chars)}"))
    scored.sort(key=lambda s: -s[0])
    return [s for _, s in scored[:limit]]


# ----------------------------------------------------------------------------- dispatcher


class _Refused(Exception):
    """A tool call the dispatcher turns down with a reason the model can act on."""


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


@dataclass
class Dispatcher:
    """Maps one tool call to `Tools`; every problem becomes an error output, never an exception."""

    tools: Tools
    settings: LLMSettings
    tuning_seeds: range
    rng: random.Random  # picks tuning seeds: the model never names seeds, so it cannot touch held-out ones
    secrets: tuple[str, ...] = ()
    commits: list[str] = field(default_factory=list)  # full ids this agent saw, to resolve short ones
    jobs: dict[str, EvalResult] = field(default_factory=dict)
    policies_on_main: dict[str, bool] = field(default_factory=dict)  # main's commits: has it a policy.py?

    async def __call__(self, call: ToolCall) -> ToolOutput:
        limit = self.settings.tool_output_chars
        try:
            if call.name not in _TOOLS:
                raise _Refused(f"unknown tool {call.name!r}; tools: {', '.join(_TOOLS)}")
            args_type = _TOOLS[call.name][0]
            try:
                args = msgspec.json.decode(call.arguments or "{}", type=args_type)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise _Refused(f"bad arguments for {call.name}: {e}") from None
            content = await getattr(self, "_" + call.name)(args)
            return ToolOutput(call.id, call.name, truncate(scrub(content, self.secrets, headers=False), limit))
        except Exception as e:  # the model sees the error and may correct itself; the agent goes on
            text = str(e) if isinstance(e, _Refused) else f"{type(e).__name__}: {e}"
            return ToolOutput(call.id, call.name, truncate(scrub(text, self.secrets), limit), is_error=True)

    def _remember(self, commit: str) -> None:
        if commit and commit not in self.commits:
            self.commits.append(commit)
            del self.commits[:-200]

    def _resolve(self, commit: str) -> str:
        if not commit:  # your branch head; a new branch starts from main (a baseline or the champion)
            head = self.tools.workspace.head(self.tools.branch) or self._main_policy()
            if head is None:
                raise _Refused("your branch has no commit yet: commit a policy first")
            return head
        champion = self.tools.champion()
        known = [*self.commits, *(c for c in (self.tools.workspace.head(self.tools.branch),
                                              self.tools.workspace.head("main"),
                                              champion.policy.commit if champion else None) if c)]
        matches = {c for c in known if len(commit) >= 7 and c.startswith(commit)}
        if len(matches) != 1:
            raise _Refused(f"unknown commit {commit!r}: use an id returned by commit or read_files")
        return matches.pop()

    def _main_policy(self) -> str | None:
        main = self.tools.workspace.head("main")
        if main and main not in self.policies_on_main:
            self.policies_on_main[main] = "policy.py" in self.tools.workspace.read(main)
        return main if main and self.policies_on_main[main] else None

    async def _read_files(self, a: ReadFilesArgs) -> str:
        commit = self._resolve(a.commit) if a.commit else (
            self.tools.workspace.head(self.tools.branch) or self.tools.workspace.head("main") or "")
        files = await self.tools.read_files(commit)
        self._remember(commit)
        if a.paths:
            files = {p: files[p] for p in a.paths if p in files}
        # A checkpoint (e.g. weights.npz) is named with its size, never pasted into the context.
        binary = {p: f"{len(v)} bytes" for p, v in files.items() if isinstance(v, bytes)}
        text = {p: v for p, v in files.items() if isinstance(v, str)}
        return _json({"commit": commit, "files": text, **({"binary_files": binary} if binary else {})})

    async def _commit(self, a: CommitArgs) -> str:
        commit = await self.tools.commit(a.files, a.message)
        self._remember(commit)
        return _json({"commit": commit})

    async def _evaluate(self, a: EvaluateArgs) -> str:
        if a.n_seeds > self.settings.max_eval_seeds:
            raise _Refused(f"n_seeds is at most {self.settings.max_eval_seeds}")
        spec = PolicySpec(commit=self._resolve(a.commit), params=a.params)
        seeds = sorted(self.rng.sample(self.tuning_seeds, min(a.n_seeds, len(self.tuning_seeds))))
        result = await self.tools.evaluate(spec, seeds, a.attempts)
        self.jobs[result.job_id] = result
        while len(self.jobs) > 50:
            self.jobs.pop(next(iter(self.jobs)))
        n = len(result.episodes)
        return _json({"job": result.job_id, "policy": spec.ref, "successes": result.successes, "n": n,
                      "summary": failure_summary(result)})

    async def _promote(self, a: PromoteArgs) -> str:
        result = await self.tools.promote(PolicySpec(commit=self._resolve(a.commit), params=a.params))
        return _json({"promoted": result.promoted, "successes": result.successes, "n": result.n,
                      "champion_successes": result.champion_successes, "champion_n": result.champion_n,
                      "detail": result.detail})

    async def _read_digest(self, a: NoArgs) -> str:
        return briefing_state(self.tools, self.settings.digest_chars, self.settings.digest, self.settings.leaderboard,
                              self.settings.horizon)

    async def _read_findings(self, a: ReadFindingsArgs) -> str:
        limit = min(a.limit, self.settings.max_findings)
        with self.tools.board.read() as r:
            count = r.count("findings")
            start = f"{max(0, count - limit - 5):012d}"  # appended keys are sequence numbers: read the tail only
            latest = [f for _, f in r.items("findings", Finding, start=start)][-limit:]
        return "\n".join(f"[{f.agent} {f.outcome} {f.score:.0%}] {truncate(f.hypothesis, 200)} | "
                         f"{truncate(f.change, 200)} | {truncate(f.evidence, 200)}" for f in latest) or "no findings"

    async def _post_finding(self, a: PostFindingArgs) -> str:
        clean = [scrub(t, self.secrets) for t in (a.hypothesis, a.change, a.evidence)]
        finding = self.tools.post_finding(*clean, a.outcome, fingerprint=fingerprint(["llm", a.change]))
        return _json({"finding": finding.finding_id})

    async def _failure_summary(self, a: FailureSummaryArgs) -> str:
        result = self.jobs.get(a.job)
        if result is None:
            raise _Refused(f"no job {a.job!r} among your recent evaluations")
        lines = [failure_summary(result)]
        lines += [f"seed {e.seed}: {'success' if e.success else e.reason} score {e.score:.3f} steps {e.steps}"
                  for e in result.episodes[:40]]
        return "\n".join(lines)

    async def _search_notes(self, a: SearchNotesArgs) -> str:
        if not self.settings.notes_dir:
            return "no notes folder is configured"
        root = Path(self.settings.notes_dir)
        hits = await trio.to_thread.run_sync(search_notes, root, a.query, a.limit)
        return "\n---\n".join(hits) or "no matches"


# ----------------------------------------------------------------------------- context


def briefing_state(tools: Tools, digest_chars: int, digest: bool = True, leaders: int = 0, horizon: int = 300) -> str:
    champion = tools.champion()
    if digest:
        d = tools.digest()
        parts = ["## Team digest", truncate(d.text, digest_chars) if d else "(no findings yet)"]
    else:  # ablation: every finding of the team, one line each; the context grows with the team and the run
        lines = [f"[{f.agent} {f.outcome} {f.score:.0%}] {f.hypothesis} | {f.change} | {f.evidence}"
                 for f in tools.board.values("findings", Finding)]
        parts = ["## Team findings", "\n".join(lines) or "(no findings yet)"]
    if leaders:  # measured by the fleet, not reported by agents: build on these instead of repeating them
        records = tools.board.values("candidates", CandidateRecord, prefix=f"{tools.task}/")
        parts += ["## Team's best candidates (tuning seeds, all agents)", leaderboard.board_text(records, horizon, leaders)]
    if champion is not None:
        params = truncate(_json(champion.policy.params), 800)
        parts.append(f"## Champion\ncommit {champion.policy.commit} params {params}: judged "
                     f"{champion.judged_successes}/{champion.judged_n} held-out, confirmed {champion.successes}/{champion.n}")
    queue = tools.board.get("meta", "queue", QueueRecord)
    if queue is not None:  # capacity, so a request can be sized to what the robots can run soon
        parts.append(f"## Fleet\n{queue.cells} cells, {queue.waiting} episodes queued")
    return "\n".join(parts)


def build_prompt(system: str, tools: Tools, settings: LLMSettings, turns: Sequence[Turn],
                 journal: Sequence[str], budget_line: str, late: Sequence[str] = ()) -> Prompt:
    """Bounded by construction: fixed system text, a digest cut to size, a capped journal, N turns, and at
    most `LATE_RESULTS` late results."""
    parts = [
        briefing_state(tools, settings.digest_chars, settings.digest, settings.leaderboard, settings.horizon),
        f"## Your budget\n{budget_line}",
        "## Your earlier actions (oldest first)\n" + ("\n".join(journal) if journal else "(none)"),
    ]
    if late:
        parts.append("## Late results (calls of earlier turns that finished after them)\n" + "\n".join(late))
    briefing = "\n\n".join([*parts, "Decide the next step and act through the tools."])
    return Prompt(system, briefing, list(turns)[-settings.max_turns_window:])


def _journal_line(turn: Turn) -> str:
    if not turn.reply.calls:
        return truncate("said: " + " ".join(turn.reply.text.split()), 160)
    parts = []
    for call, out in zip(turn.reply.calls, turn.outputs, strict=False):
        result = " ".join(out.content.split())
        parts.append(f"{call.name}{' ERROR' if out.is_error else ''} -> {truncate(result, 100)}")
    return truncate("; ".join(parts), 240)


NUDGE = "Continue: act through the tools (evaluate, post_finding, promote …)."
STILL_RUNNING = "still running: the fleet needed your next decision first; the result comes under Late results"
LATE_RESULTS = 10


@dataclass
class _Running:
    """One turn's tool calls, run side by side so several evaluations share the fleet at once."""

    reply: ModelReply
    outputs: list[ToolOutput | None]
    settled: bool = False  # the turn was recorded: what finishes now is a late result

    @property
    def finished(self) -> int:
        return sum(o is not None for o in self.outputs)

    @property
    def results(self) -> int:
        """Finished experiments (evaluations, judgings): what a paced turn waits for before it thinks again."""
        return sum(o is not None and c.name in ("evaluate", "promote") for o, c in zip(self.outputs, self.reply.calls,
                                                                                        strict=True))


def _episodes(calls: Sequence[ToolCall]) -> int:
    """Episodes a turn's evaluate calls ask for (as the dispatcher will read them)."""
    n = 0
    for c in calls:
        if c.name == "evaluate":
            try:
                n += msgspec.json.decode(c.arguments or "{}", type=EvaluateArgs).n_seeds
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass
    return n


# ----------------------------------------------------------------------------- agent loop


class LLMAgent:
    """A backend (`async run(tools)`) driven by a model through a `ModelClient`."""

    def __init__(self, client: ModelClient, settings: LLMSettings, *, task_text: str, tuning_seeds: range,
                 rng_seed: int, clock: Callable[[], float] = time.time):
        self.client = client
        self.settings = settings
        self.system = system_prompt(task_text)
        self.tuning_seeds = tuning_seeds
        self.rng_seed = rng_seed
        self.clock = clock
        self.turns: deque[Turn] = deque(maxlen=settings.max_turns_window)
        self.journal: deque[str] = deque(maxlen=settings.journal_lines)
        self.late: deque[str] = deque(maxlen=LATE_RESULTS)
        self.last_prompt_chars = 0
        self.expected = 10  # episodes the next turn will likely ask for (teammates count them while it thinks)
        self._wake = trio.Event()

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in self.client.secrets if s)

    async def run(self, tools: Tools) -> None:
        log = structlog.get_logger().bind(actor=tools.agent, model=self.client.model)
        dispatch = Dispatcher(tools, self.settings, self.tuning_seeds, random.Random(self.rng_seed), self.secrets)
        # The ledger is durable: after a restart the agent goes on with what it already spent.
        own = [r for r in tools.board.values("tokens", TokenRecord) if r.agent == tools.agent]
        used = ledger.totals(own).total
        started = min((r.t for r in own), default=None)
        running: _Running | None = None
        async with trio.open_nursery() as calls:  # a paced turn's calls may outlive the turn
            while True:
                try:
                    await self._settle(running, tools)
                    running = None
                    now = self.clock()
                    started = started if started is not None else now
                    reason = self._exhausted(used, now - started)
                    if reason:
                        await self._stop(tools, log, reason, used, now - started)
                        return
                    if self._team_goal_met(tools):
                        self._hold(tools, 0, 0.0)
                        while self._team_goal_met(tools):  # nothing to improve until confirmation disagrees
                            await tools.champion_changed(timeout=60.0)
                        continue
                    prompt = build_prompt(self.system, tools, self.settings, self.turns, self.journal,
                                          self._budget_line(used, now - started), list(self.late))
                    self.late.clear()
                    self.last_prompt_chars = prompt.chars()
                    max_out = self.settings.max_output_tokens
                    if self.settings.token_budget:
                        max_out = max(1, min(max_out, self.settings.token_budget - used))
                    reply = await self._call(prompt, max_out, log)
                    used += reply.usage.total
                    tools.record_tokens(self.client.model, reply.usage.input_tokens,
                                        reply.usage.cached_input_tokens, reply.usage.output_tokens)
                    log.info("llm_turn", prompt_chars=self.last_prompt_chars, input_tokens=reply.usage.input_tokens,
                             cached_input_tokens=reply.usage.cached_input_tokens,
                             output_tokens=reply.usage.output_tokens, tools=[c.name for c in reply.calls],
                             stop=reply.stop)
                    self.expected = _episodes(reply.calls) or self.expected
                    self._hold(tools, self.expected, 2.0)  # until the scheduler's queue shows them
                    running = _Running(reply, [None] * len(reply.calls))
                    for i, call in enumerate(reply.calls):
                        calls.start_soon(self._run_call, dispatch, running, i, call, log)
                except Exception as e:  # last resort: a bug here must not take the fleet down
                    log.error("llm_agent_error", error=truncate(scrub(f"{type(e).__name__}: {e}", self.secrets), 400))
                    await trio.sleep(self.settings.backoff_max_s)

    async def _run_call(self, dispatch: Dispatcher, running: _Running, i: int, call: ToolCall, log) -> None:
        out = await dispatch(call)
        if out.is_error:
            log.info("tool_error", tool=call.name, error=truncate(out.content, 200))
        if running.settled:
            self.late.append(f"{call.name} (call {call.id}): {truncate(' '.join(out.content.split()), 400)}")
        else:
            running.outputs[i] = out
        self._wake.set()

    async def _settle(self, running: _Running | None, tools: Tools) -> None:
        """Wait until the next turn may start, then record the last one.

        Unpaced: when all its calls are done. Paced: once some of its experiments' results are in (or all
        calls are done) and the fleet admits a turn (`_admit`): robots do not wait for the model while
        its last episodes run, and a large team thinks at the pace its robots can test."""
        pace = self.settings.pace_per_cell
        while True:
            done = running is None or running.finished == len(running.outputs) or (pace and running.results)
            if done and (not pace or self._admit(tools)):
                break
            with trio.move_on_after(0.25):
                await self._wake.wait()
            self._wake = trio.Event()
        if running is None:
            return
        running.settled = True
        outputs = [o or ToolOutput(c.id, c.name, STILL_RUNNING) for o, c in zip(running.outputs, running.reply.calls,
                                                                                 strict=True)]
        turn = Turn(running.reply, outputs, "" if running.reply.calls else NUDGE)
        if len(self.turns) == self.turns.maxlen:
            self.journal.append(_journal_line(self.turns[0]))  # leaves the window: keep one line of it
        self.turns.append(turn)

    def _admit(self, tools: Tools) -> bool:
        """The fleet's queue, plus what teammates about to ask hold, is below `pace_per_cell` per cell: hold
        our own expected episodes and go. Checked read-only first; decided in one write transaction."""
        def room(r) -> bool:
            queue = r.get("meta", "queue", QueueRecord)
            if queue is None or queue.cells == 0:
                return True  # no figures from a scheduler yet: nothing to pace by
            now = self.clock()
            held = sum(h.episodes for agent, h in r.items("turns", TurnHold) if agent != tools.agent and h.until > now)
            return queue.waiting + held < self.settings.pace_per_cell * queue.cells

        with tools.board.read() as r:
            if not room(r):
                return False
        with tools.board.write() as w:
            if not room(w):
                return False
            w.put("turns", tools.agent, TurnHold(self.expected, self.clock() + 120.0))
        return True

    def _hold(self, tools: Tools, episodes: int, seconds: float) -> None:
        if self.settings.pace_per_cell:
            tools.board.put("turns", tools.agent, TurnHold(episodes, self.clock() + seconds))

    async def _call(self, prompt: Prompt, max_out: int, log) -> ModelReply:
        """Call the model until it answers: back off on errors, pause after too many in a row."""
        failures = 0
        while True:
            try:
                return await self.client.complete(prompt, TOOL_SPECS, max_out)
            except ModelError as e:
                err = e
            except Exception as e:  # e.g. a malformed body the SDK could not parse
                err = sdk_error(e, self.secrets)
            failures += 1
            error = scrub(str(err), self.secrets)
            if err.bad_request and self.turns:
                self.turns.clear()  # the request itself is refused (too long, odd history): start a fresh window
            if err.auth or failures >= self.settings.max_failures:
                log.warning("backend_paused", failures=failures, pause_s=self.settings.pause_s, error=error)
                await trio.sleep(self.settings.pause_s)
                failures = 0
                continue
            delay = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** (failures - 1))
            if err.retry_after is not None:
                delay = max(delay, min(err.retry_after, self.settings.retry_after_max_s))
            log.info("llm_retry", failures=failures, delay_s=round(delay, 3), error=error)
            await trio.sleep(delay)

    def _team_goal_met(self, tools: Tools) -> bool:
        """The champion already meets the target on its judging and on what confirmation has seen so far."""
        target = self.settings.target
        c = tools.champion()
        if target <= 0 or c is None or c.judged_n == 0 or c.judged_successes / c.judged_n < target:
            return False
        return c.n < 20 or c.successes / c.n >= target

    def _exhausted(self, used: int, elapsed: float) -> str:
        s = self.settings
        if s.token_budget and used >= s.token_budget:
            return f"token budget exhausted ({used} of {s.token_budget} tokens)"
        if s.wall_budget_s and elapsed >= s.wall_budget_s:
            return f"wall-time budget exhausted ({elapsed:.0f} of {s.wall_budget_s:.0f} s)"
        return ""

    def _budget_line(self, used: int, elapsed: float) -> str:
        s = self.settings
        tokens = f"{used} tokens used of {s.token_budget}" if s.token_budget else f"{used} tokens used (no limit)"
        wall = f"{elapsed:.0f} s of {s.wall_budget_s:.0f} s" if s.wall_budget_s else f"{elapsed:.0f} s (no limit)"
        return f"{tokens}; {wall}"

    async def _stop(self, tools: Tools, log, reason: str, used: int, elapsed: float) -> None:
        log.warning("budget_exhausted", reason=reason, tokens=used, elapsed_s=round(elapsed, 1))
        mine = [f for f in tools.board.values("findings", Finding) if f.agent == tools.agent]
        if not any(f.hypothesis.startswith("budget exhausted") for f in mine[-3:]):  # once, even across restarts
            tools.post_finding(
                hypothesis="budget exhausted: this agent stops",
                change="none",
                evidence=f"{reason}; {len(mine)} findings posted before",
                outcome="note",
            )
