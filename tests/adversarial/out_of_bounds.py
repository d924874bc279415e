"""Commands a target far outside the workspace."""


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        return [256.0, 10_000.0]
