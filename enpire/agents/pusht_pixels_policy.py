"""Push-T from pixels, perception inside the policy: a pose estimate from the camera frame feeds the
state controller of `pusht_policy.py` (the paper's "tool calling" regime).

Observation: {"pixels": (96, 96, 3) uint8 RGB frame, "agent_pos": (2,) pusher position in px}; the block
pose is never handed over, so this policy measures it. The frame is gym-pusht's drawing of the
512 x 512 px workspace (row = y, column = x) resized to 96 x 96: white floor, the light-green goal
T, the blue pusher, and the grey block drawn last (so the pusher never hides it).

Perception (numpy only, a few ms):
1. Block coverage per pixel: every pixel is a blend of two of the scene's colours; the block's share
   of it, by projection onto the nearest blend line (zero on lines without the block), kept only
   within two pixels of the block's core.
2. Area moments of `a`: the centroid gives the T's area centre, the principal axes the direction of its
   stem (the T's variance along the stem is 1.7x that across it), the third moment along that axis its
   sign (the stem is the long tail).
3. A few Gauss-Newton steps fit (x, y, angle) so that the T drawn the way the camera draws it matches
   the coverage image (the moments alone are off by ~0.6 px and ~0.9 degrees; a pixel is 5.3 px).
The block pose is then [x, y, angle] of the body origin (top-centre of the bar), the state the
controller expects.

The controller's parameters are this policy's parameters; the template is committed with
`pusht_policy.py` beside it (COMPANIONS).
"""

from __future__ import annotations

import math

import numpy as np

try:  # in the sandbox: the controller is committed next to this file
    import pusht_policy as controller
except ImportError:  # in-process (policy_eval, tests)
    from enpire.agents import pusht_policy as controller

PARAM_SPACE = dict(controller.PARAM_SPACE)
INITIAL_PARAMS = dict(controller.INITIAL_PARAMS)
COMPANIONS = ("pusht_policy",)  # modules of enpire.agents committed beside policy.py

WORLD = 512.0
WHITE, GREEN, WALL = (255.0, 255.0, 255.0), (144.0, 238.0, 144.0), (200.0, 200.0, 200.0)  # floor, goal, walls
BLOCK, PUSHER, RIM = (143.0, 163.0, 184.0), (78.0, 126.0, 255.0), (65.0, 105.0, 225.0)  # as gym-pusht draws them
# Every pixel is a blend of two of these colours (drawing order and the resize's interpolation): the
# block's share of the pixel is `a` on the lines ending in BLOCK, zero on the others.
LINES = ((WHITE, BLOCK), (GREEN, BLOCK), (PUSHER, BLOCK), (WALL, BLOCK),
         (WHITE, GREEN), (WHITE, WALL), (WHITE, PUSHER), (GREEN, PUSHER), (WALL, PUSHER),
         (WHITE, RIM), (GREEN, RIM), (PUSHER, RIM), (WALL, RIM))
OUTLINE = 1.35  # the block's outline is darker than its fill: up to this far along the line still counts
# The T in its body frame: bar x in [-60, 60], y in [0, 30]; stem x in [-15, 15], y in [30, 120].
RECTS = ((-60.0, 60.0, 0.0, 30.0), (-15.0, 15.0, 30.0, 120.0))
AREA_CENTRE = (3600.0 * 15.0 + 2700.0 * 75.0) / 6300.0  # y of the T's area centre in the body frame
EDGE, SOFT = 3.0, 3.0  # px: how far the drawn outline and the resize spread the block's edges
SAMPLE_SHIFT = -0.35  # px: where a pixel samples the drawing (measured: it removes a 0.3-0.45 px bias)
MIN_COVERAGE = 20.0  # pixels of block needed to trust an estimate


def coverage(frame: np.ndarray) -> np.ndarray:
    """(H, W) share of block colour in each pixel, in [0, 1]."""
    img = np.asarray(frame, dtype=np.float64)
    best = np.zeros(img.shape[:2])
    resid = np.full(img.shape[:2], np.inf)
    for bg, fg in LINES:
        bg, d = np.asarray(bg), np.asarray(fg) - np.asarray(bg)
        a = np.clip(((img - bg) @ d) / (d @ d), 0.0, OUTLINE if fg == BLOCK else 1.0)
        r = np.linalg.norm(img - (bg + a[..., None] * d), axis=-1)
        take = r < resid
        best = np.where(take, np.minimum(a, 1.0) if fg == BLOCK else 0.0, best)
        resid = np.minimum(r, resid)
    # Only the block's own neighbourhood: stray blends far away (a wall corner, the pusher's rim) would
    # weigh heavily in the moments.
    core = best >= 0.5
    near = core.copy()
    for _ in range(2):
        grown = near.copy()
        grown[1:] |= near[:-1]
        grown[:-1] |= near[1:]
        grown[:, 1:] |= near[:, :-1]
        grown[:, :-1] |= near[:, 1:]
        near = grown
    return np.where(near, best, 0.0)


