"""Raises its own MemoryError subclass: that is the policy's error, not the sandbox's memory limit."""


class OutOfIdeas(MemoryError):
    pass


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        raise OutOfIdeas("no memory problem at all")
