"""The driver surface every robot or simulator fills: connect, reset, act, outcome, disconnect.

A driver is trusted code that runs inside a cell process. It never runs agent code; the policy lives
in a sandbox and only sees the observations the cell forwards. `trusted_state()` and `frame()` are
what the verifier judges, so they read the simulator (or the real scene), never anything the policy
produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class DriverError(RuntimeError):
    """The robot or one of its cameras failed (not the policy): one line naming which and how.
    The cell holds the episode unverified (not counted) and, on a real cell, pauses."""


@dataclass(frozen=True)
class StepResult:
    observation: np.ndarray
    reward: float
    done: bool  # the task's own termination (e.g. success reached), not the horizon


class Driver(Protocol):
    name: str
    task: str
    observation_dim: int
    action_low: np.ndarray  # per-dimension bounds of a valid action
    action_high: np.ndarray

    def connect(self) -> None: ...

    def reset(self, seed: int) -> np.ndarray:
        """Put the scene in the seeded start state and return the first observation."""

    def act(self, action: np.ndarray) -> np.ndarray:
        """Command the robot (or advance the simulator) and return the observation that follows.

        Only what the policy needs next: the cell hands it to the policy before asking for `outcome()`,
        so a simulator's scoring of the step overlaps with the policy's thinking."""

    def outcome(self) -> tuple[float, bool]:
        """(reward, done) of the last `act`; done is the task's own termination (e.g. success
        reached), not the horizon. A real robot without a reward signal returns (0.0, False)."""

    def step(self, action: np.ndarray) -> StepResult:
        """`act` then `outcome`, for code that has nothing to do in between."""
        observation = self.act(action)
        reward, done = self.outcome()
        return StepResult(observation=observation, reward=reward, done=done)

    def trusted_state(self) -> dict[str, list[float]]:
        """Simulator/scene state for the verifier (e.g. block pose, goal pose)."""

    def frame(self) -> np.ndarray | None:
        """Rendered camera frame, HxWx3 uint8, or None when the driver has no camera."""

    def halt(self) -> None:
        """E-stop: stop moving now. A simulator has nothing to stop."""

    def disconnect(self) -> None: ...
