"""Trusted verification: pure functions from the simulator's state (or a camera frame) to a verdict.

Everything here is written from the task geometry, not from the environments' own reward code, so a
bug or a patch in an environment cannot silently change what "success" means. Nothing here imports a
simulator, and no function keeps state between calls.

Push-T geometry (gym-pusht `add_tee`, scale 30): in the block's body frame the T is a 120x30 bar
spanning y in [0, 30] and a 30x90 stem spanning y in [30, 120]; a world point is
`origin + R(angle) @ local`, where `origin` is the pymunk body position (not the centre of gravity).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import shapely.geometry as sg

from bus.messages import Verdict

PUSHT_SUCCESS = 0.95  # gym-pusht: success is coverage strictly above 95 %
PUSHT_GOAL_POSE = (256.0, 256.0, math.pi / 4)  # gym-pusht's fixed goal; the camera's calibrated goal
PUSHT_WORKSPACE = 512.0  # world units rendered onto the full frame

_S = 30.0
_BAR = np.array([(-2 * _S, _S), (2 * _S, _S), (2 * _S, 0.0), (-2 * _S, 0.0)])
_STEM = np.array([(-_S / 2, _S), (-_S / 2, 4 * _S), (_S / 2, 4 * _S), (_S / 2, _S)])
_TEE_AREA = 120.0 * 30.0 + 30.0 * 90.0  # 6300


# ----------------------------------------------------------------------------- Push-T, state


def _rot(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def tee_polygons(pose: Sequence[float]) -> list[np.ndarray]:
    """World vertices of the T's two rectangles (bar, stem) at `pose` = (x, y, angle)."""
    x, y, angle = (float(v) for v in pose)
    r = _rot(angle)
    return [part @ r.T + (x, y) for part in (_BAR, _STEM)]


def _tee_geom(pose: Sequence[float]) -> sg.MultiPolygon:
    return sg.MultiPolygon([sg.Polygon(p) for p in tee_polygons(pose)])


def pusht_coverage(block_pose: Sequence[float], goal_pose: Sequence[float]) -> float:
    """Fraction of the goal T's area covered by the block T (shapely intersection / goal area)."""
    goal = _tee_geom(goal_pose)
    return float(goal.intersection(_tee_geom(block_pose)).area / goal.area)


def _finite(values: object, n: int) -> list[float] | None:
    try:
        out = [float(v) for v in values]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def verify_pusht_state(state: Mapping[str, Sequence[float]]) -> Verdict:
    block = _finite(state.get("block_pose", ()), 3)
    goal = _finite(state.get("goal_pose", PUSHT_GOAL_POSE), 3)
    if block is None or goal is None:
        return Verdict(success=False, score=0.0, reason="invalid state", verifier="pusht_state")
    coverage = pusht_coverage(block, goal)
    success = coverage > PUSHT_SUCCESS
    reason = "success" if success else f"coverage {coverage:.3f} <= {PUSHT_SUCCESS:.2f}"
    return Verdict(success=success, score=coverage, reason=reason, verifier="pusht_state")


# ----------------------------------------------------------------------------- Push-T, vision
#
# The frame is gym-pusht's drawing: white floor, light-green goal T drawn first, then the blue agent
# disc and the grey block (fill plus a 2 px darker outline, so the block looks ~2 units fatter than it
# is). The block occludes the goal, so "count the visible green" over-reports coverage (the outline
# alone hides ~15 % of the goal) and the agent disc can hide uncovered goal. Instead we estimate the
# block's pose from its silhouette (moments, then a local fit of a rendered silhouette model), and
# compute coverage from geometry against the calibrated goal. Success needs all of:
#   - a block silhouette of plausible size that the model explains well (IoU),
#   - visible green only where the goal is and no more of it than the pose predicts,
#   - estimated coverage above the threshold plus a margin that absorbs pose-estimate error.
# Any doubt gives a failure: a false success is worse than a false failure.

