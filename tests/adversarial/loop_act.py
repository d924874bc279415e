"""Never answers: a busy loop inside act()."""


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        while True:
            pass
