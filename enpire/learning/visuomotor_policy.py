"""Policy-file template for a visuomotor Push-T policy: a small CNN on the camera frame, weights in
`weights.npz`, run with numpy only (the sandbox has no torch to spare).

Copy this file as `policy.py` next to the `weights.npz` the "visuomotor" recipe wrote. Observation:
{"pixels": (96, 96, 3) uint8, "agent_pos": (2,)}. `forward` below is the single definition of the
network's arithmetic on the numpy side; `enpire.learning.visuomotor` trains the same network in torch
and a test checks that both give the same actions.

Network (one frame in, one action out; nothing carried between steps but the per-step change limit):
1. the frame (3 channels, scaled to [-0.5, 0.5]) -> three convolutions with ReLU (by default c0: 4x4
   stride 4, c1 and c2: 3x3 stride 1; padding k // 2) -> spatial soft-argmax: an expected (x, y) in
   [-1, 1] per channel of c2 (keypoints with sub-pixel precision);
2. a pose head (MLP on the keypoints) -> the block pose it sees, [(x - 256) / 32, (y - 256) / 32, cos,
   sin] (trained against the fleet's own pose estimates: a bottleneck that makes the keypoints find the
   block);
3. `pose_features` of the pusher position and that pose (the pusher and the goal in the block's frame,
   the angle error; the keypoints themselves go no further than the pose head) -> a contact head (MLP) choosing which of the controller's 42
   contact points to use, then a second head (MLP) on the same inputs and that contact (one-hot) choosing
   whether to push now and which way to go round the block (argmax of each group: a choice, never an
   average of two ways to go);
4. the features and the chosen decision (one-hot) -> an MLP (ReLU) -> the action as a normalised
   offset from the pusher position in the block's frame (of the pose from step 2), turned into the
   world's frame by that pose's angle.

weights.npz holds plain arrays: c{i}_w (out, in, k, k), c{i}_b, n_conv, strides (n_conv,), p{i}_w /
p{i}_b (pose head, (in, out)), n_pose, q{i}_w / q{i}_b (contact head), n_mode, r{i}_w / r{i}_b (push and
orbit head), n_mode2, m{i}_w / m{i}_b (action head), n_mlp, feat_mean/feat_std,
act_mean/act_std (2,), act_low/act_high (2,), max_delta (), policy_kind = "visuomotor".
"""

from __future__ import annotations

import math
import os

import numpy as np

WEIGHTS_FILE = "weights.npz"
POLICY_KIND = "visuomotor"
POLICY_VERSION = 3  # 3: action in the block's frame, push/orbit decided given the contact (2: world frame,
# all decisions side by side; 1: two stacked frames, no pose head)
GOAL = (256.0, 256.0, math.pi / 4)
POSE_SCALE = 32.0  # px per unit of the pose head's position outputs
SCALE = 256.0  # px per unit of the features' positions
N_FEATURES = 12
MODES = (42, 2, 3)  # the controller's contact points, pushing or not, orbit direction (-1, 0, +1)
N_MODES = sum(MODES)


def frames_input(frame: np.ndarray) -> np.ndarray:
    """(N, 96, 96, 3) uint8 frames -> (N, 3, 96, 96) float32 input."""
    x = np.asarray(frame).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(x / 255.0 - 0.5, -1, 1))


def pose_features(pos: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """(N, 2) pusher positions and (N, 4) poses [(x-256)/32, (y-256)/32, cos, sin] -> (N, 12) features:
    the pusher and the goal in the block's frame, the angle error's cos/sin, positions; what the
    controller that made the data acts on. The torch twin is `visuomotor.pose_features_t`."""
    pos = np.asarray(pos, np.float32).reshape(-1, 2)
    bx, by = pose[:, 0] * POSE_SCALE + 256.0, pose[:, 1] * POSE_SCALE + 256.0
    norm = np.sqrt(pose[:, 2] ** 2 + pose[:, 3] ** 2) + 1e-6
    c, s = pose[:, 2] / norm, pose[:, 3] / norm
    rx, ry = pos[:, 0] - bx, pos[:, 1] - by
    gx, gy = GOAL[0] - bx, GOAL[1] - by
    cg, sg = math.cos(GOAL[2]), math.sin(GOAL[2])
    cols = [(pos[:, 0] - 256.0) / SCALE, (pos[:, 1] - 256.0) / SCALE, (bx - 256.0) / SCALE, (by - 256.0) / SCALE,
            c, s, cg * c + sg * s, sg * c - cg * s,
            (c * rx + s * ry) / SCALE, (-s * rx + c * ry) / SCALE, (c * gx + s * gy) / SCALE, (-s * gx + c * gy) / SCALE]
    return np.stack(cols, axis=1).astype(np.float32)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """(N, C, H, W) * (O, C, k, k), zero padding k // 2, as torch's conv2d."""
    k = weight.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    # win: (N, C, Ho, Wo, k, k) -> (N, Ho, Wo, C*k*k) @ (C*k*k, O)
    n, c, ho, wo = win.shape[:4]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n, ho, wo, c * k * k)
    out = cols @ weight.reshape(weight.shape[0], -1).T + bias
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def spatial_softargmax(h: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, 2C): the expected (x, y) in [-1, 1] of each channel's softmax over the image."""
    n, c, hh, ww = h.shape
    flat = h.reshape(n, c, hh * ww)
    flat = np.exp(flat - flat.max(axis=2, keepdims=True))
    flat /= flat.sum(axis=2, keepdims=True)
    xs = np.tile(np.linspace(-1.0, 1.0, ww, dtype=np.float32), hh)
    ys = np.repeat(np.linspace(-1.0, 1.0, hh, dtype=np.float32), ww)
    return np.concatenate([flat @ xs, flat @ ys], axis=1)