def moments_pose(cov: np.ndarray) -> tuple[float, float, float] | None:
    """(x, y, angle) of the body origin from the coverage's area moments, or None when too little shows."""
    h, w = cov.shape
    m = cov.sum()
    if m < MIN_COVERAGE:
        return None
    px, py = _centres(cov.shape)
    cx, cy = (cov * px).sum() / m, (cov * py).sum() / m
    dx, dy = px - cx, py - cy
    mxx, myy, mxy = (cov * dx * dx).sum() / m, (cov * dy * dy).sum() / m, (cov * dx * dy).sum() / m
    phi = 0.5 * math.atan2(2.0 * mxy, mxx - myy)  # direction of largest variance: the stem axis
    ux, uy = math.cos(phi), math.sin(phi)
    if (cov * (dx * ux + dy * uy) ** 3).sum() < 0:  # the stem is the long tail
        ux, uy, phi = -ux, -uy, phi + math.pi
    theta = phi - math.pi / 2  # the body's +y axis (the stem) is (-sin, cos) of its angle
    return cx - AREA_CENTRE * ux, cy - AREA_CENTRE * uy, _wrap(theta)


def render_coverage(pose: tuple[float, float, float], shape: tuple[int, int],
                    scale: tuple[float, float] | None = None) -> np.ndarray:
    """The block's coverage image at `pose` as the camera draws it: the T grown by its drawn outline
    (EDGE px), its edges ramped over SOFT px (a smooth model for the fit)."""
    x, y, th = pose
    px, py = _centres(shape, scale)
    px, py = px - x, py - y
    c, s = math.cos(th), math.sin(th)
    lx, ly = c * px + s * py, -s * px + c * py  # pixel centres in the body frame
    out = np.zeros(shape)
    for x0, x1, y0, y1 in RECTS:
        inside = _ramp(lx - x0 + EDGE) * _ramp(x1 + EDGE - lx) * _ramp(ly - y0 + EDGE) * _ramp(y1 + EDGE - ly)
        out = np.maximum(out, inside)
    return out


def _ramp(d: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + d / SOFT, 0.0, 1.0)


def fit_pose(cov: np.ndarray, start: tuple[float, float, float], iters: int = 4,
             scale: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """Refine `start` by Gauss-Newton on the squared difference between `cov` and `render_coverage`."""
    pose = np.array(start, dtype=np.float64)
    steps = np.array([0.5, 0.5, 0.004])  # finite-difference steps: px, px, rad
    for _ in range(iters):
        base = render_coverage(tuple(pose), cov.shape, scale)
        r = (base - cov).ravel()
        jac = np.stack([((render_coverage(tuple(pose + np.eye(3)[i] * steps[i]), cov.shape, scale) - base).ravel()
                         / steps[i]) for i in range(3)], axis=1)
        delta = -np.linalg.solve(jac.T @ jac + np.diag([1e-3, 1e-3, 1e2]), jac.T @ r)
        pose += np.clip(delta, [-5.0, -5.0, -0.05], [5.0, 5.0, 0.05])
        if abs(delta[0]) + abs(delta[1]) < 0.05 and abs(delta[2]) < 2e-4:
            break
    return float(pose[0]), float(pose[1]), _wrap(float(pose[2]))


def estimate_pose(frame: np.ndarray) -> tuple[float, float, float] | None:
    """(x, y, angle) of the block's body origin seen in a frame, or None when too little of it shows."""
    cov = coverage(frame)
    pose = moments_pose(cov)
    if pose is None:
        return None
    rows, cols = np.nonzero(cov)
    r0, c0 = max(rows.min() - 2, 0), max(cols.min() - 2, 0)  # the fit only looks at the block's box
    crop = cov[r0 : rows.max() + 3, c0 : cols.max() + 3]
    px, py = WORLD / cov.shape[1], WORLD / cov.shape[0]
    x, y, th = fit_pose(crop, (pose[0] - c0 * px, pose[1] - r0 * py, pose[2]), scale=(px, py))
    return x + c0 * px, y + r0 * py, th


def _centres(shape: tuple[int, int], scale: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World coordinates of the points each pixel samples (cv2's bilinear resize of pygame's drawing);
    `scale` (world px per pixel) when `shape` is a crop of the frame."""
    h, w = shape
    sx, sy = scale or (WORLD / w, WORLD / h)
    ys, xs = np.mgrid[0:h, 0:w]
    return (xs + 0.5) * sx + SAMPLE_SHIFT, (ys + 0.5) * sy + SAMPLE_SHIFT


def _wrap(a: float) -> float:
    return (a + math.pi) % (2.0 * math.pi) - math.pi


class Policy:
    def __init__(self, params: dict[str, float] | None = None) -> None:
        self.controller = controller.Policy(params)
        self.last_pose: tuple[float, float, float] | None = None

    def reset(self) -> None:
        self.controller.reset()
        self.last_pose = None

    def on_failure(self, info: dict) -> None:
        self.controller.on_failure(info)

    def act(self, obs) -> np.ndarray:
        ax, ay = (float(v) for v in np.asarray(obs["agent_pos"]).reshape(2))
        pose = estimate_pose(obs["pixels"])
        if pose is None:  # the block is hidden: act on the last estimate (or hold the pusher still)
            pose = self.last_pose
            if pose is None:
                return np.array([ax, ay])
        self.last_pose = pose
        return self.controller.act(np.array([ax, ay, *pose]))
