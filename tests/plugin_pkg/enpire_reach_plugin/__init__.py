"""A point robot that must reach a seeded goal in the unit square: a driver and its verifier, as a plugin.

Observation [x, y, goal_x, goal_y]; action = the target position in [0, 1]^2, of which the robot covers
`gain` per step. Success: within `tolerance` of the goal at the end of the episode.
"""

from __future__ import annotations

import math

import numpy as np

from bus.messages import Verdict


def verify_reach(state, frame=None, method="state") -> Verdict:
    try:
        x, y = (float(v) for v in state["position"])
        gx, gy = (float(v) for v in state["goal"])
        tolerance = float(state["tolerance"][0])
    except (KeyError, TypeError, ValueError):
        return Verdict(success=False, score=0.0, reason="invalid state", verifier="reach2d")
    distance = math.hypot(x - gx, y - gy)
    success = distance <= tolerance
    return Verdict(success=success, score=max(0.0, 1.0 - distance), reason="success" if success else
                   f"distance {distance:.3f} > {tolerance}", verifier="reach2d")


class ReachDriver:
    name = "reach2d"
    verifier = "enpire_reach_plugin:verify_reach"
    observation_dim = 4

    def __init__(self, task: str = "reach", gain: float = 0.5, tolerance: float = 0.02) -> None:
        self.task = task
        self.gain = float(gain)
        self.tolerance = float(tolerance)
        self.action_low = np.zeros(2)
        self.action_high = np.ones(2)
        self.position = np.zeros(2)
        self.goal = np.zeros(2)

    @classmethod
    def task_spec(cls):
        from enpire.tasks import Field, ObservationKind, TaskSpec

        unit = "unit square"
        return TaskSpec(
            name="reach", driver="reach2d", title="Point reach (plugin)",
            observations={"state": ObservationKind(4, (Field("position", 0, 2, unit, "robot x, y"),
                                                       Field("goal", 2, 2, unit, "goal x, y")))},
            action_fields=(Field("target", 0, 2, unit, "where the robot heads"),), action_low=(0.0, 0.0),
            action_high=(1.0, 1.0), action_meaning="target position; the robot covers `gain` of the way per step",
            goal="end within `tolerance` of the goal", success="distance to the goal <= tolerance at the end",
            score="1 - distance", control_hz=10.0, horizon=20)

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def _obs(self) -> np.ndarray:
        return np.r_[self.position, self.goal]

    def reset(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        self.position = rng.uniform(0.1, 0.9, 2)
        self.goal = rng.uniform(0.1, 0.9, 2)
        return self._obs()

    def act(self, action) -> np.ndarray:
        self.position = self.position + self.gain * (np.asarray(action, dtype=float) - self.position)
        return self._obs()

    def outcome(self) -> tuple[float, bool]:
        return 0.0, False

    def trusted_state(self) -> dict[str, list[float]]:
        return {"position": list(map(float, self.position)), "goal": list(map(float, self.goal)),
                "tolerance": [self.tolerance]}

    def frame(self):
        return None
