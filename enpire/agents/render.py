"""Pictures of a recorded episode for the model: a strip of frames drawn from the recorded observations.

Drawn here from the state the episode store holds (no simulator and no GL needed, so it works in the daemon
on any machine): Push-T as the scene seen from above (goal T in green, block T in grey, pusher in blue);
Meta-World as a top view (x, y) and a side view (y, z) of hand (blue), object (orange) and goal (green),
with the hand's path so far.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from enpire.tasks import TaskSpec

WHITE, GREEN, GREY, BLUE, ORANGE, BLACK = (255, 255, 255), (144, 238, 144), (119, 136, 153), (65, 105, 225), \
    (255, 140, 0), (0, 0, 0)
T_BOXES = (((-60, 0), (60, 0), (60, 30), (-60, 30)), ((-15, 30), (15, 30), (15, 120), (-15, 120)))


def _t_polygons(x: float, y: float, angle: float, scale: float) -> list[np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return [np.array([[(x + u * c - v * s) * scale, (y + u * s + v * c) * scale] for u, v in box], dtype=np.int32)
            for box in T_BOXES]


def pusht_frame(obs: np.ndarray, goal: tuple[float, ...] = (256.0, 256.0, math.pi / 4), size: int = 192) -> np.ndarray:
    """The Push-T scene of one state observation [agent_x, agent_y, block_x, block_y, block_angle], RGB uint8."""
    scale = size / 512.0
    img = np.full((size, size, 3), 255, np.uint8)
    cv2.fillPoly(img, _t_polygons(*goal[:3], scale), GREEN)
    cv2.fillPoly(img, _t_polygons(float(obs[2]), float(obs[3]), float(obs[4]), scale), GREY)
    cv2.circle(img, (round(obs[0] * scale), round(obs[1] * scale)), max(2, round(15 * scale)), BLUE, -1)
    return img


def metaworld_frame(obs: np.ndarray, path: np.ndarray, size: int = 192) -> np.ndarray:
    """Top view (x right, y up on the image) and side view (y right, z up) of a 39-dim Meta-World state."""
    half = size // 2
    img = np.full((size, 2 * half, 3), 255, np.uint8)
    views = ((0, 1, (-0.5, 0.5), (0.3, 1.0)), (1, 2, (0.3, 1.0), (-0.05, 0.45)))
    for k, (i, j, (lo_u, hi_u), (lo_v, hi_v)) in enumerate(views):
        def px(p, i=i, j=j, lo_u=lo_u, hi_u=hi_u, lo_v=lo_v, hi_v=hi_v, k=k):
            u = (p[i] - lo_u) / (hi_u - lo_u)
            v = (p[j] - lo_v) / (hi_v - lo_v)
            return (k * half + int(np.clip(u, 0, 1) * (half - 1)), int((1 - np.clip(v, 0, 1)) * (size - 1)))
        cv2.rectangle(img, (k * half, 0), (k * half + half - 1, size - 1), BLACK, 1)
        for a, b in zip(path[:-1], path[1:], strict=False):
            cv2.line(img, px(a), px(b), (170, 190, 240), 1)
        cv2.circle(img, px(obs[36:39]), 5, GREEN, -1)
        cv2.circle(img, px(obs[4:7]), 4, ORANGE, -1)
        cv2.circle(img, px(obs[0:3]), 4, BLUE, -1)
    return img


def strip(spec: TaskSpec, observations: np.ndarray, frames: int = 4) -> tuple[np.ndarray, list[int]]:
    """`frames` evenly spaced steps (first and last included) side by side; returns the image and the steps."""
    n = len(observations)
    steps = sorted({round(i * (n - 1) / max(1, frames - 1)) for i in range(frames)}) if n else []
    tiles = []
    for t in steps:
        if spec.driver == "pusht":
            tile = pusht_frame(observations[t], spec.goal_value or (256.0, 256.0, math.pi / 4))
        elif observations.shape[1] >= 39:
            tile = metaworld_frame(observations[t], observations[: t + 1, 0:3])
        else:
            raise ValueError(f"no drawing for task {spec.name!r} observations of width {observations.shape[1]}")
        cv2.putText(tile, f"t={t}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, BLACK, 1)
        tiles.append(tile)
        tiles.append(np.zeros((tile.shape[0], 2, 3), np.uint8))
    return (np.concatenate(tiles[:-1], axis=1) if tiles else np.zeros((1, 1, 3), np.uint8)), steps


def png(img: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()
