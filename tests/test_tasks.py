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
    """Agents are told the target and what confirming it takes: the episode counts quoted are the
    sequential rule's own (a perfect policy is confirmed exactly then; one halfway to perfect about then)."""
    import random

    from enpire.config import CONFIRMATION_CAP
    from enpire.metrics import sprt, sprt_episodes

    config = cfg.decode("[fleet]\ntarget = 0.9\nmin_heldout = 40\n[scheduler]\npromote_seeds = 40\nalpha = 0.05\n"
                        "[cells]\ntask = \"pusht\"\n", "test.toml")
    out = tasks.card("pusht", config).render()
    perfect, halfway = sprt_episodes(1.0, 0.9, 0.05, 40), sprt_episodes(0.95, 0.9, 0.05, 40)
    assert (perfect, halfway) == (56, 180)
    assert "at least 90%" in out and "judged on 40 held-out episodes" in out and "ending the run" in out
    assert f"about {perfect} episodes for a policy that always succeeds and about {halfway} for one at 95%" in out
    assert f"after at most {CONFIRMATION_CAP * 40} episodes" in out
    assert sprt(perfect, perfect, 0.9, 0.05, min_n=40) == "met" and sprt(perfect - 1, perfect - 1, 0.9, 0.05, min_n=40) == ""
    rng, stops = random.Random(3), []
    for _ in range(300):  # a policy at 95%: the rule's mean stopping time among its "met"s is near the quote
        s = n = 0
        while sprt(s, n, 0.9, 0.05, min_n=40) != "met" and n < 5000:
            s, n = s + (rng.random() < 0.95), n + 1
        stops.append(n)
    assert 0.8 * halfway < sum(stops) / len(stops) < 1.4 * halfway, sum(stops) / len(stops)
    assert sprt_episodes(0.9, 0.9, 0.05) is None and sprt_episodes(0.85, 0.9, 0.05) is None
    # no target to confirm: the card says the goal without a test; a run that goes on says no "ending"
    endless = cfg.decode("[fleet]\nstop_at_target = false\n[cells]\ntask = \"pusht\"\n", "t.toml")
    assert "ending the run" not in tasks.card("pusht", endless).render()
    assert "Fleet goal" not in tasks.card("pusht").render()
