"""Never finishes importing: a busy loop at module level (think: a pathologically slow import)."""

while True:
    pass


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        return [0.0, 0.0]
