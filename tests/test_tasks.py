"""Every task card against the driver it describes: observation layout, action bounds, horizon, control rate,
goal, and the fleet limits the card quotes (per-step deadline, action change, on_failure keys)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from enpire import config as cfg
from enpire import tasks
from hw import METAWORLD_TASKS, make_driver


def _driver(name: str):
    if name in METAWORLD_TASKS:
        pytest.importorskip("metaworld")
    d = make_driver(name)
    d.connect()
    return d


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_card_matches_the_driver(name):
    spec = tasks.spec(name)
    assert set(tasks.TASKS) == {"pusht", *METAWORLD_TASKS}  # every task the fleet runs has a card
    d = _driver(spec.driver)
    try:
        obs = d.reset(7)
        kind = spec.observations["state"]
        assert kind.dim == d.observation_dim == obs.shape[0]
        covered = sorted(i for f in kind.fields for i in range(f.start, f.start + f.size))
        assert covered == list(range(kind.dim))  # every value is described exactly once
        assert np.allclose(spec.action_low, d.action_low) and np.allclose(spec.action_high, d.action_high)
        assert sum(f.size for f in spec.action_fields) == len(d.action_low)
        assert spec.horizon == d.horizon
        env = d.env
        if name == "pusht":
            assert spec.control_hz == env.control_hz
            assert np.allclose(spec.goal_value, env.goal_pose)
            field = {f.name: f for f in kind.fields}
            state = d.trusted_state()
            assert np.allclose(obs[field["block_x"].start:field["block_angle"].start + 1], state["block_pose"])
            assert np.allclose(obs[field["agent_x"].start:field["agent_y"].start + 1], state["agent_pos"])
        else:
            assert math.isclose(spec.control_hz, 1.0 / env.dt)
            field = {f.name: f for f in kind.fields}
            state = d.trusted_state()
            g = field["goal_pos"]
            assert np.allclose(obs[g.start:g.start + g.size], state["goal_pos"], atol=1e-6)
            h = field["hand_pos"]
            hand, tcp = obs[h.start:h.start + h.size], np.asarray(state["hand_pos"])  # trusted: the fingertips' centre
            assert np.allclose(hand[:2], tcp[:2], atol=0.005) and 0.035 < hand[2] - tcp[2] < 0.055  # as the card says
            o = kind.fields[2]  # the object slot the task names (peg or handle)
            assert np.allclose(obs[o.start:o.start + o.size], state["obj_pos"][:3], atol=1e-6)
    finally:
        d.disconnect()


def test_rendered_card_quotes_the_fleet_limits():
    text = """
[cells]
task = "pusht"
[tasks.pusht]
horizon = 250
attempts = 2
[tasks.pusht.limits]
max_delta = 80.0
[sandbox]
act_timeout_s = 0.04
max_missed_deadlines = 5
"""
    config = cfg.decode(text, "test.toml")
    card = tasks.card("pusht", config)
    out = card.render()
    assert "horizon 250 steps" in out and "within 40 ms" in out and "5 in a row" in out
    assert "at most 80 per dimension" in out and "up to 2 attempt(s)" in out
    assert "goal pose (x 256, y 256, angle pi/4" in out and "bar x in [-60, 60]" in out
    for key in tasks.ON_FAILURE_KEYS:
        assert key in out
    # Defaults of a stock config: 50 ms, 100 px, 300 steps.
    stock = tasks.card("pusht", cfg.decode("", "default")).render()
    assert "within 50 ms" in stock and "at most 100 per dimension" in stock and "horizon 300 steps" in stock
    with pytest.raises(KeyError, match="not in the configuration"):
        tasks.card("drawer-open-v3", config)


def test_on_failure_keys_are_what_the_cell_sends():
    """The card's on_failure keys are the keys of the dict the cell notifies the policy with."""
    source = (Path(__file__).parent.parent / "actors" / "cell.py").read_text()
    call = re.search(r"notify_failure\(\{(.*?)\}\)", source, re.S)
    assert call is not None
    assert tuple(re.findall(r'"(\w+)":', call.group(1))) == tasks.ON_FAILURE_KEYS


def test_metaworld_cards_describe_their_own_goal():
    for name in METAWORLD_TASKS:
        out = tasks.card(name).render()
        assert "[36:39] goal_pos (m)" in out and "80 Hz" in out and "horizon 500" in out
        assert tasks.spec(name).success in out


