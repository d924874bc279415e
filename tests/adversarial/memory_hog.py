"""Allocates 100 MB blocks until something gives."""

import numpy as np


class Policy:
    def __init__(self, params):
        self.hog = []

    def act(self, obs):
        for _ in range(1000):  # 100 GB if nothing stops it
            self.hog.append(np.empty(12_500_000))
        return [256.0, 256.0]
