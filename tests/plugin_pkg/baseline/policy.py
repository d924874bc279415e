import numpy as np


class Policy:
    """Heads for the goal it is shown."""

    def __init__(self, params):
        pass

    def act(self, obs):
        return np.asarray(obs[2:4], dtype=float)
