"""Never answers act(): a thread writes well-formed replies to an old request (sequence number 1) to the
reply pipe as fast as it can, so a parent that skips late replies without looking at the clock never
reaches its deadline."""

import os
import struct
import threading
import time

STALE = struct.pack(">IBQ", 9 + 16, 0xC1, 1) + struct.pack("<2d", 256.0, 256.0)


def flood() -> None:
    burst = STALE * 256
    while True:
        os.write(4, burst)  # fd 4: the child's private copy of its reply pipe


class Policy:
    def __init__(self, params):
        self.started = False

    def act(self, obs):
        if not self.started:
            self.started = True
            threading.Thread(target=flood, daemon=True).start()
        time.sleep(3600)