def test_every_observation_kind_of_a_driver_has_a_card():
    from hw.pusht import PushTDriver

    spec = tasks.spec("pusht")
    assert set(spec.observations) == set(PushTDriver.observation_modes)
    d = PushTDriver(obs_type="pixels")
    d.connect()
    try:
        obs = d.reset(4)
        kind = spec.observations["pixels"]
        assert kind.dim == d.observation_dim == obs["agent_pos"].shape[0]
        assert obs["pixels"].shape == (96, 96, 3) and "(96, 96, 3) uint8" in kind.note
        assert np.allclose(obs["agent_pos"], d.trusted_state()["agent_pos"])
    finally:
        d.disconnect()
    config = cfg.decode('[tasks.pusht]\nobservation = "pixels"\n', "t.toml")
    assert "Observation (pixels, 2 values" in tasks.card("pusht", config).render()


def test_card_states_the_fleet_goal_as_the_judge_decides_it():
    """Agents are told the target and what confirming it takes, in the sequential rule's own figures: a
    perfect policy is confirmed exactly after the count quoted, and the chance and mean length quoted for
    a policy halfway to perfect are the capped rule's (checked against `sprt` itself, state by state)."""
    from enpire.config import CONFIRMATION_CAP
    from enpire.metrics import sprt, sprt_episodes, sprt_odds

    config = cfg.decode("[fleet]\ntarget = 0.9\nmin_heldout = 40\n[scheduler]\npromote_seeds = 40\nalpha = 0.05\n"
                        "[cells]\ntask = \"pusht\"\n", "test.toml")
    out = tasks.card("pusht", config).render()
    cap = CONFIRMATION_CAP * 40
    perfect = sprt_episodes(1.0, 0.9, 0.05, 40)
    assert perfect == 56 and sprt(56, 56, 0.9, 0.05, min_n=40) == "met" and sprt(55, 55, 0.9, 0.05, min_n=40) == ""
    chance, mean = sprt_odds(0.95, 0.9, 0.05, 40, cap)
    going, met, met_n = {0: 1.0}, 0.0, 0.0  # the capped rule by brute force: every (successes, n) state
    for n in range(1, cap + 1):
        after: dict[int, float] = {}
        for k, p in going.items():
            after[k] = after.get(k, 0.0) + p * 0.05
            after[k + 1] = after.get(k + 1, 0.0) + p * 0.95
        going = {}
        for k, p in after.items():
            state = sprt(k, n, 0.9, 0.05, min_n=40, max_n=cap)
            if state == "met":
                met, met_n = met + p, met_n + n * p
            elif state != "not_met":
                going[k] = p
    assert abs(chance - met) < 1e-9 and abs(mean - met_n / met) < 1e-6 and round(chance, 2) == 0.70
    assert "at least 90%" in out and "judged on 40 held-out episodes" in out and "ending the run" in out
    assert "merely higher, once the champion's confirmation has stopped short" in out and "only on idle cells" in out
    assert "runs ahead of agents' experiments" in out and "at least 50% (20% to keep a lead; a champion judged 38 of 40 or more" in out
    assert f"stops short after at most {cap} episodes" in out
    assert (f"after {perfect} episodes for a policy that always succeeds, one at 95% within that cap with a chance "
            f"of 70% (after about {mean:.0f} episodes when it is)") in out
    assert sprt_episodes(0.9, 0.9, 0.05) is None and sprt_episodes(0.85, 0.9, 0.05) is None
    assert sprt_odds(0.95, 0.9, 0.05, 40, 6000) is None  # too long a cap to carry: the card says Wald's figure
    # a run that goes on, no background work, targets 0 and 1; a card without a fleet says no goal
    other = cfg.decode("[fleet]\nstop_at_target = false\n[scheduler]\nbackground = false\n[cells]\ntask = \"pusht\"\n",
                       "t.toml")
    text = tasks.card("pusht", other).render()
    assert "ending the run" not in text and "otherwise not at all" in text
    assert "whatever their outcome" in tasks.card("pusht", cfg.decode("[fleet]\ntarget = 0.0\n", "t.toml")).render()
    assert "no sample can confirm it" in tasks.card("pusht", cfg.decode("[fleet]\ntarget = 1.0\n", "t.toml")).render()
    assert "Fleet goal" not in tasks.card("pusht").render()