# gym-pusht palette (RGB) after its drawing code: pygame named colours, `light_color` = 1.2x fill.
_PALETTE = np.array(
    [
        (255, 255, 255),  # 0 floor
        (211, 211, 211),  # 1 walls (LightGray)
        (144, 238, 144),  # 2 goal (LightGreen)
        (143, 163, 184),  # 3 block fill (1.2 x LightSlateGray)
        (119, 136, 153),  # 4 block outline (LightSlateGray)
        (65, 105, 225),  # 5 agent rim (RoyalBlue)
        (78, 126, 255),  # 6 agent fill (1.2 x RoyalBlue)
        (231, 76, 60),  # 7 pymunk contact markers, if a renderer left them in
    ],
    dtype=np.float32,
)
_FLOOR, _GOAL, _BLOCK, _AGENT = 0, 1, 2, 3
_CLASS_OF = np.array([_FLOOR, _FLOOR, _GOAL, _BLOCK, _BLOCK, _AGENT, _AGENT, _FLOOR], dtype=np.uint8)

VISION_MARGIN = 0.015  # coverage margin over PUSHT_SUCCESS (see bench/vision_verifier.py)
VISION_MIN_FRAME = 256  # pixels; below this the p99 coverage error (~0.04 at 128) exceeds the margin
_MIN_IOU = 0.93  # the fitted model must explain the silhouette this well
_GREEN_SLACK = 0.02  # of the goal area: tolerated excess of visible green over the prediction
# The T's rectangles in the body frame as (centre x, centre y, half width, half height).
_RECTS = np.array([(0.0, _S / 2, 2 * _S, _S / 2), (0.0, 2.5 * _S, _S / 2, 1.5 * _S)])


