"""Parametric heuristic controller for Meta-World peg-insert-side-v3 (39-dim goal-observable state).

Observation layout (measured): obs[0:3] hand xyz, obs[3] gripper opening (1 open .. ~0.3 closed on the
peg), obs[4:7] the peg's grasp site (3 cm from the peg centre towards its tail, 1 cm up), obs[7:11] the
peg's orientation quaternion (x, y, z, w), obs[11:18] zeros, obs[18:36] the previous frame of those
18 values, obs[36:39] the goal: a point 6.6 cm deep inside the box's hole.  The peg (a 24 x 3 x 3 cm
bar) lies along x; its head is at (-0.13, 0, -0.01) from the grasp site in the peg frame.  The box's
hole opens towards +x, is 6 cm wide (y) and 6 cm tall (z) around the goal's y and z, so the peg
(3 x 3 cm) has 1.5 cm of play.  Success: |(head - goal) * (1, 2, 2)| <= 0.07.

The first observation after reset can be stale (bodies are moved without a forward pass), so the
first action only opens the gripper.

Phases (a proportional controller toward a target in each; the hand target during transport is the
desired head position plus the current hand-to-head offset, so a peg held slightly crooked is still
steered by its head):
  0 approach: above the grasp point (grasp site + (grasp_dx, 0, grasp_dz + approach_h)), gripper open;
  1 descend:  to grasp site + (grasp_dx, 0, grasp_dz), until within 5 mm or 30 steps;
  2 close:    hold there with the gripper closed for `close_steps` steps;
  3 lift:     head straight up to goal height + `lift`;
  4 align:    head to (goal_x + pre_dist, goal_y, goal_z) until within `align_tol`;
  5 insert:   head to (goal_x - insert_depth, goal_y, goal_z).
From phase 3 on, if the grasp site is more than `lost_dist` from the hand (peg dropped), start over.

Only ``math`` and ``numpy`` are used.
"""

from __future__ import annotations

import math

import numpy as np

PARAM_SPACE: dict[str, tuple[float, float]] = {
    "gain": (2.0, 30.0),            # action units per metre of position error
    "approach_h": (0.03, 0.20),     # height (m) above the grasp pose while aligning in xy
    "xy_tol": (0.004, 0.04),        # xy error (m) to start descending
    "grasp_dx": (-0.06, 0.06),      # grasp point offset along the peg (m, + towards the tail)
    "grasp_dz": (0.0, 0.06),        # hand height above the grasp site when closing (m)
    "close_steps": (3.0, 30.0),     # steps to hold while the fingers close
    "lift": (-0.02, 0.10),          # head height above the goal while lifting (m)
    "pre_dist": (0.05, 0.30),       # x standoff (m) of the head in front of the goal before inserting
    "align_tol": (0.003, 0.04),     # head-to-pre-insert-point distance (m) to start inserting
    "insert_depth": (-0.03, 0.08),  # insert target: goal_x - insert_depth (m)
    "lost_dist": (0.05, 0.20),      # hand-to-peg distance (m) that means the peg was dropped
}

# A first hand-written guess (before any tuning).
INITIAL_PARAMS: dict[str, float] = {
    "gain": 10.0,
    "approach_h": 0.10,
    "xy_tol": 0.01,
    "grasp_dx": 0.0,
    "grasp_dz": 0.04,
    "close_steps": 10.0,
    "lift": 0.0,
    "pre_dist": 0.20,
    "align_tol": 0.01,
    "insert_depth": 0.02,
    "lost_dist": 0.10,
}

TUNED_HINT = None

HEAD_FROM_GRASP = np.array([-0.13, 0.0, -0.01])   # peg head relative to the grasp site, peg frame
MAX_DELTA = 1.0       # largest change of any action component between consecutive steps
DESCEND_STEPS = 30    # give up waiting for the exact grasp height after this many steps


def _rotate(q, v):
    x, y, z, w = (float(c) for c in q)
    n = math.sqrt(x * x + y * y + z * z + w * w)
    if not math.isfinite(n) or n < 1e-6:
        return np.asarray(v, dtype=np.float64)
    x, y, z, w = x / n, y / n, z / n, w / n
    r = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])
    return r @ np.asarray(v, dtype=np.float64)


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
        self.count = 0
        self.t = 0
        self.last = None

    def on_failure(self, info: dict) -> None:
        self.reset()

    def _set_phase(self, k: int) -> None:
        self.phase = k
        self.count = 0

    def act(self, obs) -> np.ndarray:
        p = self.p
        o = np.nan_to_num(np.asarray(obs, dtype=np.float64).reshape(-1), nan=0.0)
        self.t += 1
        if self.t == 1:                       # stale first observation: just open the gripper
            return self._out(np.array([0.0, 0.0, 0.0, -1.0]))
        hand, peg, quat, goal = o[0:3], o[4:7], o[7:11], o[36:39]
        head = peg + _rotate(quat, HEAD_FROM_GRASP)
        grasp = peg + np.array([p["grasp_dx"], 0.0, p["grasp_dz"]])
        self.count += 1

        if self.phase >= 3 and float(np.linalg.norm(hand - peg)) > p["lost_dist"]:
            self._set_phase(0)
        grip = 1.0
        target = hand
        if self.phase == 0:
            grip = -1.0
            target = grasp + np.array([0.0, 0.0, p["approach_h"]])
            if math.hypot(hand[0] - grasp[0], hand[1] - grasp[1]) < p["xy_tol"]:
                self._set_phase(1)
        if self.phase == 1:
            grip = -1.0
            target = grasp
            if math.hypot(hand[0] - grasp[0], hand[1] - grasp[1]) > 2.0 * p["xy_tol"] + 0.01:
                self._set_phase(0)
                target = grasp + np.array([0.0, 0.0, p["approach_h"]])
            elif abs(hand[2] - grasp[2]) < 0.005 or self.count > DESCEND_STEPS:
                self._set_phase(2)
        if self.phase == 2:
            target = grasp
            if self.count > p["close_steps"]:
                self._set_phase(3)
        if self.phase >= 3:
            want = None
            if self.phase == 3:
                want = np.array([head[0], head[1], goal[2] + p["lift"]])
                if head[2] > goal[2] + p["lift"] - 0.02:
                    self._set_phase(4)
            if self.phase == 4:
                want = np.array([goal[0] + p["pre_dist"], goal[1], goal[2]])
                if float(np.linalg.norm(want - head)) < p["align_tol"]:
                    self._set_phase(5)
            if self.phase == 5:
                want = np.array([goal[0] - p["insert_depth"], goal[1], goal[2]])
            target = want + (hand - head)
        a = np.empty(4)
        a[:3] = p["gain"] * (target - hand)
        a[3] = grip
        return self._out(a)

    def _out(self, a: np.ndarray) -> np.ndarray:
        a = np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        if self.last is not None:
            a = np.clip(a, self.last - MAX_DELTA, self.last + MAX_DELTA)
        self.last = a
        return a.copy()
