"""Switches the audit hook off, then looks for the fleet's bus socket (`bus.sock` in the state dir, two
levels above a cell's scratch directory, or its short path under /tmp) and connects to it. The action
says what it found: +100 on x if it connected, +100 on y if a socket was even visible."""

import glob
import os
import socket

from hook_bypass import disable_hook

CANDIDATES = ["../bus.sock", "../../bus.sock", "../../../bus.sock"]


class Policy:
    def __init__(self, params):
        disable_hook()
        self.connected = self.visible = False
        for path in CANDIDATES + glob.glob("/tmp/enpire-*.sock"):
            if os.path.exists(path):
                self.visible = True
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.5)
                s.connect(path)
                s.sendall(b"\0" * 1024)
                self.connected = True
                s.close()
            except OSError:
                pass

    def act(self, obs):
        return [256.0 + 100.0 * self.connected, 256.0 + 100.0 * self.visible]
