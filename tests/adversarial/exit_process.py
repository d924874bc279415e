"""Hard-exits the interpreter mid-episode (no exception to catch)."""

import os


class Policy:
    def __init__(self, params):
        self.t = 0

    def act(self, obs):
        self.t += 1
        if self.t == 5:
            os._exit(7)
        return [256.0, 256.0]
