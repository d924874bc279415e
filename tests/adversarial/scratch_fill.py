"""Fills its scratch directory with 1 MB files (up to 200 MB, to keep a failing run bounded), ignoring
errors; the action's x says how many MB it managed to write."""

import os

BLOCK = b"\0" * (1 << 20)


class Policy:
    def __init__(self, params):
        self.written = 0
        for i in range(200):
            try:
                with open(f"fill-{i}.bin", "wb") as f:
                    f.write(BLOCK)
                self.written += 1
            except OSError:
                try:
                    os.remove(f"fill-{i}.bin")
                except OSError:
                    pass
                break

    def act(self, obs):
        return [256.0 + self.written, 256.0]
