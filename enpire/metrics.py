"""Metric definitions used everywhere (see DESIGN.md): pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import numpy as np

from bus.messages import Segment, Utilization
from bus.records import Finding

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not in [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At the edges the bound is exactly 0 or 1; say so rather than trust rounding.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def better_with_confidence(s_new: int, n_new: int, s_old: int, n_old: int, alpha: float = 0.05) -> bool:
    """One-sided two-proportion z-test (pooled): is the new success rate higher than the old one?

    A champion with no evaluation (n_old == 0) is beaten by any candidate whose Wilson lower bound is
    above zero, i.e. one that succeeds at all.
    """
    if n_new <= 0:
        return False
    if n_old <= 0:
        return wilson_interval(s_new, n_new)[0] > 0.0
    p_new, p_old = s_new / n_new, s_old / n_old
    if p_new <= p_old:
        return False
    pooled = (s_new + s_old) / (n_new + n_old)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_new + 1 / n_old))
    if se == 0.0:
        return p_new > p_old
    z = (p_new - p_old) / se
    # one-sided p-value from the normal tail
    p_value = 0.5 * math.erfc(z / math.sqrt(2))
    return p_value < alpha


def _sprt_evidence(target: float, alpha: float) -> tuple[float, float, float]:
    """`sprt`'s evidence for p1 = (1 + target) / 2 over p0 = target: the log-likelihood ratio a success and
    a failure add, and the total that says "met" (log 1/alpha). One definition for the rule and its figures."""
    p0, p1 = target, (1 + target) / 2
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0)), math.log(1 / alpha)


def sprt(successes: int, n: int, target: float, alpha: float, beta: float = 0.1, min_n: int = 1,
         max_n: int | None = None) -> str:
    """Sequential test of a success rate against `target`: "met", "not_met" or "" (go on).

    Wald's likelihood ratio of p1 = (1 + target) / 2 (halfway from the target to perfect) against
    p0 = target. "met" once the ratio reaches 1/alpha (and n >= min_n): under any true rate at or below
    the target the ratio is a non-negative martingale (a supermartingale below it), so by Ville's
    inequality the chance it EVER reaches 1/alpha, whenever and however often it is checked, is at most
    alpha. "unlikely" while it is at or below beta and n >= min_n (p1 is then unlikely: worth running
    only on idle cells; a few early failures are not enough to act on). "not_met" at max_n, or as soon as "met" is out of reach within max_n even if every episode
    left succeeds: stopping that way only lowers the chance of a false "met", and never denies a "met"
    the rule could still have said (near the target a confirmation otherwise runs to max_n in vain).
    """
    if not 0 < target < 1:  # a target of 0 is met by anything; one of 1 by nothing a sample can show
        return "met" if target <= 0 and n >= min_n else ("not_met" if max_n is not None and n >= max_n else "")
    per_success, per_failure, threshold = _sprt_evidence(target, alpha)
    llr = successes * per_success + (n - successes) * per_failure
    if llr >= threshold and n >= min_n:
        return "met"
    if max_n is not None:
        # the fewest further episodes (all successes) that would say "met"; the 1e-9 keeps an exact hit a hit
        needed = max(math.ceil((threshold - llr) / per_success - 1e-9), min_n - n, 0)
        if n >= max_n or n + needed > max_n:
            return "not_met"
    return "unlikely" if llr <= math.log(beta) and n >= min_n else ""


def sprt_episodes(rate: float, target: float, alpha: float, min_n: int = 1) -> int | None:
    """About how many episodes `sprt` takes to say "met" for a policy whose true success is `rate`, with no
    cap: Wald's approximation, the evidence "met" needs over the evidence one episode adds on average.
    Exact for a rate of 1 (every episode adds the same). None where the evidence does not grow on average
    (a policy near or below the target is confirmed by chance only). `sprt_odds` gives the capped rule's."""
    if not 0 < target < 1:
        return None
    per_success, per_failure, threshold = _sprt_evidence(target, alpha)
    drift = rate * per_success + (1 - rate) * per_failure
    return max(min_n, math.ceil(threshold / drift - 1e-9)) if drift > 0 else None


