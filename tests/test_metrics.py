import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.messages import Segment
from enpire.metrics import (
    better_with_confidence,
    mean_robot_utilization,
    mean_token_utilization,
    sprt,
    sprt_odds,
    summarize,
    utilization,
    wilson_interval,
)


def test_wilson_known_values():
    lo, hi = wilson_interval(93, 100)
    assert lo == pytest.approx(0.8625, abs=1e-3) and hi == pytest.approx(0.9657, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.963, abs=1e-3)


@given(st.integers(1, 5000), st.data())
def test_wilson_contains_the_estimate(n, data):
    s = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(s, n)
    assert 0.0 <= lo <= s / n <= hi <= 1.0


def test_promotion_test_needs_confidence():
    assert not better_with_confidence(92, 100, 90, 100)  # a small edge is noise
    assert better_with_confidence(97, 100, 80, 100)
    assert not better_with_confidence(80, 100, 97, 100)
    assert better_with_confidence(3, 100, 0, 0)  # anything that works beats no champion
    assert not better_with_confidence(0, 100, 0, 0)


def test_utilization_counts_only_running():
    segs = [
        Segment("resetting", 0, 1), Segment("running", 1, 7, "agent"), Segment("verifying", 7, 8),
        Segment("running", 8, 9, "background"), Segment("idle", 9, 10),
    ]
    u = utilization(segs, 10.0)
    assert u.mru == pytest.approx(0.7)
    assert u.agent_share == pytest.approx(6 / 7)
    assert u.background_s == pytest.approx(1.0)
    assert mean_robot_utilization({"a": u, "b": utilization([], 10.0)}) == pytest.approx(0.35)


def test_utilization_never_exceeds_one_under_clock_skew():
    u = utilization([Segment("running", 0, 12, "agent")], 10.0)
    assert u.mru == 1.0


def test_mtu_and_pass_at_k():
    assert mean_token_utilization(9000, 120.0) == 4500
    s = summarize([(True, True), (False, True), (False, False), (False, False)], k=3)
    assert (s.rate, s.rate_at_k) == (0.25, 0.5)
    assert "pass@3 50.0%" in str(s)
    assert not math.isnan(summarize([]).rate)


def _sprt_by_brute_force(rate, target, alpha, min_n, cap, successes, n):
    """The capped rule's chance of "met" and mean length from (successes, n), state by state with `sprt`."""
    going, met, met_n = {successes: 1.0}, 0.0, 0.0
    for total in range(n + 1, cap + 1):
        after: dict[int, float] = {}
        for k, p in going.items():
            after[k] = after.get(k, 0.0) + p * (1 - rate)
            after[k + 1] = after.get(k + 1, 0.0) + p * rate
        going = {}
        for k, p in after.items():
            state = sprt(k, total, target, alpha, min_n=min_n, max_n=cap)
            if state == "met":
                met, met_n = met + p, met_n + total * p
            elif state != "not_met":
                going[k] = p
    return met, met_n / met if met else 0.0


@pytest.mark.parametrize("rate, successes, n", [(0.95, 0, 0), (0.939, 100, 108), (0.958, 30, 32), (0.9, 4, 8),
                                                (1.0, 20, 20), (0.97, 150, 160)])
def test_sprt_odds_from_a_confirmation_under_way_is_the_rules_own(rate, successes, n):
    chance, mean = sprt_odds(rate, 0.9, 0.05, 40, 200, successes, n)
    met, mean_met = _sprt_by_brute_force(rate, 0.9, 0.05, 40, 200, successes, n)
    assert abs(chance - met) < 1e-9 and abs(mean - mean_met) < 1e-6
