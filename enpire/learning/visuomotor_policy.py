"""Policy-file template for a visuomotor Push-T policy: a small CNN on the camera frame, weights in
`weights.npz`, run with numpy only (the sandbox has no torch to spare).

Copy this file as `policy.py` next to the `weights.npz` the "visuomotor" recipe wrote. Observation:
{"pixels": (96, 96, 3) uint8, "agent_pos": (2,)}. `forward` below is the single definition of the
network's arithmetic on the numpy side; `enpire.learning.visuomotor` trains the same network in torch
and a test checks that both give the same actions.

Network: the current and the previous frame stacked (6 channels, scaled to [-0.5, 0.5]) -> three
convolutions with ReLU (by default c0: 4x4 stride 4, c1 and c2: 3x3 stride 1; padding k // 2) ->
spatial soft-argmax (an expected (x, y) in [-1, 1] per channel of c2: keypoints with sub-pixel
precision) -> concatenated with the normalised pusher position and its change since the previous step
-> an MLP (ReLU) -> the action as a normalised offset from the pusher position.

weights.npz holds plain arrays: c{i}_w (out, in, k, k), c{i}_b, n_conv, strides (n_conv,), m{i}_w
(in, out), m{i}_b, n_mlp, pos_mean/pos_std (2,), act_mean/act_std (2,), act_low/act_high (2,),
max_delta (), policy_kind = "visuomotor".
"""

from __future__ import annotations

import os

import numpy as np

WEIGHTS_FILE = "weights.npz"
POLICY_KIND = "visuomotor"


def frames_input(frame: np.ndarray, prev_frame: np.ndarray) -> np.ndarray:
    """(N, 96, 96, 3) uint8 frames and the frames one step earlier -> (N, 6, 96, 96) float32 input."""
    x = np.concatenate([np.asarray(frame), np.asarray(prev_frame)], axis=-1).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(x / 255.0 - 0.5, -1, 1))


def pos_input(w: dict[str, np.ndarray], pos: np.ndarray, prev_pos: np.ndarray) -> np.ndarray:
    """(N, 2) pusher positions and the previous ones -> (N, 4) normalised position and change."""
    pos, prev_pos = np.asarray(pos, np.float32).reshape(-1, 2), np.asarray(prev_pos, np.float32).reshape(-1, 2)
    return np.concatenate([(pos - w["pos_mean"]) / w["pos_std"], (pos - prev_pos) / 20.0], axis=1).astype(np.float32)


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


def forward(w: dict[str, np.ndarray], image: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Network input (frames_input, pos_input) -> normalised action offset (N, 2)."""
    h = image
    strides = np.asarray(w["strides"]).astype(int)
    for i in range(int(w["n_conv"])):
        h = np.maximum(conv2d(h, w[f"c{i}_w"], w[f"c{i}_b"], int(strides[i])), 0.0)
    z = np.concatenate([spatial_softargmax(h), pos], axis=1)
    n = int(w["n_mlp"])
    for i in range(n):
        z = z @ w[f"m{i}_w"] + w[f"m{i}_b"]
        if i < n - 1:
            z = np.maximum(z, 0.0)
    return z


def predict(w, frame, prev_frame, pos, prev_pos) -> np.ndarray:
    """Batch prediction of the raw (unclipped) absolute action targets."""
    out = forward(w, frames_input(frame, prev_frame), pos_input(w, pos, prev_pos))
    return np.asarray(pos, np.float64).reshape(-1, 2) + out * w["act_std"] + w["act_mean"]


def load_weights(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        w = {k: (np.asarray(data[k]) if k == "policy_kind" else np.asarray(data[k], dtype=np.float32))
             for k in data.files}
    if str(w.get("policy_kind", "")) != POLICY_KIND:
        raise ValueError(f"{path}: not a visuomotor checkpoint (policy_kind {w.get('policy_kind')!r})")
    for i in range(int(w["n_conv"])):
        if f"c{i}_w" not in w:
            raise ValueError(f"{path}: convolution {i} missing")
    for i in range(int(w["n_mlp"])):
        if f"m{i}_w" not in w:
            raise ValueError(f"{path}: layer {i} missing")
    return w


class Policy:
    def __init__(self, params: dict[str, float] | None = None, weights: dict[str, np.ndarray] | None = None):
        self.params = dict(params or {})
        self.w = weights if weights is not None else load_weights(os.path.join(os.getcwd(), WEIGHTS_FILE))
        self.low = np.asarray(self.w["act_low"], np.float64)
        self.high = np.asarray(self.w["act_high"], np.float64)
        self.max_delta = float(self.w["max_delta"]) - 5.0  # a little inside the cell's per-step limit
        self.reset()

    def reset(self) -> None:
        self.prev = None
        self.last_action = None

    def on_failure(self, info: dict) -> None:  # pass@k: start the next attempt afresh
        self.reset()

    def act(self, obs) -> np.ndarray:
        frame = np.asarray(obs["pixels"], dtype=np.uint8)
        pos = np.asarray(obs["agent_pos"], dtype=np.float64).reshape(2)
        prev_frame, prev_pos = self.prev if self.prev is not None else (frame, pos)
        self.prev = (frame, pos)
        a = predict(self.w, frame[None], prev_frame[None], pos[None], prev_pos[None])[0]
        if not np.all(np.isfinite(a)):
            a = pos.copy()  # never send junk: hold the pusher where it is
        ref = pos if self.last_action is None else self.last_action
        a = np.clip(np.clip(a, ref - self.max_delta, ref + self.max_delta), self.low, self.high)
        self.last_action = a
        return a
