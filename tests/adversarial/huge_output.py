"""Returns a ~100 MB list as its action (memory/IPC exhaustion of the cell)."""


class Policy:
    def __init__(self, params):
        self.big = [0.0] * 13_000_000

    def act(self, obs):
        return self.big
