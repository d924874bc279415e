"""Tries to fork a helper process that would outlive the episode."""

import os


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        pid = os.fork()
        if pid == 0:
            while True:
                pass
        return [256.0, 256.0]
