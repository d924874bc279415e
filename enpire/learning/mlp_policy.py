"""Policy-file template for a learned Push-T policy: a numpy MLP whose weights sit in `weights.npz`.

Copy this file as `policy.py` next to the `weights.npz` a recipe wrote (the sandbox's working
directory). It needs only the standard library and numpy, loads the weights with allow_pickle=False,
computes the same observation features the trainer used (`features` below is the single definition:
`enpire.learning.bc` imports it), and keeps every action safe: inside the workspace bounds and within
the per-step change limit of the previous action (the cell ends an episode that breaks either).

weights.npz holds plain arrays:
    feat_mean, feat_std (F,)      feature normalisation
    act_mean, act_std (2,)        normalisation of the target offset (action - agent position)
    w0, b0, w1, b1, ... w{L-1}    the MLP, ReLU between layers, x @ w + b
    n_layers ()                   L
    feature_version ()            must equal FEATURE_VERSION
    act_low, act_high (2,)        action bounds; max_delta () per-step change limit (optional)

Features (all derived from the current and the previous observation, nothing else):
    agent position, block position relative to the goal, sin/cos of the block angle and of its error to
    the goal angle, the agent position in the block's frame, and the agent's and block's displacement
    since the previous observation (zero on the first step of an episode): the state observation carries
    no velocities, and the PD-controlled pusher's momentum matters.
"""

from __future__ import annotations

import math
import os

import numpy as np

FEATURE_VERSION = 1
GOAL = (256.0, 256.0, math.pi / 4)
SCALE = 256.0  # px: positions are divided by this
VEL_SCALE = 20.0  # px per step
WEIGHTS_FILE = "weights.npz"


def features(obs: np.ndarray, prev_obs: np.ndarray) -> np.ndarray:
    """(N, 5) observations and the (N, 5) observations one step earlier (equal to obs on an episode's
    first step) -> (N, F) float64 features."""
    obs = np.asarray(obs, dtype=np.float64).reshape(-1, 5)
    prev = np.asarray(prev_obs, dtype=np.float64).reshape(-1, 5)
    ax, ay, bx, by, th = (obs[:, i] for i in range(5))
    c, s = np.cos(th), np.sin(th)
    eth = np.mod(GOAL[2] - th + np.pi, 2 * np.pi) - np.pi
    rx, ry = ax - bx, ay - by
    lx, ly = c * rx + s * ry, -s * rx + c * ry  # agent in the block frame
    gx, gy = GOAL[0] - bx, GOAL[1] - by
    glx, gly = c * gx + s * gy, -s * gx + c * gy  # goal position in the block frame
    dth = np.mod(th - prev[:, 4] + np.pi, 2 * np.pi) - np.pi
    cols = [
        (ax - 256.0) / SCALE, (ay - 256.0) / SCALE,
        (bx - GOAL[0]) / SCALE, (by - GOAL[1]) / SCALE,
        c, s, np.cos(eth), np.sin(eth), eth / np.pi,
        lx / SCALE, ly / SCALE, glx / SCALE, gly / SCALE,
        (ax - prev[:, 0]) / VEL_SCALE, (ay - prev[:, 1]) / VEL_SCALE,
        (bx - prev[:, 2]) / VEL_SCALE, (by - prev[:, 3]) / VEL_SCALE, dth * 10.0,
    ]
    return np.stack(cols, axis=1)


N_FEATURES = 18


def mlp_forward(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Normalised features -> normalised output, same arithmetic as the torch model."""
    n = int(weights["n_layers"])
    h = x
    for i in range(n):
        h = h @ weights[f"w{i}"] + weights[f"b{i}"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
    return h


def predict(weights: dict[str, np.ndarray], obs: np.ndarray, prev_obs: np.ndarray) -> np.ndarray:
    """Batch prediction of the raw (unclipped) absolute action targets."""
    f = (features(obs, prev_obs) - weights["feat_mean"]) / weights["feat_std"]
    out = mlp_forward(weights, f) * weights["act_std"] + weights["act_mean"]
    return np.asarray(obs, dtype=np.float64).reshape(-1, 5)[:, :2] + out


def load_weights(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        w = {k: np.asarray(data[k], dtype=np.float64) for k in data.files}
    if int(w.get("feature_version", -1)) != FEATURE_VERSION:
        raise ValueError(f"{path}: feature_version {w.get('feature_version')} != {FEATURE_VERSION}")
    for i in range(int(w["n_layers"])):
        if f"w{i}" not in w or f"b{i}" not in w:
            raise ValueError(f"{path}: layer {i} missing")
    return w


class Policy:
    def __init__(self, params: dict[str, float] | None = None, weights: dict[str, np.ndarray] | None = None):
        if params:  # a trained policy has no parameters: a name given here would be dropped silently
            raise ValueError(f"unknown policy parameter(s) {', '.join(sorted(params))}; a trained policy takes none")
        self.params: dict[str, float] = {}
        if weights is None:
            weights = load_weights(os.path.join(os.getcwd(), WEIGHTS_FILE))
        self.w = weights
        self.low = np.broadcast_to(weights.get("act_low", np.array(0.0)), (2,)).astype(np.float64)
        self.high = np.broadcast_to(weights.get("act_high", np.array(512.0)), (2,)).astype(np.float64)
        # stay a little inside the cell's per-step limit (100 px per component for Push-T)
        self.max_delta = float(weights.get("max_delta", np.array(100.0))) - 5.0
        self.reset()

    def reset(self) -> None:
        self.prev_obs = None
        self.last_action = None

    def on_failure(self, info: dict) -> None:  # pass@k: start the next attempt afresh
        self.reset()

    def act(self, obs) -> np.ndarray:
        o = np.asarray(obs, dtype=np.float64).reshape(5)
        prev = o if self.prev_obs is None else self.prev_obs
        self.prev_obs = o
        a = predict(self.w, o[None], prev[None])[0]
        if not np.all(np.isfinite(a)):
            a = o[:2].copy()  # never send junk: hold the pusher where it is
        ref = o[:2] if self.last_action is None else self.last_action
        a = np.clip(a, ref - self.max_delta, ref + self.max_delta)
        a = np.clip(a, self.low, self.high)
        self.last_action = a
        return a
