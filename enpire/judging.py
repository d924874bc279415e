"""What held-out evidence means: the judge's rules as pure functions (actors/judge.py applies them),
and its counts as functions of a blackboard transaction the caller holds.

- Promotion: a candidate replaces the champion only when it is better with statistical confidence
  (one-sided two-proportion z-test) than the champion's whole held-out record (judging + confirmation),
  or, once the champion's confirmation stopped "not_met" or finds the target unlikely (`yields`), when
  its record is higher than that record and its own earlier confirmation (if any) does not show it worse
  (each champion's own confirmation then holds its target claim to `alpha`). A policy's confirmation
  tally is kept when it is replaced (table "confirmed"): champion again (a promotion anew, a
  rollback), its record and its sequential test go on from there, never from a clean slate.
- Confirmation: the champion runs on further fresh held-out seeds until a sequential rule stops
  (`metrics.sprt`: the chance to say "met" for a policy below the target is at most `alpha`, however
  often it is checked; it stops "not_met" as soon as "met" is out of reach within its cap). A
  confirmation that leads (its chance to say "met" within its cap, at the rate the champion's held-out
  record shows, is at least JOIN, or LEAVE once it leads) is decisive and goes before agents' experiments,
  and agents may hold meanwhile (their own rule: `agents/budget.py`); otherwise ("unlikely") only idle
  cells run it, only with `[scheduler] background`, and the search goes on.
- Rollback: a confirmation that shows the champion worse, with confidence, than the one it replaced
  (tested once per look, `rollback_look`, so repeated checks do not inflate alpha).
- Smoke test: a policy may run on cells marked real once it ran faultlessly and succeeded in simulation.
- Counting a finished job (leaderboard, confirmation, the baseline's judging) happens once: the count
  and the job's mark (table "tallied") are one transaction, so a restart between the queue's "done"
  and the count counts it then, and never twice.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bus import messages as m
from bus.blackboard import Txn
from bus.records import CandidateRecord, Champion, Confirmed, JobRecord, SmokeRecord, Tallied
from enpire import leaderboard
from enpire.config import CONFIRMATION_CAP, Config
from enpire.metrics import better_with_confidence, sprt, sprt_episodes, sprt_odds

SMOKE_FAULTS = ("safety_violation", "policy_", "sandbox_denied", "output_too_large", "cpu_limit", "memory_limit")
PRIORITY = {"final": 300, "decisive": 200, "judging": 100, "smoke": 50, "background": -1}
# Confirmation runs in jobs of a few episodes per cell: each judging job has a sandbox jail of its own (a
# start-up cost), and the sequential rule is checked as each job ends.
CONFIRM_EPISODES_PER_CELL = 4
BETA = 0.1  # the confirmation's chance to look "unlikely" for a policy at the halfway rate (sprt)
# A confirmation starts to lead (runs ahead of agents' experiments) at this chance of saying
# "met" within its cap, and keeps the lead until the chance falls below the second: one episode more or
# less must not toss the fleet between confirming and searching (`leads`).
JOIN, LEAVE = 0.5, 0.2
COUNTED = (m.Purpose.EVAL, m.Purpose.CONFIRM, m.Purpose.BASELINE)  # jobs whose verdicts the judge counts


def tally(episodes: Sequence[m.EpisodeSummary]) -> tuple[int, int]:
    """(successes, n) of a finished job: verdicts, never what an agent says."""
    return sum(e.success for e in episodes), len(episodes)


def heldout_record(c: Champion | None) -> tuple[int, int]:
    """The champion's held-out record: its judging plus its confirmation, all on fresh seeds."""
    return (c.judged_successes + c.successes, c.judged_n + c.n) if c else (0, 0)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    detail: str
    crowned: Champion | None = None  # the new champion when this judging made one


