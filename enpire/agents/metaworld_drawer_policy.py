"""Parametric heuristic controller for Meta-World drawer-open-v3 (39-dim goal-observable state).

Observation layout (measured): obs[0:3] hand (end-effector) xyz, obs[3] gripper opening, obs[4:7]
handle xyz, obs[7:11] drawer quaternion, obs[11:18] unused (zeros), obs[18:36] the previous frame of
the same 18 values, obs[36:39] goal xyz.  The goal is where the handle must end up: same x as the
handle, 0.20 m closer to the robot (-y), same height.  The drawer slides along -y only, so the
handle's x equals the goal's x for the whole episode.  On the very first step after reset the handle
block of the observation can be stale (the drawer body is moved without a forward pass), so the
controller takes x from the goal and, at t == 0, y from goal_y + 0.20.

Action: (dx, dy, dz, gripper) in [-1, 1]; one unit moves the mocap ~1 cm.  Success: handle within
3 cm of the goal.

Phases (a proportional controller toward a moving target in each):
  0 approach: go above the handle (at `approach_h` over the engage point) until within `xy_tol`;
  1 descend: go down to the engage point (handle + (0, y_off, z_off)) until within `z_tol`;
  2 pull:    keep x and z on the engage point and drive y to goal_y - `overshoot`, gripper at `grip`.
If, while pulling, the hand drifts more than `lost_dist` from the engage point (it lost the handle),
the controller goes back to phase 0.

Only ``math`` and ``numpy`` are used.
"""

from __future__ import annotations

import math

import numpy as np

PARAM_SPACE: dict[str, tuple[float, float]] = {
    "gain": (2.0, 40.0),           # action units per metre of position error
    "approach_h": (0.03, 0.20),    # height (m) above the engage point while aligning in xy
    "xy_tol": (0.004, 0.05),       # xy error (m) to start descending
    "z_tol": (0.003, 0.05),        # z error (m) to start pulling
    "y_off": (-0.04, 0.04),        # engage point: handle + y_off along the drawer axis (m)
    "z_off": (-0.04, 0.05),        # engage point: handle + z_off in height (m)
    "overshoot": (-0.03, 0.10),    # pull target: goal_y - overshoot (m)
    "grip": (-1.0, 1.0),           # gripper command while pulling (-1 open, +1 closed)
    "lost_dist": (0.03, 0.15),     # hand-to-engage-point distance that means the handle was lost
}

# A first hand-written guess: come down on the handle from 8 cm above, close the fingers on it and
# pull to the goal.
INITIAL_PARAMS: dict[str, float] = {
    "gain": 10.0,
    "approach_h": 0.08,
    "xy_tol": 0.02,
    "z_tol": 0.015,
    "y_off": 0.0,
    "z_off": 0.0,
    "overshoot": 0.0,
    "grip": 1.0,
    "lost_dist": 0.08,
}

TUNED_HINT = None

PULL_DIST = 0.20      # the drawer's travel from closed to the goal (m)
MAX_DELTA = 1.0       # largest change of any action component between consecutive steps


class Policy:
    def __init__(self, params: dict[str, float] | None = None) -> None:
        unknown = sorted(set(params or {}) - set(INITIAL_PARAMS))
        if unknown:  # a misspelled name must fail here, not be dropped silently
            raise ValueError(f"unknown policy parameter(s) {', '.join(unknown)}; this policy takes "
                             f"{', '.join(INITIAL_PARAMS)}")
        p = dict(INITIAL_PARAMS)
        if params:
            p.update({k: float(v) for k, v in params.items()})
        self.p = p
        self.reset()

    def reset(self) -> None:
        self.phase = 0
        self.t = 0
        self.last = None

    def on_failure(self, info: dict) -> None:
        self.reset()

    def act(self, obs) -> np.ndarray:
        p = self.p
        o = np.asarray(obs, dtype=np.float64).reshape(-1)
        hand = o[0:3]
        gx, gy, gz = float(o[36]), float(o[37]), float(o[38])
        hx = gx
        hy = gy + PULL_DIST if self.t == 0 else float(o[5])
        hz = gz if self.t == 0 else float(o[6])
        if not all(math.isfinite(v) for v in (hx, hy, hz)):
            hx, hy, hz = float(hand[0]), float(hand[1]), float(hand[2])
        self.t += 1

        ex, ey, ez = hx, hy + p["y_off"], hz + p["z_off"]       # engage point
        grip = -1.0
        if self.phase == 2:
            d = math.sqrt((hand[0] - ex) ** 2 + (hand[1] - ey) ** 2 + (hand[2] - ez) ** 2)
            if d > p["lost_dist"]:
                self.phase = 0
        if self.phase == 0:
            target = (ex, ey, ez + p["approach_h"])
            if math.hypot(hand[0] - ex, hand[1] - ey) < p["xy_tol"]:
                self.phase = 1
        if self.phase == 1:
            target = (ex, ey, ez)
            if math.hypot(hand[0] - ex, hand[1] - ey) > 2.0 * p["xy_tol"] + 0.01:
                self.phase = 0
                target = (ex, ey, ez + p["approach_h"])
            elif abs(hand[2] - ez) < p["z_tol"]:
                self.phase = 2
        if self.phase == 2:
            target = (ex, gy - p["overshoot"], ez)
            grip = p["grip"]

        a = np.empty(4)
        for i in range(3):
            a[i] = p["gain"] * (target[i] - hand[i])
        a[3] = grip
        a = np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        if self.last is not None:
            a = np.clip(a, self.last - MAX_DELTA, self.last + MAX_DELTA)
        self.last = a
        return a.copy()