def mlp(w: dict[str, np.ndarray], prefix: str, n: int, z: np.ndarray) -> np.ndarray:
    for i in range(n):
        z = z @ w[f"{prefix}{i}_w"] + w[f"{prefix}{i}_b"]
        if i < n - 1:
            z = np.maximum(z, 0.0)
    return z


def one_hot_modes(logits: np.ndarray, sizes: tuple[int, ...] = MODES) -> np.ndarray:
    """(N, sum(sizes)) logits -> one-hot of the argmax within each group of `sizes`."""
    out = np.zeros_like(logits)
    start = 0
    for size in sizes:
        out[np.arange(len(logits)), start + logits[:, start : start + size].argmax(axis=1)] = 1.0
        start += size
    return out


def rotate(v: np.ndarray, pose: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """(N, 2) vectors turned by the pose's angle (sign -1: by minus it, world -> block frame); a pose
    with no direction (cos = sin = 0: the block was hidden) leaves them as they are."""
    norm = np.sqrt(pose[:, 2] ** 2 + pose[:, 3] ** 2)
    c = np.where(norm > 1e-6, pose[:, 2] / np.maximum(norm, 1e-6), 1.0)
    s = sign * np.where(norm > 1e-6, pose[:, 3] / np.maximum(norm, 1e-6), 0.0)
    return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], axis=1)


def forward(w: dict[str, np.ndarray], image: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """frames_input(frames), (N, 2) pusher positions -> (normalised action offsets in the block's frame
    (N, 2), poses (N, 4))."""
    h = image
    strides = np.asarray(w["strides"]).astype(int)
    for i in range(int(w["n_conv"])):
        h = np.maximum(conv2d(h, w[f"c{i}_w"], w[f"c{i}_b"], int(strides[i])), 0.0)
    keys = spatial_softargmax(h)
    pose = mlp(w, "p", int(w["n_pose"]), keys)
    z = (pose_features(pos, pose) - w["feat_mean"]) / w["feat_std"]  # the heads see the pose only
    contact = one_hot_modes(mlp(w, "q", int(w["n_mode"]), z), MODES[:1])
    rest = one_hot_modes(mlp(w, "r", int(w["n_mode2"]), np.concatenate([z, contact], axis=1)), MODES[1:])
    return mlp(w, "m", int(w["n_mlp"]), np.concatenate([z, contact, rest], axis=1)), pose


def predict(w, frame, pos) -> np.ndarray:
    """Batch prediction of the raw (unclipped) absolute action targets: the head's offset, in the frame of
    the block pose the network sees, turned into the world's and added to the pusher position."""
    out, pose = forward(w, frames_input(frame), pos)
    local = out * w["act_std"] + w["act_mean"]
    return np.asarray(pos, np.float64).reshape(-1, 2) + rotate(local, pose)


def load_weights(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        w = {k: (np.asarray(data[k]) if k == "policy_kind" else np.asarray(data[k], dtype=np.float32))
             for k in data.files}
    if str(w.get("policy_kind", "")) != POLICY_KIND:
        raise ValueError(f"{path}: not a visuomotor checkpoint (policy_kind {w.get('policy_kind')!r})")
    if int(w.get("policy_version", 1)) != POLICY_VERSION:
        raise ValueError(f"{path}: visuomotor checkpoint version {int(w.get('policy_version', 1))}, this file "
                         f"runs version {POLICY_VERSION} (retrain with the current recipe)")
    for prefix, count in (("c", "n_conv"), ("p", "n_pose"), ("q", "n_mode"), ("r", "n_mode2"), ("m", "n_mlp")):
        for i in range(int(w[count])):
            if f"{prefix}{i}_w" not in w:
                raise ValueError(f"{path}: layer {prefix}{i} missing")
    return w


class Policy:
    def __init__(self, params: dict[str, float] | None = None, weights: dict[str, np.ndarray] | None = None):
        if params:  # a trained policy has no parameters: a name given here would be dropped silently
            raise ValueError(f"unknown policy parameter(s) {', '.join(sorted(params))}; a trained policy takes none")
        self.params: dict[str, float] = {}
        self.w = weights if weights is not None else load_weights(os.path.join(os.getcwd(), WEIGHTS_FILE))
        self.low = np.asarray(self.w["act_low"], np.float64)
        self.high = np.asarray(self.w["act_high"], np.float64)
        self.max_delta = float(self.w["max_delta"]) - 5.0  # a little inside the cell's per-step limit
        self.reset()

    def reset(self) -> None:
        self.last_action = None

    def on_failure(self, info: dict) -> None:  # pass@k: start the next attempt afresh
        self.reset()

    def act(self, obs) -> np.ndarray:
        frame = np.asarray(obs["pixels"], dtype=np.uint8)
        pos = np.asarray(obs["agent_pos"], dtype=np.float64).reshape(2)
        a = predict(self.w, frame[None], pos[None])[0]
        if not np.all(np.isfinite(a)):
            a = pos.copy()  # never send junk: hold the pusher where it is
        ref = pos if self.last_action is None else self.last_action
        a = np.clip(np.clip(a, ref - self.max_delta, ref + self.max_delta), self.low, self.high)
        self.last_action = a
        return a