def promotion(spec: m.JobSpec, s: int, n: int, champion: Champion | None, config: Config, now: float,
              confirmed: tuple[int, int] = (0, 0)) -> Decision:
    """The verdict of a candidate's judging (`s` of `n` held-out episodes, plus the confirmation it had
    in an earlier reign, `confirmed`) against the champion's whole held-out record."""
    cs, cn = heldout_record(champion)
    rs, rn = s + confirmed[0], n + confirmed[1]  # the candidate's whole held-out record
    alpha = config.scheduler.alpha
    if champion and champion.policy == spec.policy:
        return Decision(True, "already the champion")
    if better_with_confidence(rs, rn, cs, cn, alpha):
        detail = f"{rs}/{rn} beats {cs}/{cn} (one-sided z-test, alpha {alpha})"
    elif (champion and (state := yields(champion, config)) and rs * cn > cs * rn
          and not (confirmed[1] and better_with_confidence(cs, cn, *confirmed, alpha))):
        # A champion shown short of the target no longer needs protecting with confidence: its record
        # (hundreds of episodes) would otherwise outweigh any judging of `promote_seeds`, and a better
        # policy could never take its place. Nor does one whose confirmation finds the target unlikely:
        # that confirmation runs on idle cells only, so on a busy fleet it may never stop. The candidate's
        # own confirmation decides the target (going on from its earlier reigns': `Confirmed`), and
        # rollback brings this one back if it shows worse. A candidate whose earlier confirmation showed
        # it worse than this record (the policy a rollback removed) still needs confidence.
        why = "stopped short of the target" if state == "not_met" else "finds the target unlikely"
        detail = f"{rs}/{rn} is above {cs}/{cn}, a champion whose confirmation {why}"
    else:
        return Decision(False, f"{rs}/{rn} is not better than {cs}/{cn} with confidence")
    crowned = Champion(spec.task, spec.policy, judged_successes=s, judged_n=n, promoted=now, agent=spec.agent,
                       successes=confirmed[0], n=confirmed[1], previous=champion.policy if champion else None,
                       previous_successes=cs, previous_n=cn)
    decide(crowned, config)  # a carried tally may already be decided
    return Decision(True, detail, crowned)


def yields(c: Champion, config: Config) -> str:
    """The champion's confirmation state when it lets a merely higher record take its place ("" when it does
    not): stopped short, or finds the target unlikely (it does not lead: its record makes "met" within the
    cap unlikely, and it runs on idle cells only, so on a busy fleet it may never stop)."""
    state = confirmation(c, config)
    return state if state in ("not_met", "unlikely") else ""


def goal(config: Config) -> str:
    """The fleet's goal and how the judge decides it, as the agents' task card states it: an agent that
    knows a policy just at the target is almost never confirmed aims above it."""
    t, alpha, fleet, sched = config.fleet.target, config.scheduler.alpha, config.fleet, config.scheduler
    cap = CONFIRMATION_CAP * fleet.min_heldout
    judged = (f"A promoted candidate is judged on {sched.promote_seeds} held-out episodes and replaces the champion "
              "when its held-out record is better, with confidence, than the champion's (or merely higher, once the "
              "champion's confirmation has stopped short or finds the target unlikely).")
    if t <= 0:
        return (f"none (target 0): {judged} A champion counts as confirmed after {fleet.min_heldout} further "
                "held-out episodes, whatever their outcome.")
    if t >= 1:
        return (f"held-out success of 100% on seeds no agent sees: no sample can confirm it (a champion's "
                f"confirmation stops short after at most {cap} episodes). {judged}")
    p1, ends = (1 + t) / 2, ", ending the run," if fleet.stop_at_target else ""
    where = "otherwise only on idle cells" if sched.background else "otherwise not at all"
    odds = sprt_odds(p1, t, alpha, fleet.min_heldout, cap)
    at_p1 = (f"one at {100 * p1:g}% within that cap with a chance of {odds[0]:.0%} (after about {odds[1]:.0f} "
             "episodes when it is)") if odds else f"one at {100 * p1:g}% after about {sprt_episodes(p1, t, alpha, fleet.min_heldout)} without a cap"
    k = fewest_to_lead(config)
    fresh = (f"a champion judged {k} of {sched.promote_seeds} or more leads at once" if k is not None else
             f"no judging of {sched.promote_seeds} episodes alone leads")
    return (f"held-out success of at least {100 * t:g}% on seeds no agent sees. {judged} The champion is then "
            f"confirmed on further held-out episodes by a sequential test (alpha {alpha:g}) that stops short after "
            f"at most {cap} episodes. The confirmation leads (runs ahead of agents' experiments) "
            f"while, at the rate the champion's whole held-out record shows, its chance to say met within that cap "
            f"is at least {JOIN:.0%} ({LEAVE:.0%} to keep a lead; {fresh}); {where}, the search going on. "
            f"It says met{ends} after "
            f"{sprt_episodes(1.0, t, alpha, fleet.min_heldout)} episodes for a policy that always succeeds, "
            f"{at_p1}; a policy at {100 * t:g}% or below is confirmed with a chance of at most {alpha:g}. Aim well "
            "above the target.")