def classify_pusht_pixels(frame: np.ndarray) -> np.ndarray:
    """Per-pixel class (floor, goal, block, agent) by nearest palette colour; frame is HxWx3 RGB."""
    px = frame.reshape(-1, 3).astype(np.float32)
    d = ((px[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(axis=2)
    return _CLASS_OF[d.argmin(axis=1)].reshape(frame.shape[:2])


def _outline_growth(angle: float) -> float:
    """How much fatter than the true T the drawn block looks (world units).

    The outline is pygame's 4 px thick line, whose thickness is measured along the minor axis, so an
    edge at 45 degrees gets 4 cos 45 = 2.8 px across; half of that lies outside the T, plus half a pixel
    for pixel-centre filling of the polygon.
    """
    return 0.5 + 2.0 * max(abs(math.cos(angle)), abs(math.sin(angle)))


def _pixel_centres(shape: tuple[int, int], k: float) -> tuple[np.ndarray, np.ndarray]:
    # cv2.resize (bilinear) maps destination pixel i to source pixel (i + 0.5) / k - 0.5, and source
    # pixel j is world coordinate j.
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xs + 0.5) / k - 0.5, (ys + 0.5) / k - 0.5


def _tee_mask(pose: Sequence[float], wx: np.ndarray, wy: np.ndarray, grow: float) -> np.ndarray:
    """Which world points lie within `grow` of the T at `pose` (exact Minkowski sum with a disc)."""
    x, y, angle = (float(v) for v in pose)
    c, s = math.cos(angle), math.sin(angle)
    lx = c * (wx - x) + s * (wy - y)  # world -> body frame
    ly = -s * (wx - x) + c * (wy - y)
    inside = np.zeros(wx.shape, dtype=bool)
    for cx, cy, hw, hh in _RECTS:
        dx = np.maximum(np.abs(lx - cx) - hw, 0.0)
        dy = np.maximum(np.abs(ly - cy) - hh, 0.0)
        inside |= dx * dx + dy * dy <= grow * grow
    return inside


def _drawn_tee(pose: Sequence[float], wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    return _tee_mask(pose, wx, wy, _outline_growth(float(pose[2])))


def _fit_pose(block: np.ndarray, care: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> tuple[np.ndarray, float]:
    """Block pose (world units) from its silhouette: moments for a start, then a local pattern search
    on the pixel mismatch. wx, wy are the world coordinates of the pixel centres."""
    pts = np.stack([wx[block], wy[block]], axis=1)
    centre = pts.mean(axis=0)
    d = pts - centre
    _, evecs = np.linalg.eigh(d.T @ d / len(d))
    major = evecs[:, 1]  # the T is longer along its stem (body y) than along its bar
    if np.mean((d @ major) ** 3) < 0:  # the stem is the long tail: body +y has positive skew
        major = -major
    angle = math.atan2(-major[0], major[1])
    # Area centroid of the T in the body frame; the outline's growth shifts it by well under a unit.
    c_local = np.array([0.0, (15.0 * 3600 + 75.0 * 2700) / _TEE_AREA])
    pose = np.r_[centre - _rot(angle) @ c_local, angle]

    def mismatch(p: np.ndarray) -> int:
        return int(np.count_nonzero((_drawn_tee(p, wx, wy) != block) & care))

    best = mismatch(pose)
    unit = float(wx[0, 1] - wx[0, 0])  # world units per pixel
    steps = np.array([2.0 * unit, 2.0 * unit, math.radians(2.0)])
    while steps[0] > 0.04 * unit:
        improved = False
        for axis in range(3):
            for sign in (1.0, -1.0):
                trial = pose.copy()
                trial[axis] += sign * steps[axis]
                m = mismatch(trial)
                if m < best:
                    pose, best, improved = trial, m, True
        if not improved:
            steps /= 2
    model = _drawn_tee(pose, wx, wy)
    union = np.count_nonzero((model | block) & care)
    return pose, np.count_nonzero(model & block & care) / max(union, 1)


def estimate_pusht_coverage(frame: np.ndarray, goal_pose: Sequence[float] = PUSHT_GOAL_POSE,
                            block_mask: np.ndarray | None = None) -> dict:
    """Everything the vision verifier measured: estimated pose and coverage plus its sanity checks.

    `block_mask`: the block's pixels from a segmenter (SAM2) instead of the colour classification."""
    import cv2

    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] != frame.shape[1]:
        return {"error": f"expected a square HxWx3 frame, got shape {frame.shape}"}
    k = frame.shape[0] / PUSHT_WORKSPACE
    cls = classify_pusht_pixels(frame)
    wx, wy = _pixel_centres(cls.shape, k)
    block = cls == _BLOCK if block_mask is None else np.asarray(block_mask, dtype=bool)
    if block.shape != cls.shape:
        return {"error": f"block mask shape {block.shape} != frame {cls.shape}"}
    # Keep the largest blob: stray grey pixels (anti-aliased wall or agent edges) are not the block.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(block.astype(np.uint8), connectivity=8)
    if n < 2:
        return {"error": "no block in view"}
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    block = labels == biggest
    area_ratio = np.count_nonzero(block) / (k * k * (_TEE_AREA + 480.0 * 2.2))  # 480 = T perimeter
    if not 0.8 < area_ratio < 1.2:
        return {"error": f"block silhouette {area_ratio:.2f}x the expected area"}

    # Work in a window around the block; the model never reaches further than a few pixels out.
    x0, y0, w, h = stats[biggest, :4]
    pad = 6
    win = np.s_[max(y0 - pad, 0) : y0 + h + pad, max(x0 - pad, 0) : x0 + w + pad]
    # The agent disc may be drawn over the block's edge: its pixels say nothing about the block.
    agent = cv2.dilate((cls == _AGENT).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    pose, iou = _fit_pose(block[win], ~agent[win], wx[win], wy[win])
    coverage = pusht_coverage(pose, goal_pose)

    # Visible green must lie on the goal and be no more than the fitted pose leaves uncovered.
    goal_px = _tee_mask(goal_pose, wx, wy, 0.0)
    goal_n = max(np.count_nonzero(goal_px), 1)
    near_goal = _tee_mask(goal_pose, wx, wy, 3.0 + 1.0 / k)
    green = cls == _GOAL
    predicted_green = np.count_nonzero(goal_px & ~_drawn_tee(pose, wx, wy) & ~agent)
    return {
        "pose": [float(v) for v in pose],
        "coverage": coverage,
        "iou": iou,
        "area_ratio": area_ratio,
        "stray_green": np.count_nonzero(green & ~near_goal) / goal_n,
        "excess_green": (np.count_nonzero(green & goal_px) - predicted_green) / goal_n,
    }


def verify_pusht_frame(
    frame: np.ndarray, goal_pose: Sequence[float] = PUSHT_GOAL_POSE, margin: float = VISION_MARGIN,
    block_mask: np.ndarray | None = None, verifier: str = "pusht_vision",
) -> Verdict:
    """Vision verifier: success only when the frame alone shows coverage above 0.95 + margin."""

    def fail(reason: str, score: float = 0.0) -> Verdict:
        return Verdict(success=False, score=score, reason=reason, verifier=verifier)

    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        return fail(f"frame dtype {frame.dtype}, expected uint8")
    if frame.ndim == 3 and min(frame.shape[:2]) < VISION_MIN_FRAME:
        return fail(f"frame {frame.shape[0]}x{frame.shape[1]} below {VISION_MIN_FRAME} px: too coarse to judge")
    m = estimate_pusht_coverage(frame, goal_pose, block_mask)
    if "error" in m:
        return fail(m["error"])
    coverage = float(min(max(m["coverage"], 0.0), 1.0))
    if m["iou"] < _MIN_IOU:
        return fail(f"block fit iou {m['iou']:.2f} < {_MIN_IOU}", coverage)
    if m["stray_green"] > _GREEN_SLACK:
        return fail(f"green outside the goal ({m['stray_green']:.2f} of its area)", coverage)
    if m["excess_green"] > _GREEN_SLACK:
        return fail(f"more goal visible than the pose explains ({m['excess_green']:.2f})", coverage)
    if coverage <= PUSHT_SUCCESS + margin:
        return fail(f"coverage {coverage:.3f} <= {PUSHT_SUCCESS + margin:.3f} (vision)", coverage)
    return Verdict(success=True, score=coverage, reason="success", verifier=verifier)


# ----------------------------------------------------------------------------- Meta-World


def verify_metaworld(state: Mapping[str, Sequence[float]]) -> Verdict:
    """The environment's own success flag decides; score is its normalised progress (1.0 on success)."""
    flag = _finite(state.get("success", ()), 1)
    if flag is None:
        return Verdict(success=False, score=0.0, reason="invalid state: no success flag", verifier="metaworld")
    success = flag[0] >= 0.5
    progress = _finite(state.get("progress", (0.0,)), 1)
    score = 1.0 if success else min(max(progress[0] if progress else 0.0, 0.0), 1.0)
    reason = "success" if success else f"not solved (progress {score:.2f})"
    return Verdict(success=success, score=score, reason=reason, verifier="metaworld")


# ----------------------------------------------------------------------------- dispatch

TASK_KINDS = ("pusht", "metaworld")


def verify(task_kind: str, state: Mapping, frame: np.ndarray | None = None, method: str = "state") -> Verdict:
    """Trusted verdict for a task kind; method "vision" judges the frame instead of the state.

    A kind "package.module:function" is a driver plugin's own check, called as function(state, frame, method)."""
    if ":" in task_kind:
        from hw.plugins import load_verifier

        verdict = load_verifier(task_kind)(state, frame, method)
        if not isinstance(verdict, Verdict):
            raise TypeError(f"verifier {task_kind!r} returned {type(verdict).__name__}, not a Verdict")
        return verdict
    if task_kind == "pusht":
        if method == "state":
            return verify_pusht_state(state)
        if method == "vision":
            if frame is None:
                return Verdict(success=False, score=0.0, reason="no frame", verifier="pusht_vision")
            # The goal is the camera's calibrated goal, not read from the state: the frame alone decides.
            return verify_pusht_frame(frame)
        raise ValueError(f"unknown method {method!r} for pusht; known: state, vision")
    if task_kind == "metaworld":
        if method != "state":
            raise ValueError(f"metaworld has a state verifier only, not {method!r}")
        return verify_metaworld(state)
    raise ValueError(f"unknown task kind {task_kind!r}; known: {', '.join(TASK_KINDS)}")


def success_at_reset(task_kind: str, state: Mapping, frame: np.ndarray | None = None, method: str = "state") -> bool:
    """True when a seed's start state already counts as solved: such seeds are flagged and replaced."""
    return verify(task_kind, state, frame, method).success

