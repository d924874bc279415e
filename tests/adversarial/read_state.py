"""Reads another file of the state directory (next to its scratch directory)."""


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        with open("../secret.txt") as f:
            data = f.read()
        return [256.0 + len(data), 256.0]
