"""Hoards 600 MB in memfds (memory that RLIMIT_AS does not see, since it is never mapped), in 12 MB
pieces to stay under RLIMIT_FSIZE; the action's x says how many MB it holds."""

import os

BLOCK = b"\1" * (1 << 20)


class Policy:
    def __init__(self, params):
        self.fds = []
        self.held = 0
        for _ in range(50):
            fd = os.memfd_create("hoard")
            for _ in range(12):
                os.write(fd, BLOCK)
                self.held += 1
            self.fds.append(fd)

    def act(self, obs):
        return [256.0 + self.held, 256.0]
