"""Parametric heuristic controller for gym-pusht (state observations).

Observation: [agent_x, agent_y, block_x, block_y, block_angle]; the block position is the body
origin (centre of the top edge of the T bar), its centre of mass sits at (0, 45) in the body frame.
Action: absolute target for the PD-controlled circular pusher (radius 15).

Idea. The pusher/block contact is frictionless and the block is quasi-static (damping 0), so a push
at a boundary point c with inward normal n moves the block along the twist
    (n_x, n_y, (r x n) / k^2),   r = c - com,  k^2 = I / m = 3000 px^2.
Each step the controller scores a fixed set of candidate contact points on the T outline by how well
their twist points along the pose error (x, y, L * dtheta) -- a cosine in a metric that weighs
rotation with a characteristic length L -- minus a travel cost, picks one (with hysteresis), moves to
a pre-contact point behind it (orbiting around the block when the straight path would hit it) and
pushes through it by an amount proportional to the remaining error.

Only ``math`` and ``numpy`` are used; ``act`` runs in a few tens of microseconds.
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------
# Search space and a hand-written first guess.
# --------------------------------------------------------------------------------------------

PARAM_SPACE: dict[str, tuple[float, float]] = {
    "ang_len": (20.0, 250.0),        # px per rad weighing angle error against position error
    "ang_len_fine": (20.0, 250.0),   # same, once the position error is small
    "fine_dist": (2.0, 60.0),        # position error (px) below which ang_len_fine applies
    "hysteresis": (0.0, 0.5),        # score margin needed to abandon the current contact
    "travel_cost": (0.0, 1.0),       # score penalty per pi rad of travel around the block
    "standoff": (2.0, 40.0),         # gap (px) between pusher and face at the pre-contact point
    "clearance": (2.0, 50.0),        # extra radius (px) when orbiting the block
    "move_step": (20.0, 95.0),       # max carrot distance (px) while repositioning
    "push_gain": (0.1, 3.0),         # push depth per px of (weighted) pose error
    "push_min": (0.5, 20.0),         # min push depth (px)
    "push_max": (5.0, 90.0),         # max push depth (px)
    "lat_tol": (1.0, 20.0),          # lateral tolerance (px) to start pushing
    "depth_tol": (1.0, 30.0),        # along-normal tolerance (px) to start pushing
    "min_score": (-0.5, 0.8),        # cosine below which the controller re-selects without hysteresis
    "patience": (10.0, 60.0),        # repositioning steps before a contact is given up for a while
}

INITIAL_PARAMS: dict[str, float] = {
    "ang_len": 60.0,
    "ang_len_fine": 60.0,
    "fine_dist": 15.0,
    "hysteresis": 0.1,
    "travel_cost": 0.2,
    "standoff": 15.0,
    "clearance": 15.0,
    "move_step": 60.0,
    "push_gain": 0.5,
    "push_min": 3.0,
    "push_max": 40.0,
    "lat_tol": 6.0,
    "depth_tol": 8.0,
    "min_score": 0.2,
    "patience": 30.0,
}

TUNED_HINT = None

# --------------------------------------------------------------------------------------------
# Geometry (body frame of the T, see gym_pusht add_tee with scale 30).
# --------------------------------------------------------------------------------------------

R_PUSHER = 15.0
K2 = 3000.0                      # moment of inertia / mass
COM = np.array([0.0, 45.0])      # centre of mass in the body frame
GOAL = (256.0, 256.0, math.pi / 4)
LO, HI = 8.0, 504.0              # usable pusher centres (the kinematic pusher is not stopped by walls)
# axis-aligned rectangles of the T in the body frame: (xmin, xmax, ymin, ymax)
RECTS = ((-60.0, 60.0, 0.0, 30.0), (-15.0, 15.0, 30.0, 120.0))
R_BOUND = 77.0                   # max distance from COM to the outline


def _candidates():
    pts, nrm = [], []

    def add(xs, ys, n):
        for x in xs:
            for y in ys:
                pts.append((x, y))
                nrm.append(n)

    add(np.linspace(-54.0, 54.0, 13), [0.0], (0.0, -1.0))      # top of the bar
    add([60.0], [8.0, 15.0, 22.0], (1.0, 0.0))                  # right end of the bar
    add([-60.0], [8.0, 15.0, 22.0], (-1.0, 0.0))                # left end of the bar
    add([32.0, 44.0, 55.0], [30.0], (0.0, 1.0))                 # under the bar, right
    add([-32.0, -44.0, -55.0], [30.0], (0.0, 1.0))              # under the bar, left
    add([15.0], np.linspace(46.0, 114.0, 7), (1.0, 0.0))        # right side of the stem
    add([-15.0], np.linspace(46.0, 114.0, 7), (-1.0, 0.0))      # left side of the stem
    add([-9.0, 0.0, 9.0], [120.0], (0.0, 1.0))                  # bottom of the stem
    return np.array(pts), np.array(nrm)


C_LOC, N_OUT = _candidates()
N_IN = -N_OUT
_R = C_LOC - COM
TAU = (_R[:, 0] * N_IN[:, 1] - _R[:, 1] * N_IN[:, 0]) / K2   # rotation per unit impulse
GOAL_COM = (
    GOAL[0] + math.cos(GOAL[2]) * COM[0] - math.sin(GOAL[2]) * COM[1],
    GOAL[1] + math.sin(GOAL[2]) * COM[0] + math.cos(GOAL[2]) * COM[1],
)


def _wrap(a: float) -> float:
    return (a + math.pi) % (2.0 * math.pi) - math.pi


def _clearance_local(x: float, y: float) -> float:
    """Distance from a body-frame point to the T."""
    best = 1e9
    for x0, x1, y0, y1 in RECTS:
        dx = max(x0 - x, 0.0, x - x1)
        dy = max(y0 - y, 0.0, y - y1)
        d = math.hypot(dx, dy)
        best = min(best, d)
    return best


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
        self.contact = -1
        self.engaged = False
        self.orbit_dir = 0
        self.nav_steps = 0
        self.t = 0
        self.ban = np.zeros(len(C_LOC))
        self.last_action = None

    def on_failure(self, info: dict) -> None:
        self.reset()

    # ----------------------------------------------------------------------------------------
    def act(self, obs) -> np.ndarray:
        p = self.p
        self.t += 1
        ax, ay, bx, by, th = (float(v) for v in obs[:5])
        c, s = math.cos(th), math.sin(th)
        comx = bx + c * COM[0] - s * COM[1]
        comy = by + s * COM[0] + c * COM[1]
        ex, ey = GOAL_COM[0] - comx, GOAL_COM[1] - comy
        eth = _wrap(GOAL[2] - th)
        dpos = math.hypot(ex, ey)
        L = p["ang_len_fine"] if dpos < p["fine_dist"] else p["ang_len"]
        err = math.sqrt(dpos * dpos + (L * eth) ** 2)

        # --- score candidate contacts (vectorised) ---
        nwx = c * N_IN[:, 0] - s * N_IN[:, 1]
        nwy = s * N_IN[:, 0] + c * N_IN[:, 1]
        num = nwx * ex + nwy * ey + L * L * TAU * eth
        den = np.sqrt(1.0 + (L * TAU) ** 2) * max(err, 1e-6)
        cos_sc = num / den
        # pre-contact points in world frame
        off = R_PUSHER + p["standoff"]
        plx = C_LOC[:, 0] + N_OUT[:, 0] * off
        ply = C_LOC[:, 1] + N_OUT[:, 1] * off
        prx = bx + c * plx - s * ply
        pry = by + s * plx + c * ply
        # travel cost: angle around the COM between pusher and pre-contact point
        phi_a = math.atan2(ay - comy, ax - comx)
        dphi = np.abs((np.arctan2(pry - comy, prx - comx) - phi_a + math.pi) % (2 * math.pi) - math.pi)
        score = cos_sc - p["travel_cost"] * dphi / math.pi
        reach = (prx > LO) & (prx < HI) & (pry > LO) & (pry < HI)
        score = np.where(reach, score, score - 2.0)
        score = np.where(self.ban > self.t, score - 3.0, score)
        k = self.contact
        if k >= 0 and not self.engaged:
            self.nav_steps += 1
            if self.nav_steps > p["patience"]:      # cannot get there: try another contact for a while
                self.ban[k] = self.t + 30
                score[k] -= 3.0
                self.contact = k = -1
        best = int(np.argmax(score))
        if k < 0 or cos_sc[k] < p["min_score"] or score[best] > score[k] + p["hysteresis"]:
            if best != k:
                self.engaged = False
                self.orbit_dir = 0
                self.nav_steps = 0
            k = best
        self.contact = k

        # --- where is the pusher relative to the chosen contact (body frame) ---
        rx, ry = ax - bx, ay - by
        lx, ly = c * rx + s * ry, -s * rx + c * ry
        cx, cy = C_LOC[k]
        nx, ny = N_OUT[k]
        d_n = (lx - cx) * nx + (ly - cy) * ny          # along outward normal
        d_t = -(lx - cx) * ny + (ly - cy) * nx         # lateral
        if abs(d_t) < p["lat_tol"] and R_PUSHER - 6.0 < d_n < off + p["depth_tol"]:
            self.engaged = True
            self.nav_steps = 0
        elif abs(d_t) > 2.0 * p["lat_tol"] + 5.0 or d_n > off + 2.0 * p["depth_tol"] + 10.0 or d_n < 0.0:
            self.engaged = False

        if self.engaged:
            # pusher-centre target: `depth` px past the touching position, proportional to the
            # error component this contact can remove (the target moves with the block)
            proj = max(float(cos_sc[k]) * err, 0.0)
            depth = min(max(p["push_gain"] * proj, p["push_min"]), p["push_max"])
            tlx, tly = cx + nx * (R_PUSHER - depth), cy + ny * (R_PUSHER - depth)
            tx = bx + c * tlx - s * tly
            ty = by + s * tlx + c * tly
        else:
            tx, ty = self._navigate(ax, ay, lx, ly, float(prx[k]), float(pry[k]),
                                    comx, comy, bx, by, c, s)

        return self._limit(tx, ty, ax, ay)

    # ----------------------------------------------------------------------------------------
    def _navigate(self, ax, ay, lx, ly, gx, gy, comx, comy, bx, by, c, s):
        p = self.p
        step = p["move_step"]
        # is the straight segment to the pre-contact point clear of the (inflated) block?
        glx = c * (gx - bx) + s * (gy - by)
        gly = -s * (gx - bx) + c * (gy - by)
        thr = min(R_PUSHER + 2.0, _clearance_local(glx, gly) - 0.5, _clearance_local(lx, ly) - 0.5)
        clear = True
        for i in range(1, 9):
            t = i / 8.0
            if _clearance_local(lx + t * (glx - lx), ly + t * (gly - ly)) < thr:
                clear = False
                break
        if clear:
            self.orbit_dir = 0
            dx, dy = gx - ax, gy - ay
            d = math.hypot(dx, dy)
            if d > step:
                dx, dy = dx * step / d, dy * step / d
            return ax + dx, ay + dy
        # orbit around the COM towards the pre-contact point
        rad = R_BOUND + R_PUSHER + p["clearance"]
        phi_a = math.atan2(ay - comy, ax - comx)
        dphi = _wrap(math.atan2(gy - comy, gx - comx) - phi_a)
        # go the other way round when the short arc leaves the arena (block near a wall)
        # (the direction is chosen once per repositioning manoeuvre, then kept)
        alt = dphi - math.copysign(2.0 * math.pi, dphi)
        if self.orbit_dir == 0:
            if self._arc_blocked(comx, comy, rad, phi_a, dphi) > self._arc_blocked(comx, comy, rad, phi_a, alt):
                dphi = alt
            self.orbit_dir = 1 if dphi > 0 else -1
        elif dphi * self.orbit_dir < 0 and abs(dphi) > 0.3:
            dphi = alt
        stepang = min(abs(dphi), step / rad)
        phi = phi_a + math.copysign(stepang, dphi)
        wx = min(max(comx + rad * math.cos(phi), 2.0), 510.0)
        wy = min(max(comy + rad * math.sin(phi), 2.0), 510.0)
        dx, dy = wx - ax, wy - ay
        d = math.hypot(dx, dy)
        if d < 3.0:  # degenerate: already on the orbit at the right bearing
            dx, dy = gx - ax, gy - ay
            d = math.hypot(dx, dy)
        if d > step:
            dx, dy = dx * step / d, dy * step / d
        return ax + dx, ay + dy

    @staticmethod
    def _arc_blocked(cx, cy, rad, phi0, dphi) -> int:
        bad = 0
        for i in range(1, 9):
            a = phi0 + dphi * i / 8.0
            x, y = cx + rad * math.cos(a), cy + rad * math.sin(a)
            if x < 2.0 or x > 510.0 or y < 2.0 or y > 510.0:
                bad += 1
        return bad

    def _limit(self, tx, ty, ax, ay) -> np.ndarray:
        tx = min(max(tx, 0.0), 512.0)
        ty = min(max(ty, 0.0), 512.0)
        ref = self.last_action if self.last_action is not None else (ax, ay)
        dx, dy = tx - ref[0], ty - ref[1]
        d = math.hypot(dx, dy)
        if d > 95.0:
            tx, ty = ref[0] + dx * 95.0 / d, ref[1] + dy * 95.0 / d
        if not (math.isfinite(tx) and math.isfinite(ty)):
            tx, ty = ref
        self.last_action = (tx, ty)
        return np.array([tx, ty], dtype=np.float64)
