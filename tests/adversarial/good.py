"""Control: a well-behaved policy that drifts slowly right within bounds."""

import numpy as np


class Policy:
    def __init__(self, params: dict[str, float]) -> None:
        self.step = float(params.get("step", 2.0))
        self.t = 0

    def reset(self) -> None:
        self.t = 0

    def on_failure(self, info: dict) -> None:
        self.step = -self.step

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.t += 1
        return np.array([256.0 + self.step * self.t, 256.0])