def fewest_to_lead(config: Config) -> int | None:
    """The fewest successes of a judging (`promote_seeds` episodes) with which a new champion's confirmation
    leads; None if none does. The chance grows with the rate, so a bisection finds it."""
    n = config.scheduler.promote_seeds
    def fresh(k: int) -> bool:
        return leads(Champion("", m.PolicySpec(commit=""), judged_successes=k, judged_n=n, promoted=0.0), config)
    if n <= 0 or not fresh(n):
        return None
    low, high = -1, n  # fresh(low) is False (or low is -1), fresh(high) is True
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fresh(mid) else (mid, high)
    return high


def confirmation(c: Champion, config: Config) -> str:
    """The sequential rule on the champion's confirmation so far: "met" (can end the run), "not_met",
    "unlikely" (go on, on idle cells only) or "" (go on, ahead of agents' experiments: it leads). A "met"
    stays met for the target it was made against (episodes still in flight when it stopped do not undo it);
    against another target the rule is applied again to the tally."""
    if c.decision == "met" and c.decision_target == config.fleet.target:
        return "met"
    fleet, alpha = config.fleet, config.scheduler.alpha
    state = sprt(c.successes, c.n, fleet.target, alpha, BETA, min_n=fleet.min_heldout,
                 max_n=CONFIRMATION_CAP * fleet.min_heldout)
    return "unlikely" if state == "" and not leads(c, config) else state


def leads(c: Champion, config: Config) -> bool:
    """Whether the confirmation leads: going on from where it is, it says "met" within its cap with a chance
    of at least JOIN (LEAVE once it leads: `c.leads`) for a policy at the rate the champion's whole held-out
    record shows (its judging and its confirmation so far). A near-miss (judged 37/40 against 0.9: a chance
    of 21%) would otherwise hold every cell up to the cap and then stop short; not leading, it goes on on
    idle cells only while the search goes on."""
    t = config.fleet.target
    if not 0 < t < 1:  # anything meets a target of 0; no sample shows one of 1
        return t <= 0
    s, n = heldout_record(c)
    if n == 0:
        return True
    chance = chance_met(s, n, c.successes, c.n, t, config.scheduler.alpha, config.fleet.min_heldout)
    return chance >= (LEAVE if c.leads else JOIN)


@functools.lru_cache(maxsize=1024)  # a memo of a pure function: the judge asks about one state several times
def chance_met(s: int, n: int, successes: int, confirmed_n: int, target: float, alpha: float, min_n: int) -> float:
    """The capped rule's chance of saying "met" from a confirmation at `successes` of `confirmed_n`, for a
    policy at the rate `s` of `n` (a held-out record) shows (`metrics.sprt_odds`; for a cap too long to
    carry, 1 or 0 by whether the evidence grows on average at that rate)."""
    odds = sprt_odds(s / n, target, alpha, min_n, CONFIRMATION_CAP * min_n, successes, confirmed_n)
    return odds[0] if odds is not None else float(sprt_episodes(s / n, target, alpha) is not None)


def decide(c: Champion, config: Config) -> bool:
    """Record the rule's stop ("met" / "not_met") on the champion against the current target, and whether
    its confirmation leads now; whether either changed."""
    state = confirmation(c, config)
    decision = state if state in ("met", "not_met") else ""
    target = config.fleet.target if decision else 0.0
    changed = (decision, target, state == "") != (c.decision, c.decision_target, c.leads)
    c.decision, c.decision_target, c.leads = decision, target, state == ""
    return changed


def announce(c: Champion, config: Config, now: float) -> m.ChampionChanged:
    """The champion as the judge publishes it, with its confirmation's state (agents may hold while it leads)."""
    return m.ChampionChanged(task=c.task, policy=c.policy, agent=c.agent, judged_successes=c.judged_successes,
                             judged_n=c.judged_n, successes=c.successes, n=c.n, decision=c.decision, t=now,
                             confirmation=confirmation(c, config))


def confirmation_plan(c: Champion, config: Config, cells: int) -> tuple[int, int] | None:
    """(episodes per confirmation job, its priority), or None when the champion needs no more."""
    state = confirmation(c, config)
    decisive = state == ""  # it leads: the fleet's goal likely hangs on it
    if state in ("met", "not_met") or not (decisive or config.scheduler.background):
        return None
    return CONFIRM_EPISODES_PER_CELL * max(1, cells), PRIORITY["decisive" if decisive else "background"]


