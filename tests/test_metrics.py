import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.messages import Segment
from enpire.metrics import (
    better_with_confidence,
    mean_robot_utilization,
    mean_token_utilization,
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
