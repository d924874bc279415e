"""Tries to run a shell command."""

import subprocess


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        out = subprocess.run(["sh", "-c", "id; env"], capture_output=True, check=False).stdout
        return [256.0 + len(out) % 10, 256.0]
