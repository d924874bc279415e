"""The team's leaderboard: candidates ranked by what the fleet measured on tuning seeds. Pure functions,
and the tally's reads and writes inside a blackboard transaction the caller holds.

The scheduler tallies every agent evaluation per candidate (`CandidateRecord`); agents see the top of
the board in every briefing, so a team searches together: each member builds on the best results of
all, sees what is still running, and re-evaluates a promising candidate instead of starting over.

A candidate's score is the built-in researcher's objective (success counts most, progress gives a
gradient before anything succeeds, fewer steps break the tie) averaged over its episodes plus
`prior` pseudo-episodes scored zero: five lucky seeds do not outrank twenty good ones, and evaluating
a candidate again moves it to where its evidence puts it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from bus.blackboard import Txn
from bus.messages import PolicySpec
from bus.records import CandidateRecord

PRIOR = 2.0
STEP_WEIGHT = 0.3


def score(c: CandidateRecord, horizon: int, prior: float = PRIOR, step_weight: float = STEP_WEIGHT) -> float:
    return (c.successes + 0.5 * c.progress - step_weight * c.steps / max(1, horizon)) / (c.n + prior)


def ranked(records: Iterable[CandidateRecord], horizon: int, k: int) -> list[CandidateRecord]:
    """The k best measured candidates, best first (ties: the better measured one)."""
    measured = [c for c in records if c.n > 0]
    return sorted(measured, key=lambda c: (-score(c, horizon), -c.n, c.t))[:k]


def add(c: CandidateRecord, outcomes: Iterable[tuple[bool, float, int]], asked: int, t: float) -> CandidateRecord:
    """The record after a finished evaluation of `asked` episodes: (success, score, steps) of each counted one."""
    for success, progress, steps in outcomes:
        c.successes += bool(success)
        c.n += 1
        c.progress += progress
        c.steps += steps
    c.pending = max(0, c.pending - asked)
    c.t = t
    return c


# ---------------------------------------------------------------- the tally on the blackboard ("candidates")


def key(task: str, policy: PolicySpec) -> str:
    return f"{task}/{policy.ref}"


def stored(w: Txn, task: str, policy: PolicySpec, agent: str, now: float) -> CandidateRecord:
    """The candidate's record, or a fresh one naming `agent` as the first to ask."""
    return w.get("candidates", key(task, policy), CandidateRecord) or CandidateRecord(task, policy, agent, t=now)


def expect(w: Txn, task: str, policy: PolicySpec, agent: str, episodes: int, now: float) -> int:
    """Teammates see what is being measured right now: `episodes` more are running. Returns the
    episodes already measured."""
    c = stored(w, task, policy, agent, now)
    c.pending += episodes
    w.put("candidates", key(task, policy), c)
    return c.n


def record(w: Txn, task: str, policy: PolicySpec, agent: str, outcomes: Iterable[tuple[bool, float, int]],
           asked: int, now: float) -> None:
    w.put("candidates", key(task, policy), add(stored(w, task, policy, agent, now), outcomes, asked, now))


def mark(w: Txn, task: str, policy: PolicySpec, agent: str, judged: str, now: float) -> None:
    """The held-out judging's state of a candidate ("judging", "promoted", "rejected"), figures not shown.
    A policy promoted without evaluations gets a record too (unmeasured, so off the board), so its mark is kept."""
    c = stored(w, task, policy, agent, now)
    if c.judged != judged:
        c.judged = judged
        w.put("candidates", key(task, policy), c)


def line(c: CandidateRecord) -> str:
    """One line a model can act on: the exact policy (commit and parameters) and its evidence."""
    params = json.dumps(dict(sorted(c.policy.params.items())), separators=(",", ":"))  # exact: the same ref again
    text = f"{c.policy.ref} commit {c.policy.commit[:10]}"
    if c.policy.artifact:
        text += f" artifact {c.policy.artifact[:12]}"
    text += (f" params {params}: {c.successes}/{c.n} succeeded, progress {c.progress / max(1, c.n):.2f}, "
             f"{c.steps / max(1, c.n):.0f} steps")
    if c.pending:
        text += f"; {c.pending} more running"
    if c.judged:
        text += f"; held-out judging: {c.judged}"
    return text


def board_text(records: Iterable[CandidateRecord], horizon: int, k: int, recent: int = 3) -> str:
    """The k best candidates, then the `recent` most recently measured others: a new result is seen even
    when well-measured candidates hold the top."""
    records = list(records)
    best = ranked(records, horizon, k)
    shown = {c.policy.ref for c in best}
    latest = sorted((c for c in records if c.n > 0 and c.policy.ref not in shown), key=lambda c: -c.t)[:recent]
    if not best:
        return "(nothing evaluated yet)"
    return "\n".join(["best:", *(line(c) for c in best), *(["recent:", *(line(c) for c in latest)] if latest else [])])
