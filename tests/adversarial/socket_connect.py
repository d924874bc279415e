"""Tries to reach a local service (exfiltration or a side channel to the cell)."""

import socket


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.01)
        s.connect(("127.0.0.1", 8080))
        s.sendall(b"hello")
        return [256.0, 256.0]