def sprt_odds(rate: float, target: float, alpha: float, min_n: int, max_n: int, successes: int = 0,
              n: int = 0) -> tuple[float, float] | None:
    """(the chance that `sprt` capped at `max_n` says "met" for a policy whose true success is `rate`, the
    mean number of episodes it takes in all when it does), from a confirmation at `successes` of `n` (still
    going): exact, carrying the distribution of the number of further successes while the rule goes on.
    None for a cap too long to carry (over 5,000)."""
    if not 0 < target < 1 or max_n > 5_000:
        return None
    per_success, per_failure, threshold = _sprt_evidence(target, alpha)
    going = np.array([1.0])  # going[k]: the chance of k further successes after `done` more, the rule still going
    met = met_n = 0.0
    for done in range(1, max_n - n + 1):
        after = np.zeros(done + 1)
        after[:-1] += going * (1 - rate)
        after[1:] += going * rate
        wins, total = successes + np.arange(done + 1), n + done
        llr = wins * per_success + (total - wins) * per_failure
        says_met = (llr >= threshold) & (total >= min_n)
        needed = np.maximum(np.maximum(np.ceil((threshold - llr) / per_success - 1e-9), min_n - total), 0)
        stops = says_met | (total >= max_n) | (total + needed > max_n)
        met += after[says_met].sum()
        met_n += total * after[says_met].sum()
        going = np.where(stops, 0.0, after)
        if not going.any():
            break
    return float(met), float(met_n / met) if met else 0.0


def utilization(segments: Iterable[Segment], wall_s: float) -> Utilization:
    """Utilization of one cell from its state segments over a window of `wall_s` seconds."""
    by_state: dict[str, float] = {}
    agent = background = 0.0
    for seg in segments:
        d = max(0.0, seg.end - seg.start)
        by_state[seg.state] = by_state.get(seg.state, 0.0) + d
        if seg.state == "running":
            if seg.kind == "background":
                background += d
            else:
                agent += d
    running = by_state.get("running", 0.0)
    # Durations come from the cell's clock and the window from the daemon's: clamp so skew can't exceed 1.
    wall = max(wall_s, sum(by_state.values()))
    return Utilization(wall, running, agent, background, by_state)


def until(segments: Iterable[Segment], t: float) -> list[Segment]:
    """The part of a cell's segments before `t` (a run's end: the final judging after it is not the run's)."""
    return [msgspec.structs.replace(s, end=min(s.end, t)) for s in segments if s.start < t]


def cell_window_s(joined: float, last_seen: float, live: bool, now: float) -> float:
    """The wall time a cell's MRU is over: from when it first joined to now while it is live, else to when
    it was last heard from (a cell's downtime inside that span counts as not running)."""
    return max(0.0, (now if live else last_seen) - joined)


def mean_robot_utilization(per_cell: dict[str, Utilization]) -> float:
    """MRU: the fraction of wall time a robot actively executes an experiment, averaged over robots."""
    if not per_cell:
        return 0.0
    return sum(u.mru for u in per_cell.values()) / len(per_cell)


def mean_token_utilization(total_tokens: int, wall_s: float) -> float:
    """MTU: tokens (input + output) consumed per minute by the whole team."""
    return total_tokens / (wall_s / 60.0) if wall_s > 0 else 0.0


@dataclass(frozen=True)
class SuccessSummary:
    n: int
    successes: int  # pass@1
    successes_at_k: int
    k: int

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    @property
    def rate_at_k(self) -> float:
        return self.successes_at_k / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    def __str__(self) -> str:
        lo, hi = self.interval
        text = f"{self.successes}/{self.n} = {self.rate:.1%} (95% CI {lo:.3f}-{hi:.3f})"
        if self.k > 1:
            text += f", pass@{self.k} {self.rate_at_k:.1%}"
        return text


def summarize(outcomes: Iterable[tuple[bool, bool]], k: int = 1) -> SuccessSummary:
    """From (pass@1 success, pass@k success) pairs."""
    n = s1 = sk = 0
    for first, any_ in outcomes:
        n += 1
        s1 += bool(first)
        sk += bool(any_ or first)
    return SuccessSummary(n, s1, sk, k)


def regimes_used(findings: Iterable[Finding]) -> dict[str, list[str]]:
    """Per agent, the improvement regimes ("tune", "bc", "rl") it chose, in the order it first chose them."""
    used: dict[str, list[str]] = {}
    for f in findings:
        if f.regime and f.regime not in used.setdefault(f.agent, []):
            used[f.agent].append(f.regime)
    return {agent: regimes for agent, regimes in used.items() if regimes}
