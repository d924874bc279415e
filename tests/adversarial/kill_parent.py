"""Sends SIGKILL to the cell process that runs it."""

import os
import signal


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        os.kill(os.getppid(), signal.SIGKILL)
        return [256.0, 256.0]
