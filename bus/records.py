"""Typed records kept on the blackboard (LMDB). One Struct per table; see `bus/blackboard.py`."""

from __future__ import annotations

import msgspec

from bus.messages import FinalJudged, JobKind, PolicySpec, Purpose, Segment, TokenCall, Verdict

# 2: held-out seeds drawn fresh per judging (table "heldout"), job purposes as a closed type
SCHEMA_VERSION = 2


class Meta(msgspec.Struct):
    schema_version: int
    run_id: str
    created: float


class EpisodeRecord(msgspec.Struct):
    """One finished episode; keyed by episode_id and written once (the first result wins)."""

    episode_id: str
    job_id: str
    kind: JobKind
    task: str
    seed: int
    policy: PolicySpec
    cell_id: str
    verdict: Verdict
    success_at_k: bool
    attempts: int
    steps: int
    reset_s: float
    run_s: float
    verify_s: float
    finished: float  # daemon wall clock
    trajectory_file: str = ""  # relative to the state dir, "" when not recorded
    flagged: str = ""
    purpose: Purpose = Purpose.EVAL


class JobRecord(msgspec.Struct):
    job_id: str
    agent: str
    kind: JobKind
    task: str
    policy: PolicySpec
    seeds: list[int]
    attempts: int
    priority: int
    submitted: float
    done: bool = False
    purpose: Purpose = Purpose.EVAL
    cancelled: bool = False  # ended before all its episodes ran (e.g. the champion changed): not counted


class Finding(msgspec.Struct):
    """What an agent learned: the unit the summarizer condenses and peers read."""

    finding_id: str
    agent: str
    t: float
    hypothesis: str
    change: str
    evidence: str
    outcome: str  # "improved", "no_change", "worse", "inconclusive", "note"
    fingerprint: str = ""  # of the change (parameters or diff), so peers do not repeat it
    score: float = 0.0  # success rate the change reached on its evaluation, when it has one
    regime: str = ""  # set when the finding is a choice of improvement regime: "tune", "bc", "rl"


class TestedRecord(msgspec.Struct):
    """A candidate some agent already evaluated, keyed by the fingerprint of the change."""

    agent: str
    t: float
    successes: int
    n: int
    score: float  # the evaluating agent's own objective
    summary: str


class CandidateRecord(msgspec.Struct):
    """What the team measured of one candidate on tuning seeds, tallied by the scheduler from episode
    verdicts (never from what an agent reports); keyed by "task/policy ref". Agents see the best of
    them in every briefing, so they build on each other's results instead of repeating searches."""

    task: str
    policy: PolicySpec
    agent: str  # who asked first
    successes: int = 0
    n: int = 0
    progress: float = 0.0  # sum of verdict scores
    steps: int = 0  # sum of episode steps
    pending: int = 0  # episodes asked for and not finished yet
    judged: str = ""  # "", "judging", "promoted" or "rejected" (held-out judging, figures not shown)
    t: float = 0.0  # last update


class QueueRecord(msgspec.Struct):
    """The fleet's queue as the scheduler last published it (meta/"queue"): agents pace their turns by it."""

    waiting: int  # episodes of agents' evaluations and judging not yet leased to a cell
    cells: int  # cells heard from recently
    t: float


class Tallied(msgspec.Struct):
    """A finished job's verdicts were counted (table "tallied", by job id), written in the same
    transaction as the count: a restart between "job done" and its count counts it then, and only once."""

    t: float
    counted: bool = True  # False: the job was moot when it ended (its champion had been replaced)


class Confirmed(msgspec.Struct):
    """A policy's confirmation tally in this run (table "confirmed", by "task/policy ref"), kept when it
    stops being champion: if it becomes champion again (a rollback, a promotion anew) its sequential
    test goes on from there, so a policy shown short of the target cannot start over on a clean slate."""

    successes: int = 0
    n: int = 0


class Digest(msgspec.Struct):
    t: float
    text: str
    findings: int  # how many findings it covers
    best: str = ""


