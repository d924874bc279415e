"""Ignores SIGXCPU and spins: only the hard CPU limit (SIGKILL) stops it; the reason must still be cpu_limit."""

import signal


class Policy:
    def __init__(self, params):
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)

    def act(self, obs):
        while True:
            pass
