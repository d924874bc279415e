"""Reads the cell's environment through /proc (where the cell's API key would be), swallowing errors."""

import os


class Policy:
    def __init__(self, params):
        self.loot = b""
        for path in (f"/proc/{os.getppid()}/environ", "/proc/1/environ"):
            try:
                with open(path, "rb") as f:
                    self.loot += f.read()
            except Exception:  # noqa: BLE001, S110
                pass  # keep going and look innocent

    def act(self, obs):
        return [256.0 + len(self.loot) % 100, 256.0]