class Champion(msgspec.Struct):
    """The best policy of a task. Two held-out tallies, so the reported figure is unbiased:

    - judged: the promotion seeds it won on (selection happened there, so they flatter it);
    - confirmed: further held-out seeds run afterwards (background work), never used to choose it; a
      policy champion again goes on with the tally of its earlier reigns (`Confirmed`).
    """

    task: str
    policy: PolicySpec
    judged_successes: int
    judged_n: int
    promoted: float
    agent: str = ""
    successes: int = 0  # confirmed
    n: int = 0
    # "" while confirmation runs; "met" / "not_met" once the sequential rule stopped it
    # (`metrics.sprt`: the chance to say "met" for a policy below the target is at most [scheduler] alpha)
    decision: str = ""
    decision_target: float = 0.0  # the [fleet] target that decision was made against (a later run may set another)
    # Whether its confirmation leads (goes ahead of agents' experiments) as of the last count: the judge's
    # forecast (`judging.leads`) keeps a lead until the chance of "met" falls well below where it began.
    leads: bool = False
    # The champion it replaced, kept so a regression found by confirmation is rolled back.
    previous: PolicySpec | None = None
    previous_successes: int = 0
    previous_n: int = 0

    @property
    def judged_rate(self) -> float:
        """Success on the promotion seeds it won on (0 before any): the bar a new candidate must beat."""
        return self.judged_successes / self.judged_n if self.judged_n else 0.0


class HeldoutRecord(msgspec.Struct):
    """Use of a task's held-out seeds (table "heldout", by task): every judging, confirmation and final
    judging draws the next unused seeds of the task's secret order, so no held-out seed is ever judged twice."""

    task: str
    used: int = 0  # the first `used` seeds of the secret order are spent
    draws: int = 0
    total: int = 0  # the pool's size (heldout_seeds.count) when last drawn from
    low: bool = False  # fewer left than a judging and a confirmation's minimum need
    key: str = ""  # the secret that orders the held-out seeds (hex; made at the first draw, never leaves the board)


# The run's paired final judging (meta/"final"), stored as the judge answered it; report.json and the
# report's plots read it.
FinalRecord = FinalJudged


class SmokeRecord(msgspec.Struct):
    """A policy's simulated smoke evaluation: cells marked real run only policies that passed."""

    policy: PolicySpec
    passed: bool
    detail: str
    t: float


class CellRecord(msgspec.Struct):
    cell_id: str
    driver: str
    host: str
    pid: int
    joined: float
    last_seen: float
    state: str = "idle"
    real: bool = False


class LeaseRecord(msgspec.Struct):
    """Every lease ever granted, for the ledger check: each leased episode ends with one result."""

    lease_id: str
    episode_id: str
    job_id: str
    cell_id: str
    granted: float


class TimelineRecord(msgspec.Struct):
    """A batch of state segments a cell reported, kept for MRU."""

    cell_id: str
    segments: list[Segment]


# The token ledger (table "tokens"): one model call each, as the agent's TokensUsed event tells it.
TokenRecord = TokenCall


class CLIRunRecord(msgspec.Struct):
    """One headless run of a CLI coding agent (table "cli_runs"): this run's share of the figures the CLI
    itself reported at its end, kept beside the ledger's per-call records (a figure that covers the CLI's
    session so far, as Claude Code's cost and Codex's tokens do on a resumed session, is taken net of the
    session's earlier runs)."""

    agent: str
    cli: str  # the backend: "claude-code", "codex", "command"
    t: float
    turn: int
    ok: bool
    seconds: float
    session: str = ""  # the CLI's session ("" when it names none)
    cost_usd: float | None = None  # as the CLI priced this run; None: it reports no cost (Codex)
    # This run's tokens as the CLI itself counted them (ledger convention: input counts cached input and
    # cache writes); 0 and 0 when it reported none (a run that was killed).
    input_tokens: int = 0
    output_tokens: int = 0


class DaemonRecord(msgspec.Struct):
    """Written by the daemon at start, at every progress tick and at stop; read by `enpire.status`."""

    pid: int
    started: float
    last_seen: float
    state: str  # "running", "stopped: target", "stopped: budget", "stopped: signal"
    cells: int
    agents: int
    task: str
    budget_s: float = 0.0  # this start's time budget: status tells the time left
    target: float = 0.0  # held-out success rate that ends the run
    ended: float = 0.0  # when the run ended (target, budget, signal): its figures end there, not the final judging's


class TrainRecord(msgspec.Struct):
    """A finished training job (success or failure), so a repeated request gets the same answer."""

    job_id: str
    agent: str
    recipe: str
    ok: bool
    artifact: str
    error: str
    metrics: dict[str, float]
    seconds: float
    info: dict[str, str] = {}  # where it trained: trainer, host, device, gpu, precision, world
    attempts: int = 1  # leases it took (a trainer that died mid-job costs one)


class TrainerRecord(msgspec.Struct):
    """A trainer of the training queue as status shows it: where it runs and what it does."""

    trainer_id: str
    host: str
    pid: int
    device: str
    gpu: str
    processes: int
    joined: float
    last_seen: float
    state: str = "idle"  # idle, fetching, training, offline
    job_id: str = ""
    jobs_done: int = 0
    samples_per_s: float = 0.0  # of its last finished job
