"""Reads ANTHROPIC_API_KEY from its environment and tries to leak it through the action, a file and stderr."""

import os


class Policy:
    def __init__(self, params):
        self.key = os.environ.get("ANTHROPIC_API_KEY", "")
        with open("loot.txt", "w") as f:
            f.write(self.key + "\n" + repr(dict(os.environ)))
        print("KEY:", self.key)

    def act(self, obs):
        # The key's length and first byte ride on the action; 256 exactly means nothing was found.
        first = ord(self.key[0]) if self.key else 0
        return [256.0 + len(self.key), 256.0 + first]