def rollback_look(before: int, after: int, first: int) -> int | None:
    """The look a confirmation job crossed going from `before` to `after` episodes, or None: look k at
    `first * 2**k` episodes (the highest one crossed, when a job crosses several)."""
    if after < first:
        return None
    k = (after // first).bit_length() - 1  # the highest look at or below `after`: first * 2**k <= after
    return k if first << k > before else None


def rollback(c: Champion, config: Config, now: float, confirmed: tuple[int, int] = (0, 0),
             before: int = 0) -> Champion | None:
    """The previous champion back, once the confirmation shows this one worse than it with confidence;
    `confirmed`: the previous one's confirmation tally, which goes on (its judging is the rest of the
    record it had when it was replaced); `before`: this champion's confirmation before the job just counted.
    The test runs once per look (`rollback_look`: at `rollback_min_n` episodes, then each doubling) at
    alpha / 2**(k+1): a fixed-sample test repeated after every job would roll a champion as good as the
    previous one back far more often than alpha (about 12% in a simulation at equal rates of 0.8), while
    the looks' alphas sum to at most alpha however long the confirmation runs."""
    sched = config.scheduler
    look = rollback_look(before, c.n, sched.rollback_min_n)
    if (c.previous is None or look is None or not better_with_confidence(
            c.previous_successes, c.previous_n, c.successes, c.n, sched.alpha / (1 << (look + 1)))):
        return None
    ks, kn = confirmed
    jn = max(0, c.previous_n - kn)  # its record when replaced, less the tally: never below zero
    js = min(jn, max(0, c.previous_successes - ks))
    back = Champion(c.task, c.previous, judged_successes=js, judged_n=jn, promoted=now, agent="rollback",
                    successes=ks, n=kn)
    decide(back, config)
    return back


def carried(w: Txn, task: str, policy: m.PolicySpec) -> tuple[int, int]:
    """A policy's confirmation tally from its earlier reigns in this run ((0, 0) if it had none)."""
    c = w.get("confirmed", leaderboard.key(task, policy), Confirmed)
    return (c.successes, c.n) if c else (0, 0)


def smoke_record(policy: m.PolicySpec, episodes: Sequence[m.EpisodeSummary], now: float) -> SmokeRecord:
    faults = [e.reason for e in episodes if e.reason.startswith(SMOKE_FAULTS)]
    wins, n = tally(episodes)
    detail = f"{wins}/{n} succeeded" + (f"; faults: {faults[:3]}" if faults else "")
    return SmokeRecord(policy, not faults and wins > 0, detail, now)


# ---------------------------------------------------------------- counting finished jobs, once
# Each runs inside a blackboard transaction the caller holds; a job already marked is not counted again.


def count_evaluation(w: Txn, spec: m.JobSpec, episodes: Sequence[m.EpisodeSummary], now: float) -> None:
    """An agent's evaluation into the leaderboard, from verdicts (never from what an agent says)."""
    if w.get("tallied", spec.job_id, Tallied) is None:
        outcomes = [(e.success, e.score, e.steps) for e in episodes]
        leaderboard.record(w, spec.task, spec.policy, spec.agent, outcomes, len(spec.seeds), now)
        w.put("tallied", spec.job_id, Tallied(now))


def count_promotion(w: Txn, spec: m.JobSpec, episodes: Sequence[m.EpisodeSummary], config: Config,
                    now: float, closed: bool = False) -> tuple[Decision, Champion | None]:
    """A candidate's judging decided against the champion and its record as they are now, the new
    champion and the leaderboard mark written with it: a confirmation counted meanwhile is either seen
    here or, its champion replaced, not counted (count_confirmation). `closed`: the run has ended, and a
    judging that finishes after its end decides nothing (the final judging judges the champion it had).
    Returns (decision, the champion it was judged against)."""
    champion = w.get("champion", spec.task, Champion)
    if closed:  # its mark stays "judging": a start that goes on with the run decides it (`undecided`)
        return Decision(False, "the run ended before this judging did: not decided"), champion
    s, n = tally(episodes)
    decision = promotion(spec, s, n, champion, config, now, carried(w, spec.task, spec.policy))
    if decision.crowned is not None:
        w.put("champion", spec.task, decision.crowned)
    leaderboard.mark(w, spec.task, spec.policy, spec.agent, "promoted" if decision.promoted else "rejected", now)
    return decision, champion


def count_baseline(w: Txn, spec: m.JobSpec, episodes: Sequence[m.EpisodeSummary], config: Config,
                   now: float) -> Champion | None:
    """The starting policy's judging crowns it while there is no champion; the champion it made, if any."""
    if w.get("tallied", spec.job_id, Tallied) is not None:
        return None
    crowned = None
    if w.get("champion", spec.task, Champion) is None:  # else a promotion came first
        s, n = tally(episodes)
        crowned = Champion(spec.task, spec.policy, judged_successes=s, judged_n=n, promoted=now, agent="baseline")
        decide(crowned, config)  # whether its confirmation leads
        w.put("champion", spec.task, crowned)
    w.put("tallied", spec.job_id, Tallied(now, counted=crowned is not None))
    return crowned


def count_confirmation(w: Txn, spec: m.JobSpec, episodes: Sequence[m.EpisodeSummary], config: Config,
                       now: float) -> tuple[Champion, Champion | None, bool] | None:
    """A confirmation job into its champion's tally, then the sequential rule or a rollback. Returns
    (the champion with this job counted, the champion rolled back to or None, whether this job stopped
    the rule: a job that finishes after the stop is counted too, and stops nothing); None when not counted."""
    if w.get("tallied", spec.job_id, Tallied) is not None:
        return None
    champion = w.get("champion", spec.task, Champion)
    if champion is None or champion.policy != spec.policy:  # the champion changed while it ran
        w.put("tallied", spec.job_id, Tallied(now, counted=False))
        return None
    s, n = tally(episodes)
    before = champion.n
    champion.successes, champion.n = champion.successes + s, champion.n + n
    w.put("confirmed", leaderboard.key(spec.task, spec.policy), Confirmed(champion.successes, champion.n))
    earlier = carried(w, champion.task, champion.previous) if champion.previous else (0, 0)
    stopped = False
    if (previous := rollback(champion, config, now, earlier, before)) is None:
        stopped = decide(champion, config) and bool(champion.decision)
    w.put("champion", spec.task, previous or champion)
    w.put("tallied", spec.job_id, Tallied(now))
    return champion, previous, stopped


def restored(jobs: Iterable[JobRecord]) -> tuple[dict[str, str], dict[str, int]]:
    """What a judge rebuilds from the job records as it starts: each candidate's judging job (one per
    candidate, however many ask), and the episodes each agent asked for (its episode budget)."""
    promotions: dict[str, str] = {}
    committed: dict[str, int] = {}
    for record in jobs:
        if record.purpose is m.Purpose.EVAL:
            committed[record.agent] = committed.get(record.agent, 0) + len(record.seeds)
        elif record.purpose is m.Purpose.PROMOTE:
            promotions.setdefault(record.policy.ref, record.job_id)
    return promotions, committed


def undecided(r, record: JobRecord) -> bool:
    """A candidate's judging a restart must (go on and) decide: unfinished, or finished with its candidate
    still marked "judging" (a crash came between the queue's "done" and the decision). `r`: a reader."""
    if record.purpose is not m.Purpose.PROMOTE:
        return False
    candidate = r.get("candidates", leaderboard.key(record.task, record.policy), CandidateRecord)
    return not record.done or (candidate is not None and candidate.judged == "judging")


def request_of(record: JobRecord) -> m.EvalRequest | m.PromoteRequest:
    """The request an agent made for an evaluation or a judging that a restart interrupted: the judge asks
    it again itself (the same job id: one job, counted once), so its verdicts count though the agent is gone."""
    if record.purpose is m.Purpose.PROMOTE:
        return m.PromoteRequest(job_id=record.job_id, agent=record.agent, task=record.task, policy=record.policy)
    return m.EvalRequest(job_id=record.job_id, agent=record.agent, task=record.task, policy=record.policy,
                         seeds=list(record.seeds), attempts=record.attempts, priority=record.priority)


def uncounted(w: Txn, now: float) -> list[JobRecord]:
    """The finished jobs a restart must count: a crash came between the queue's "done" and the count.
    (A state written before jobs were marked: what finished there was counted then, so it is marked.)"""
    legacy = w.get("meta", "tallied_since", Tallied) is None
    found = []
    for job_id, record in w.items("jobs", JobRecord):
        if record.done and w.get("tallied", job_id, Tallied) is None:
            if legacy:
                w.put("tallied", job_id, Tallied(now))
            elif not record.cancelled and record.purpose in COUNTED:
                found.append(record)
    if legacy:
        w.put("meta", "tallied_since", Tallied(now))
    return found
