"""Trusted verification: pure functions from the simulator's own state to a verdict."""

from __future__ import annotations

import numpy as np
import shapely.geometry as sg
from shapely import affinity

from bus.messages import Verdict

PUSHT_SUCCESS = 0.95
_SCALE, _LENGTH = 30.0, 4.0
# The T in its body frame, as gym-pusht builds it: a 120x30 bar and a 30x90 stem below it.
_BAR = sg.box(-_LENGTH * _SCALE / 2, 0.0, _LENGTH * _SCALE / 2, _SCALE)
_STEM = sg.box(-_SCALE / 2, _SCALE, _SCALE / 2, _LENGTH * _SCALE)


def _tee(pose) -> sg.MultiPolygon:
    x, y, angle = (float(v) for v in pose)
    parts = [affinity.translate(affinity.rotate(p, angle, origin=(0, 0), use_radians=True), x, y) for p in (_BAR, _STEM)]
    return sg.MultiPolygon(parts)


def pusht_coverage(block_pose, goal_pose) -> float:
    goal = _tee(goal_pose)
    return float(goal.intersection(_tee(block_pose)).area / goal.area)


def verify_pusht_state(state: dict) -> Verdict:
    coverage = pusht_coverage(state["block_pose"], state["goal_pose"])
    if not np.isfinite(coverage):
        return Verdict(False, 0.0, "invalid state", "pusht_state")
    success = coverage > PUSHT_SUCCESS
    reason = "success" if success else f"coverage {coverage:.3f} <= {PUSHT_SUCCESS}"
    return Verdict(success, coverage, reason, "pusht_state")


def verify(task_kind: str, state: dict, frame=None, method: str = "state") -> Verdict:
    if task_kind == "pusht" and method == "state":
        return verify_pusht_state(state)
    raise ValueError(f"no {method} verifier for task kind {task_kind!r}")
