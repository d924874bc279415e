"""Writes its own failure reply with a 1 MB reason: it replaces the child's reply builder (the child
script is `__main__`) so the frame goes out well-formed, under the frame size cap, and with the right
sequence number."""

import __main__


class Policy:
    def __init__(self, params):
        def forged(result, seq, max_bytes):
            return __main__.Failed(seq, "policy_error: " + "A" * 1_000_000)

        __main__._to_action = forged

    def act(self, obs):
        return [256.0, 256.0]
