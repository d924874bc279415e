"""Trusted verification: Push-T geometry against the env, the vision verifier against the state one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.vision_verifier import confusion
from enpire.verify import (
    PUSHT_GOAL_POSE,
    pusht_coverage,
    success_at_reset,
    verify,
    verify_metaworld,
    verify_pusht_frame,
    verify_pusht_state,
)
from hw import make_driver
from hw.pusht import PushTDriver


@pytest.fixture(scope="module")
def driver() -> PushTDriver:
    d = PushTDriver(frame_size=256)
    d.connect()
    yield d
    d.disconnect()


def test_driver_steps_exactly_like_gym_pusht(driver: PushTDriver) -> None:
    """act() + outcome() re-order gym-pusht's step (observation first, scoring second); observations and
    terminations must stay identical to the env's own step, rewards equal to the last bits (the block's
    shapes are a set, so two env instances may sum the coverage polygons in a different order)."""
    import gym_pusht  # noqa: F401
    import gymnasium as gym

    from enpire.agents import pusht_policy

    env = gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped
    policy = pusht_policy.Policy(dict(pusht_policy.INITIAL_PARAMS))  # solves most seeds: terminations happen
    terminations = 0
    for seed in range(8):
        obs_env, _ = env.reset(seed=seed)
        obs = driver.reset(seed)
        policy.reset()
        assert np.array_equal(obs, obs_env)
        for _ in range(300):
            a = np.asarray(policy.act(obs_env), dtype=np.float64)
            obs_env, reward_env, terminated, _, _ = env.step(a)
            out = driver.step(a)
            assert np.array_equal(out.observation, obs_env)
            assert out.reward == pytest.approx(float(reward_env), abs=1e-12) and out.done == bool(terminated)
            if terminated:
                terminations += 1
                break
    env.close()
    assert terminations >= 4


def test_coverage_agrees_with_env(driver: PushTDriver) -> None:
    rng = np.random.default_rng(7)
    checked = 0
    for seed in range(150):  # the env's own starts, then a few random pushes
        driver.reset(seed)
        for _ in range(3):
            driver.step(rng.uniform(0, 512, 2))
        assert pusht_coverage(**_poses(driver)) == pytest.approx(driver.coverage(), abs=1e-6)
        checked += 1
    gx, gy, ga = PUSHT_GOAL_POSE
    for _ in range(300):  # near the goal, where coverage is neither 0 nor 1
        pose = [gx + rng.normal(0, 8), gy + rng.normal(0, 8), ga + rng.normal(0, 0.2)]
        driver.set_state(pose, [30.0, 30.0])
        assert pusht_coverage(**_poses(driver)) == pytest.approx(driver.coverage(), abs=1e-6)
        checked += 1
    assert checked == 450


def _poses(driver: PushTDriver) -> dict:
    s = driver.trusted_state()
    return {"block_pose": s["block_pose"], "goal_pose": s["goal_pose"]}


def test_state_verdicts(driver: PushTDriver) -> None:
    win = driver.set_state(list(PUSHT_GOAL_POSE), [40.0, 40.0])
    v = verify_pusht_state(win)
    assert (v.success, v.score, v.reason, v.verifier) == (True, pytest.approx(1.0), "success", "pusht_state")
    near = driver.set_state([PUSHT_GOAL_POSE[0] + 6, PUSHT_GOAL_POSE[1], PUSHT_GOAL_POSE[2]], [40.0, 40.0])
    v = verify_pusht_state(near)
    assert not v.success and 0.8 < v.score < 0.95 and v.reason.startswith("coverage 0.")
    assert not verify_pusht_state({"block_pose": [math.nan, 0, 0], "goal_pose": list(PUSHT_GOAL_POSE)}).success
    assert not verify_pusht_state({}).success


def test_driver_contract(driver: PushTDriver) -> None:
    a = driver.reset(3)
    b = driver.reset(3)
    assert a.shape == (driver.observation_dim,) and np.array_equal(a, b)
    assert list(driver.action_low) == [0, 0] and list(driver.action_high) == [512, 512]
    driver.step(np.array([100.0, 100.0]))
    state = driver.trusted_state()
    assert set(state) == {"block_pose", "goal_pose", "agent_pos"}
    frame = driver.frame()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    # No action marker or contact markers: nothing strongly red anywhere.
    red = (frame[..., 0] > 200) & (frame[..., 1] < 120) & (frame[..., 2] < 120)
    assert not red.any()
    # set_state is exact (the angle is set before the position).
    s = driver.set_state([200.0, 310.0, 1.234], [50.0, 60.0])
    assert s["block_pose"] == pytest.approx([200.0, 310.0, 1.234], abs=1e-9)
    assert s["agent_pos"] == pytest.approx([50.0, 60.0])


def test_vision_confusion_matrix() -> None:
    """>= 500 rendered end states, many near the threshold: vision must almost never say success when
    the state says failure."""
    result = confusion(n=500, seed=0, frame_size=256)
    print("\nvision verifier confusion matrix:", json.dumps({k: result[k] for k in (
        "n", "frame_size", "counts", "false_positive_rate", "false_negative_rate", "near_threshold_0.90_0.99")}))
    c = result["counts"]
    assert sum(c.values()) == 500
    assert result["state_failures"] > 200 and result["state_successes"] > 50
    assert result["false_positive_rate"] <= 0.01, result["false_positives"]
    assert result["false_negative_rate"] < 0.5  # conservative, but still useful


def test_vision_refuses_what_it_cannot_see(driver: PushTDriver) -> None:
    white = np.full((256, 256, 3), 255, np.uint8)
    assert verify_pusht_frame(white).reason == "no block in view"
    assert not verify_pusht_frame(white.astype(np.float32)).success
    assert not verify_pusht_frame(np.zeros((256, 200, 3), np.uint8)).success
    driver.set_state(list(PUSHT_GOAL_POSE), [40.0, 40.0])
    good = driver.frame()
    assert verify_pusht_frame(good).success
    # Green painted outside the goal (a moved or fake goal) is refused.
    fake = good.copy()
    fake[10:60, 10:60] = (144, 238, 144)
    assert not verify_pusht_frame(fake).success
    # Green showing through the block (a painted-over goal) is refused.
    holed = good.copy()
    holed[124:132, 124:132] = (144, 238, 144)
    assert not verify_pusht_frame(holed).success


def test_dispatch_and_metaworld_verdicts(driver: PushTDriver) -> None:
    state = driver.set_state(list(PUSHT_GOAL_POSE), [40.0, 40.0])
    assert verify("pusht", state).verifier == "pusht_state"
    assert verify("pusht", state, driver.frame(), method="vision").verifier == "pusht_vision"
    assert not verify("pusht", state, None, method="vision").success
    assert success_at_reset("pusht", state)
    with pytest.raises(ValueError, match="known: pusht, metaworld"):
        verify("cartpole", state)
    with pytest.raises(ValueError):
        verify("pusht", state, method="smell")
    assert verify_metaworld({"success": [1.0]}).success
    v = verify("metaworld", {"success": [0.0], "progress": [0.4]})
    assert (v.success, v.score, v.verifier) == (False, pytest.approx(0.4), "metaworld")
    assert not verify_metaworld({}).success


def test_make_driver_registry() -> None:
    assert isinstance(make_driver("pusht", frame_size=96), PushTDriver)
    with pytest.raises(ValueError, match="known: pusht"):
        make_driver("nope")
