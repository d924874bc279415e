"""Returns a 3-vector where the task wants 2."""


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        return [256.0, 256.0, 0.0]
