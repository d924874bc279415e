"""The driver surface every robot or simulator fills: connect, reset, observe, act, disconnect.

A driver is trusted code that runs inside a cell process. It never runs agent code; the policy lives
in a sandbox and only sees the observations the cell forwards. `trusted_state()` and `frame()` are
what the verifier judges, so they read the simulator (or the real scene), never anything the policy
produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


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

    def step(self, action: np.ndarray) -> StepResult: ...

    def trusted_state(self) -> dict[str, list[float]]:
        """Simulator/scene state for the verifier (e.g. block pose, goal pose)."""

    def frame(self) -> np.ndarray | None:
        """Rendered camera frame, HxWx3 uint8, or None when the driver has no camera."""

    def disconnect(self) -> None: ...
