"""Visuomotor imitation for Push-T from pixels: a small CNN trained on the fleet's recorded successes
(camera frame + pusher position -> action), then on the states it visits itself (DAgger), top to bottom
in one file.

Why this shape (measured on a 190-success pixels fleet run, see README "Push-T from pixels"):
- The recordings are right (replaying the champion on the recorded frames reproduces 17,878 of 17,881
  actions exactly), but the actions are not a function of what a frame shows: the controller that made
  them carries a memory (the contact it committed to, whether it is pushing, the orbit direction). An
  MLP on the ideal pose predicts them with 0.17 of their variance left; given that memory, 0.04. Cloning
  them failed closed-loop even from the exact pose (2/20).
- The same controller with its memory cleared at every step still solves 39/40 held-out seeds: its
  action is a function of the frame and the pusher position alone, which a network can learn exactly.

Data: episodes recorded with pixel observations (`frames` in the episode store; the flat observation is
the pusher position), selected like every recipe's (`dataset.select_episodes`: agents' experiments on
tuning seeds, successful, never held-out episodes). Labels: the *expert*, the perception template
(`enpire/agents/pusht_pixels_policy.py`, pixels only: it estimates the block pose from the frame) with
the fleet champion's parameters and its controller's memory cleared on every call, relabels every
recorded frame: the action it would take there, the pose it estimates and its discrete decision (contact
point, push or not, orbit direction). Model: convolutions -> spatial soft-argmax keypoints -> a pose head
(trained on the expert's pose estimates) -> the controller's features of that pose (pusher and goal in the
block's frame) -> a contact head (which of the 42 contact points, classified) -> a push/orbit head given
that contact -> an MLP on the features and the decision -> the action as a normalised offset from the
pusher in the block's frame, turned into the world's by the pose's angle (`visuomotor_policy.forward` is
the numpy twin the cells run). A regression onto two ways round the block averages them into a push into
it; a classified decision picks one.
Where the earlier version of this recipe lost (4.6% on held-out seeds), measured at the state level (exact
pose, MLP heads trained 60-90 s on the recordings, 20 tuning seeds, one run each; the memory-free expert
solves 17/20): its action head in the world's frame solved 7/20 even given the expert's decisions (16/20
in the block's frame); its push-or-not flag,
chosen side by side with the contact, was 83% right on its own training data (95% given the contact); and
trained jointly with the convolutions the heads got a few thousand steps in 15 minutes of a loaded 2-core
machine (a step of the convolutions: ~0.3 s of CPU for 64 frames).
Training: each step trains the convolutions and pose head on pose MSE (a batch of frames) and the heads on
the expert's decision (cross-entropy) and action (MSE given that decision), with the expert's own pose
estimates, slightly noised, as the heads' input; then `head_steps` heads-only steps on larger batches,
which read no frames (a few ms each). AdamW, a time budget, validation on held-out recorded episodes (pose
error in px, contact accuracy with the network's own pose). Then DAgger rounds: the numpy policy runs on
the simulator from tuning seeds (50,000 up, never held-out ones), the expert relabels every frame it
visits, the frames join the data set and training continues. Relabelling by a scripted expert is
legitimate here because the expert is the fleet's own champion (the tuned perception template); held-out
seeds are never touched.
Export: `export_numpy(model)` gives the arrays `visuomotor_policy.py` loads.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from enpire.episodes import EpisodeFileError, read_trajectory
from enpire.learning import visuomotor_policy as vp
from enpire.learning.dataset import NoDataError, manifest_entries, select_episodes
from enpire.learning.device import CPU, Placement, autocast

ACT_LOW, ACT_HIGH, MAX_DELTA = 0.0, 512.0, 100.0  # Push-T action bounds and per-step change limit
DAGGER_SEED0 = 50_000  # tuning seeds (0..99,999) the recordings are unlikely to use; held-out seeds start at 1,000,000


class NaNLossError(RuntimeError):
    """Training produced a non-finite loss."""


@dataclass
class VisuomotorConfig:
    # The first convolution cuts the frame into 4x4 patches (25x25 maps): cheap on a CPU, and the
    # soft-argmax keeps sub-pixel positions anyway. 8/16/16 channels: the pose error after 4 minutes of
    # one loaded core was 5.4 px with them against 17.7 px with 16/32/32 (3.2x slower per step).
    channels: tuple[int, ...] = (8, 16, 16)
    strides: tuple[int, ...] = (4, 1, 1)
    kernels: tuple[int, ...] = (4, 3, 3)
    pose_hidden: int = 128
    hidden: int = 256
    mlp_layers: int = 3
    pose_weight: float = 1.0
    mode_weight: float = 0.2
    lr: float = 3e-3  # decays linearly to a tenth over each fit (the pose needs small steps at the end)
    weight_decay: float = 1e-5
    batch_size: int = 32  # frames per step of the convolutions
    head_steps: int = 4  # heads-only steps (on the expert's poses, no frames) after each step of the convolutions
    head_batch: int = 256
    pose_noise_px: float = 1.0  # noise on the expert's poses the heads train on (about the network's pose error)
    pose_noise_deg: float = 1.0
    max_epochs: int = 100
    val_fraction: float = 0.1
    seed: int = 0
    time_budget_s: float = 600.0
    bc_share: float = 0.4  # of the training time, spent before the first DAgger round
    dagger_rounds: int = 4
    dagger_episodes: int = 40  # learner episodes per round (fewer when the round's rollout time runs out)
    rollout_share: float = 0.4  # of each round's time slice, for its rollouts
    horizon: int = 300
    workers: int = 2  # processes for relabelling and rollouts
    expert_params: dict[str, float] | None = None  # the perception template's parameters (None: its initial ones)
    device: str = "auto"
    inject_nan_at_step: int = -1  # tests only


@dataclass
class FrameDataset:
    """Labelled frames: what the network sees (frame, pusher position) and what the expert did there."""

    frames: np.ndarray  # (N, H, W, 3) uint8
    pos: np.ndarray  # (N, 2) float32 pusher position
    actions: np.ndarray  # (N, 2) float32: the recorded actions until `relabel` replaces them by the expert's
    episode: np.ndarray  # (N,) int64 episode number (DAgger rollouts get new numbers)
    pose: np.ndarray | None = None  # (N, 4) pose-head target, [(x-256)/32, (y-256)/32, cos, sin]
    pose_ok: np.ndarray | None = None  # (N,) bool: the expert saw the block
    mode: np.ndarray | None = None  # (N, 3) int64: the expert's contact, pushing (0/1), orbit direction + 1
    episode_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ids)

    def extend(self, other: FrameDataset) -> None:
        base = int(self.episode.max()) + 1 if len(self) else 0
        self.frames = np.concatenate([self.frames, other.frames])
        self.pos = np.concatenate([self.pos, other.pos])
        self.actions = np.concatenate([self.actions, other.actions])
        self.episode = np.concatenate([self.episode, other.episode + base])
        self.pose = np.concatenate([self.pose, other.pose])
        self.pose_ok = np.concatenate([self.pose_ok, other.pose_ok])
        self.mode = np.concatenate([self.mode, other.mode])
        self.episode_ids += other.episode_ids


def from_episodes(episodes: list[dict[str, np.ndarray]], ids: list[str] | None = None,
                  skipped: list[str] | None = None) -> FrameDataset:
    """Concatenate episodes ({frames (T+1, H, W, 3), observations (T+1, 2), actions (T, 2)})."""
    if not episodes:
        raise NoDataError("no episodes")
    frames, pos, act, ep = [], [], [], []
    for k, e in enumerate(episodes):
        t = len(e["actions"])
        frames.append(e["frames"][:t])
        pos.append(np.asarray(e["observations"][:t, :2], np.float32))
        act.append(np.asarray(e["actions"], np.float32))
        ep.append(np.full(t, k))
    return FrameDataset(np.concatenate(frames), np.concatenate(pos), np.concatenate(act), np.concatenate(ep),
                        episode_ids=list(ids or [f"ep{i}" for i in range(len(episodes))]), skipped=list(skipped or []))


def load_frames(state_dir: str | Path, *, task: str = "pusht", max_episodes: int | None = None,
                manifest: str | Path | None = None) -> FrameDataset:
    """The recorded successful pixel episodes of `task` (newest first when capped), or those a manifest
    names (the trainer's selection, `dataset.manifest_entries`). Files without frames (state episodes) or
    unreadable ones are skipped and named in `skipped`; NoDataError when none is left."""
    state_dir = Path(state_dir)
    if manifest:
        entries = [(i, f) for i, f, ok in manifest_entries(manifest) if ok]
    else:
        entries = [(r.episode_id, r.trajectory_file)
                   for r in select_episodes(state_dir, task=task, success_only=True, max_episodes=max_episodes)]
    episodes, ids, skipped = [], [], []
    for episode_id, file in entries:
        path = state_dir / file
        try:
            arrays = read_trajectory(path)
        except EpisodeFileError as exc:
            skipped.append(str(exc))
            continue
        if "frames" not in arrays or arrays["observations"].shape[1] != 2 or arrays["actions"].shape[1:] != (2,):
            skipped.append(f"{path}: not a pixels episode (no frames, or observations {arrays['observations'].shape})")
            continue
        if len(arrays["actions"]) == 0 or not all(np.all(np.isfinite(arrays[k])) for k in ("observations", "actions")):
            skipped.append(f"{path}: empty or non-finite")
            continue
        episodes.append(arrays)
        ids.append(episode_id)
    if not episodes:
        why = f"; skipped {len(skipped)}: {skipped[0]}" if skipped else ""
        raise NoDataError(f"no recorded pixel episodes in {state_dir} (task={task!r}, {len(entries)} selected){why}")
    return from_episodes(episodes, ids, skipped)


def champion_params(state_dir: str | Path, task: str = "pusht") -> dict[str, float] | None:
    """The fleet champion's policy parameters on the state dir's blackboard (None when there is none)."""
    from bus.blackboard import Blackboard
    from bus.records import Champion
    from enpire.learning.dataset import BOARD_NAME

    path = Path(state_dir) / BOARD_NAME
    if not path.exists():
        return None
    board = Blackboard(path, readonly=True)
    try:
        champion = board.get("champion", task, Champion)
    finally:
        board.close()
    return None if champion is None else dict(champion.policy.params or {})


# ---------------------------------------------------------------------------------------------
# The expert: the perception template with the champion's parameters, its memory cleared per call
# ---------------------------------------------------------------------------------------------


def expert_label(params: dict[str, float] | None, frame: np.ndarray,
                 pos: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(action, pose target, decision) the expert gives for one frame, from that frame alone: a fresh
    controller each call (no committed contact, no pushing flag, no orbit direction). Pose None: the block
    is hidden (the expert then holds the pusher)."""
    from enpire.agents import pusht_pixels_policy as perception

    pos = np.asarray(pos, np.float64).reshape(2)
    est = perception.estimate_pose(frame)
    if est is None:
        return pos.copy(), None, np.array([0, 0, 1])
    ctl = perception.controller.Policy(params)
    action = ctl.act(np.array([pos[0], pos[1], *est]))
    x, y, th = est
    pose = np.array([(x - 256.0) / vp.POSE_SCALE, (y - 256.0) / vp.POSE_SCALE, math.cos(th), math.sin(th)])
    return action, pose, np.array([ctl.contact, int(ctl.engaged), ctl.orbit_dir + 1])


def _relabel_chunk(params, frames: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, ...]:
    acts, poses, ok, modes = [], [], [], []
    for f, p in zip(frames, pos, strict=True):
        a, pose, mode = expert_label(params, f, p)
        acts.append(a)
        poses.append(pose if pose is not None else np.zeros(4))
        ok.append(pose is not None)
        modes.append(mode)
    return np.array(acts, np.float32), np.array(poses, np.float32), np.array(ok, bool), np.array(modes, np.int64)


def relabel(ds: FrameDataset, params, pool: ProcessPoolExecutor | None) -> None:
    """Replace the recorded actions by the expert's and set the pose targets (in `pool`'s processes)."""
    chunks = np.array_split(np.arange(len(ds)), max(1, 8 * (pool._max_workers if pool else 1)))
    jobs = [(params, ds.frames[c], ds.pos[c]) for c in chunks if len(c)]
    parts = list(pool.map(_relabel_chunk, *zip(*jobs, strict=True))) if pool else [_relabel_chunk(*j) for j in jobs]
    ds.actions = np.concatenate([p[0] for p in parts])
    ds.pose = np.concatenate([p[1] for p in parts])
    ds.pose_ok = np.concatenate([p[2] for p in parts])
    ds.mode = np.concatenate([p[3] for p in parts])


def _rollouts(weights: dict[str, np.ndarray], params, seeds: list[int], horizon: int,
              deadline: float) -> tuple[dict, int]:
    """Run the numpy policy (what a cell runs) from each seed; the expert labels every frame it visits.
    Stops at `deadline` (time.time(): the workers are other processes) even mid-episode, so a loaded
    machine shortens a round instead of overrunning the budget. Returns the labelled frames and the number
    of successes."""
    from hw.pusht import PushTDriver

    driver = PushTDriver(obs_type="pixels")
    policy = vp.Policy({}, weights=weights)
    out = {"frames": [], "pos": [], "actions": [], "pose": [], "pose_ok": [], "mode": [], "episode": []}
    wins = 0
    try:
        for k, seed in enumerate(seeds):
            obs = driver.reset(int(seed))
            policy.reset()
            for _ in range(horizon):
                if time.time() > deadline:
                    return out, wins
                a, pose, mode = expert_label(params, obs["pixels"], obs["agent_pos"])
                out["frames"].append(obs["pixels"])
                out["pos"].append(obs["agent_pos"])
                out["actions"].append(a)
                out["pose"].append(pose if pose is not None else np.zeros(4))
                out["pose_ok"].append(pose is not None)
                out["mode"].append(mode)
                out["episode"].append(k)
                obs = driver.act(policy.act(obs))
                if driver.outcome()[1]:
                    wins += 1
                    break
    finally:
        driver.disconnect()
    return out, wins


def dagger_data(weights, params, seeds: list[int], horizon: int, pool: ProcessPoolExecutor | None,
                deadline: float) -> tuple[FrameDataset | None, int]:
    """One DAgger round's data: learner rollouts from `seeds` until `deadline`, relabelled by the expert."""
    n = pool._max_workers if pool else 1
    shares = [seeds[i::n] for i in range(n) if seeds[i::n]]
    jobs = [(weights, params, s, horizon, deadline) for s in shares]
    parts = list(pool.map(_rollouts, *zip(*jobs, strict=True))) if pool else [_rollouts(*j) for j in jobs]
    eps, wins = [], 0
    for i, (out, w) in enumerate(parts):
        wins += w
        if not out["frames"]:  # the deadline came before this worker's first step
            continue
        eps.append(FrameDataset(np.array(out["frames"], np.uint8), np.array(out["pos"], np.float32),
                                np.array(out["actions"], np.float32), np.array(out["episode"]) * len(parts) + i,
                                np.array(out["pose"], np.float32), np.array(out["pose_ok"], bool),
                                np.array(out["mode"], np.int64), episode_ids=[f"dagger-{s}" for s in shares[i]]))
    if not eps:
        return None, wins
    ds = eps[0]
    for e in eps[1:]:
        ds.frames, ds.pos, ds.actions = (np.concatenate([ds.frames, e.frames]), np.concatenate([ds.pos, e.pos]),
                                         np.concatenate([ds.actions, e.actions]))
        ds.episode, ds.pose = np.concatenate([ds.episode, e.episode]), np.concatenate([ds.pose, e.pose])
        ds.pose_ok, ds.episode_ids = np.concatenate([ds.pose_ok, e.pose_ok]), ds.episode_ids + e.episode_ids
        ds.mode = np.concatenate([ds.mode, e.mode])
    return ds, wins


# ---------------------------------------------------------------------------------------------
# The network (the same arithmetic as visuomotor_policy.forward)
# ---------------------------------------------------------------------------------------------


def pose_features_t(pos: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Torch twin of `visuomotor_policy.pose_features`."""
    bx, by = pose[:, 0] * vp.POSE_SCALE + 256.0, pose[:, 1] * vp.POSE_SCALE + 256.0
    norm = torch.sqrt(pose[:, 2] ** 2 + pose[:, 3] ** 2) + 1e-6
    c, s = pose[:, 2] / norm, pose[:, 3] / norm
    rx, ry = pos[:, 0] - bx, pos[:, 1] - by
    gx, gy = vp.GOAL[0] - bx, vp.GOAL[1] - by
    cg, sg = math.cos(vp.GOAL[2]), math.sin(vp.GOAL[2])
    sc = vp.SCALE
    return torch.stack([(pos[:, 0] - 256.0) / sc, (pos[:, 1] - 256.0) / sc, (bx - 256.0) / sc, (by - 256.0) / sc,
                        c, s, cg * c + sg * s, sg * c - cg * s,
                        (c * rx + s * ry) / sc, (-s * rx + c * ry) / sc, (c * gx + s * gy) / sc, (-s * gx + c * gy) / sc],
                       dim=1)


def _mlp(sizes: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _run(layers: nn.ModuleList, z: torch.Tensor) -> torch.Tensor:
    for i, layer in enumerate(layers):
        z = layer(z)
        if i < len(layers) - 1:
            z = torch.relu(z)
    return z


class Net(nn.Module):
    def __init__(self, cfg: VisuomotorConfig):
        super().__init__()
        chans = (3, *cfg.channels)
        self.strides = tuple(cfg.strides)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, k, stride=s, padding=k // 2)
                                   for a, b, k, s in zip(chans[:-1], chans[1:], cfg.kernels, cfg.strides, strict=True))
        keys = 2 * chans[-1]
        self.pose_head = _mlp([keys, cfg.pose_hidden, cfg.pose_hidden, 4])
        # The heads see the pose only (its features), never the keypoints: so they can be trained on the
        # expert's own pose estimates, thousands of cheap steps, while the convolutions (a CPU's costly
        # part) learn the pose. The decision comes in two steps: the contact point, then (given that
        # contact, one-hot) push or not and the orbit direction. Whether to push is "is the pusher at
        # *this* contact's pre-contact point"; side by side with the contact it was a guess about an
        # unknown contact (83% right at the state level against 95% given the contact).
        self.mode_head = _mlp([vp.N_FEATURES, cfg.hidden, cfg.hidden, vp.MODES[0]])
        self.mode_head2 = _mlp([vp.N_FEATURES + vp.MODES[0], cfg.hidden, cfg.hidden, vp.MODES[1] + vp.MODES[2]])
        self.linears = _mlp([vp.N_FEATURES + vp.N_MODES] + [cfg.hidden] * (cfg.mlp_layers - 1) + [2])
        self.register_buffer("feat_mean", torch.zeros(vp.N_FEATURES))
        self.register_buffer("feat_std", torch.ones(vp.N_FEATURES))
        self.register_buffer("act_mean", torch.zeros(2))
        self.register_buffer("act_std", torch.ones(2))

    def pose(self, image: torch.Tensor) -> torch.Tensor:
        """Frames -> the block pose the network sees, [(x-256)/32, (y-256)/32, cos, sin]."""
        h = image
        for conv in self.convs:
            h = torch.relu(conv(h))
        n, c, hh, ww = h.shape
        soft = torch.softmax(h.reshape(n, c, hh * ww), dim=2)
        xs = torch.linspace(-1.0, 1.0, ww, device=h.device, dtype=h.dtype).repeat(hh)
        ys = torch.linspace(-1.0, 1.0, hh, device=h.device, dtype=h.dtype).repeat_interleave(ww)
        return _run(self.pose_head, torch.cat([soft @ xs, soft @ ys], dim=1))

    def heads(self, pos: torch.Tensor, pose: torch.Tensor,
              mode: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pusher position, pose) -> (normalised action offset in the block's frame, mode logits); the
        push/orbit logits and the action are conditioned on `mode` (N, 3) when given (training: the
        expert's decision), else on the argmax of the heads."""
        z = (pose_features_t(pos, pose) - self.feat_mean) / self.feat_std
        logits1 = _run(self.mode_head, z)
        contact = logits1.argmax(1) if mode is None else mode[:, 0]
        logits2 = _run(self.mode_head2, torch.cat([z, nn.functional.one_hot(contact, vp.MODES[0]).to(z.dtype)], dim=1))
        if mode is None:
            push, orbit = torch.split(logits2, vp.MODES[1:], dim=1)
            mode = torch.stack([contact, push.argmax(1), orbit.argmax(1)], dim=1)
        chosen = torch.cat([nn.functional.one_hot(mode[:, i], k).to(z.dtype) for i, k in enumerate(vp.MODES)], dim=1)
        return _run(self.linears, torch.cat([z, chosen], dim=1)), torch.cat([logits1, logits2], dim=1)

    def forward(self, image: torch.Tensor, pos: torch.Tensor, mode: torch.Tensor | None = None,
                head_pose: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (normalised action offset in the block's frame, pose, mode logits). The heads act on the
        network's own pose, or on `head_pose` when given (training: the expert's, so that one call, which
        data-parallel training needs, trains the convolutions on the pose and the heads on the decisions)."""
        pose = self.pose(image)
        out, logits = self.heads(pos, pose if head_pose is None else head_pose, mode)
        return out, pose, logits


def export_numpy(model: Net) -> dict[str, np.ndarray]:
    """The arrays `visuomotor_policy.py` reads (np.savez; loads with allow_pickle=False)."""
    model = model.to("cpu")
    out: dict[str, np.ndarray] = {}
    for i, conv in enumerate(model.convs):
        out[f"c{i}_w"] = conv.weight.detach().numpy().copy()
        out[f"c{i}_b"] = conv.bias.detach().numpy().copy()
    for prefix, layers in (("p", model.pose_head), ("q", model.mode_head), ("r", model.mode_head2), ("m", model.linears)):
        for i, layer in enumerate(layers):
            out[f"{prefix}{i}_w"] = layer.weight.detach().numpy().T.copy()
            out[f"{prefix}{i}_b"] = layer.bias.detach().numpy().copy()
    for name in ("feat_mean", "feat_std", "act_mean", "act_std"):
        out[name] = getattr(model, name).detach().numpy().copy()
    out["n_conv"], out["strides"] = np.array(len(model.convs)), np.array(model.strides)
    out["n_pose"], out["n_mode"] = np.array(len(model.pose_head)), np.array(len(model.mode_head))
    out["n_mode2"] = np.array(len(model.mode_head2))
    out["n_mlp"] = np.array(len(model.linears))
    out["act_low"], out["act_high"], out["max_delta"] = np.full(2, ACT_LOW), np.full(2, ACT_HIGH), np.array(MAX_DELTA)
    out["policy_kind"], out["policy_version"] = np.array(vp.POLICY_KIND), np.array(vp.POLICY_VERSION)
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """"auto": CUDA when torch sees one, else the CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device here")
    return device


def _batch(ds: FrameDataset, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(vp.frames_input(ds.frames[idx]), device=device),
            torch.as_tensor(ds.pos[idx], device=device))


def local_offsets(ds: FrameDataset, idx: np.ndarray) -> np.ndarray:
    """The expert's actions as offsets from the pusher in the frame of the block pose it saw: the head's
    target. In that frame pushing at a contact is (nearly) a constant per contact and going to its
    pre-contact point a clipped difference of two positions; in the world's frame the head had to learn
    the rotation as well (at the state level: 16/20 against 7/20 closed-loop, given the decisions)."""
    return vp.rotate(ds.actions[idx] - ds.pos[idx], ds.pose[idx], sign=-1.0).astype(np.float32)


def _noisy(pose: np.ndarray, cfg: VisuomotorConfig, rng: np.random.Generator) -> np.ndarray:
    """The expert's pose targets with a little Gaussian noise (cfg.pose_noise_px, _deg): the heads are
    trained on them but run on the network's own estimate, which is that far off."""
    n = len(pose)
    th = np.arctan2(pose[:, 3], pose[:, 2]) + rng.normal(0.0, math.radians(cfg.pose_noise_deg), n)
    xy = pose[:, :2] + rng.normal(0.0, cfg.pose_noise_px / vp.POSE_SCALE, (n, 2))
    return np.concatenate([xy, np.cos(th)[:, None], np.sin(th)[:, None]], axis=1).astype(np.float32)


def _head_loss(out, logits, target, mode, cfg: VisuomotorConfig) -> torch.Tensor:
    """Per-sample action MSE (given the expert's decision) + decision cross-entropy."""
    loss = ((out.float() - target) ** 2).mean(1)
    for group, i in zip(torch.split(logits.float(), vp.MODES, dim=1), range(3), strict=True):
        loss = loss + cfg.mode_weight * nn.functional.cross_entropy(group, mode[:, i], reduction="none")
    return loss


def _losses(net, ds: FrameDataset, idx: np.ndarray, model: Net, device, amp: bool, cfg: VisuomotorConfig,
            rng: np.random.Generator | None = None):
    """Per-sample head loss (on the expert's pose, noised when `rng`) and pose loss of the frames `idx`;
    both zero where the expert did not see the block."""
    image, pos = _batch(ds, idx, device)
    target = (torch.as_tensor(local_offsets(ds, idx), device=device) - model.act_mean) / model.act_std
    mode = torch.as_tensor(ds.mode[idx], device=device)
    label = ds.pose[idx] if rng is None else _noisy(ds.pose[idx], cfg, rng)
    with autocast(device, amp):
        out, pose, logits = net(image, pos, mode, torch.as_tensor(label, device=device))
    ok = torch.as_tensor(ds.pose_ok[idx], device=device, dtype=torch.float32)
    pose_loss = cfg.pose_weight * ((pose.float() - torch.as_tensor(ds.pose[idx], device=device)) ** 2).mean(1)
    return _head_loss(out, logits, target, mode, cfg) * ok, pose_loss * ok


def _head_step(model: Net, ds: FrameDataset, idx: np.ndarray, device, cfg: VisuomotorConfig,
               rng: np.random.Generator) -> torch.Tensor:
    """Loss of one heads-only batch: no frame is read, so it costs a few ms against the convolutions'
    hundreds."""
    pos = torch.as_tensor(ds.pos[idx], device=device)
    target = (torch.as_tensor(local_offsets(ds, idx), device=device) - model.act_mean) / model.act_std
    mode = torch.as_tensor(ds.mode[idx], device=device)
    out, logits = model.heads(pos, torch.as_tensor(_noisy(ds.pose[idx], cfg, rng), device=device), mode)
    return _head_loss(out, logits, target, mode, cfg).mean()


def fit(model: Net, net, ds: FrameDataset, train_idx: np.ndarray, val_idx: np.ndarray, cfg: VisuomotorConfig,
        seconds: float, lr: float, place: Placement, rng: np.random.Generator, log=None, step0: int = 0) -> dict[str, float]:
    """Train for `seconds` (or cfg.max_epochs) on `train_idx`; the last weights stay (DAgger continues
    from them). Returns the losses and the step count."""
    device = place.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    t0, step, samples, epoch = time.monotonic(), step0, 0, 0
    train_loss = pose_loss = math.nan
    out_of_time = False
    seen_idx = train_idx[ds.pose_ok[train_idx]]  # frames where the expert saw the block: the heads' data
    head_steps = cfg.head_steps if place.world == 1 and len(seen_idx) else 0  # data-parallel: the joint step only
    for epoch in range(cfg.max_epochs):  # noqa: B007 (reported)
        model.train()
        perm = rng.permutation(train_idx)
        total = torch.zeros(2, device=device)  # summed on the device: no host sync per step on a GPU
        seen = 0
        for i in range(0, len(perm), cfg.batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * max(0.1, 1.0 - (time.monotonic() - t0) / max(seconds, 1e-6))
            batch = perm[i : i + cfg.batch_size]
            idx = batch[place.rank :: place.world]
            act, pl = _losses(net, ds, idx, model, device, place.amp, cfg, rng)
            if step == cfg.inject_nan_at_step:
                act = act * float("nan")
            loss = (act + pl).sum() * place.world / len(batch)  # the global batch's mean once DDP averages
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for _ in range(head_steps):
                opt.zero_grad(set_to_none=True)  # the convolutions get no gradient: AdamW leaves them be
                _head_step(model, ds, rng.choice(seen_idx, cfg.head_batch), device, cfg, rng).backward()
                opt.step()
            total += torch.stack([act.detach().sum(), pl.detach().sum()])
            seen += len(batch)
            samples += len(idx)
            step += 1
            if step % 20 == 0 and place.any(time.monotonic() - t0 > seconds):
                out_of_time = True
                break
        sums = place.sum(total)
        train_loss, pose_loss = float(sums[0]) / max(1, seen), float(sums[1]) / max(1, seen)
        if not math.isfinite(train_loss) or not math.isfinite(pose_loss):
            raise NaNLossError(f"non-finite training loss in epoch {epoch} (by step {step})")
        if out_of_time:
            break
    metrics = {"train_loss": train_loss, "train_aux_loss": pose_loss, "epochs": float(epoch + 1), "steps": float(step),
               "samples": float(samples), "seconds": time.monotonic() - t0}
    metrics.update(evaluate_loss(model, ds, val_idx, cfg, place))
    if log:
        log(" ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def evaluate_loss(model: Net, ds: FrameDataset, idx: np.ndarray, cfg: VisuomotorConfig, place: Placement) -> dict[str, float]:
    if not len(idx):
        return {"val_loss": math.nan, "val_aux_loss": math.nan, "val_contact_accuracy": math.nan,
                "val_pose_px": math.nan}
    model.eval()
    a = p = hits = px = 0.0
    with torch.no_grad():
        for j in range(0, len(idx), 256):
            part = idx[j : j + 256]
            act, pl = _losses(model, ds, part, model, place.device, place.amp, cfg)
            a, p = a + float(act.sum()), p + float(pl.sum())
            _, pose, logits = model(*_batch(ds, part, place.device))  # the heads on the network's own pose
            hits += float((logits[:, : vp.MODES[0]].argmax(1).cpu().numpy() == ds.mode[part, 0]).sum())
            err = np.linalg.norm(pose[:, :2].float().cpu().numpy() - ds.pose[part, :2], axis=1) * vp.POSE_SCALE
            px += float(err[ds.pose_ok[part]].sum())
    if not math.isfinite(a):
        raise NaNLossError("non-finite validation loss")
    return {"val_loss": a / len(idx), "val_aux_loss": p / len(idx), "val_contact_accuracy": hits / len(idx),
            "val_pose_px": px / max(1, int(ds.pose_ok[idx].sum()))}


def train_visuomotor(ds: FrameDataset, cfg: VisuomotorConfig | None = None, log=None,
                     place: Placement | None = None) -> tuple[Net, dict[str, float]]:
    """Relabel the recordings by the expert, fit the network, then DAgger rounds, all within
    cfg.time_budget_s; returns the model on the CPU and metrics (`samples_per_s`, `dagger_successes_r{i}`:
    the learner's successes on each round's rollout seeds, a training-side progress signal).

    bf16 autocast when `place.amp` (CUDA). Data-parallel when place.world > 1 (DAgger rounds then off:
    the rollouts would have to be shared): every rank draws the same permutation, takes its share of
    each global batch, and the loss is scaled so DDP's averaged gradient is the global batch's."""
    cfg = cfg or VisuomotorConfig()
    t0 = time.monotonic()
    place = place or (CPU if cfg.device == "cpu" else Placement(pick_device(cfg.device)))
    device = place.device
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    rounds = cfg.dagger_rounds if place.world == 1 else 0
    ctx = multiprocessing.get_context("spawn")  # workers run numpy and the simulator; no forked torch state
    pool = ProcessPoolExecutor(cfg.workers, mp_context=ctx) if cfg.workers > 1 else None
    try:
        if ds.pose is None:
            relabel(ds, cfg.expert_params, pool)
        relabel_s = time.monotonic() - t0
        n_ep = ds.n_episodes
        n_val = min(max(int(round(cfg.val_fraction * n_ep)), 1), n_ep - 1) if n_ep > 1 and cfg.val_fraction > 0 else 0
        val_eps = rng.permutation(n_ep)[:n_val]  # whole episodes: neighbouring frames are nearly identical
        is_val = np.isin(ds.episode, val_eps)
        train_idx, val_idx = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]

        model = Net(cfg)
        offsets = local_offsets(ds, train_idx)
        seen = train_idx[ds.pose_ok[train_idx]]
        feats = vp.pose_features(ds.pos[seen], ds.pose[seen]) if len(seen) else np.zeros((1, vp.N_FEATURES), np.float32)
        with torch.no_grad():
            model.feat_mean.copy_(torch.as_tensor(feats.mean(0)))
            model.feat_std.copy_(torch.as_tensor(np.maximum(feats.std(0), 1e-3)))
            model.act_mean.copy_(torch.as_tensor(offsets.mean(0)))
            model.act_std.copy_(torch.as_tensor(np.maximum(offsets.std(0), 1e-3)))
        model.to(device)
        net = model
        if place.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        left = cfg.time_budget_s - (time.monotonic() - t0)
        metrics = {"relabel_s": relabel_s, "recorded_transitions": float(len(ds)), "episodes": float(n_ep),
                   "frames_mb": ds.frames.nbytes / 2**20}
        bc = fit(model, net, ds, train_idx, val_idx, cfg, left * (cfg.bc_share if rounds else 1.0), cfg.lr, place, rng, log)
        metrics.update({f"bc_{k}": v for k, v in bc.items()})
        samples, train_time, step = bc["samples"], bc["seconds"], int(bc["steps"])
        last = bc
        for r in range(rounds):
            began = time.monotonic()
            seeds = list(range(DAGGER_SEED0 + cfg.seed * 10_000 + r * cfg.dagger_episodes,
                               DAGGER_SEED0 + cfg.seed * 10_000 + (r + 1) * cfg.dagger_episodes))
            left = cfg.time_budget_s - (time.monotonic() - t0)
            deadline = time.time() + cfg.rollout_share * left / (rounds - r)  # the rest of the slice trains
            new, wins = dagger_data(export_numpy(model), cfg.expert_params, seeds, cfg.horizon, pool, deadline)
            model.to(device)
            if new is not None:
                ds.extend(new)
                train_idx = np.concatenate([train_idx, np.arange(len(ds) - len(new), len(ds))])
            metrics[f"dagger_successes_r{r}"] = float(wins)
            metrics[f"dagger_transitions_r{r}"] = float(len(new) if new is not None else 0)
            metrics[f"dagger_rollout_s_r{r}"] = time.monotonic() - began
            if log:
                log(f"round {r}: learner {wins}/{len(seeds)} on seeds {seeds[0]}..{seeds[-1]}, +{metrics[f'dagger_transitions_r{r}']:.0f} frames "
                    f"({time.monotonic() - began:.0f} s)")
            left = cfg.time_budget_s - (time.monotonic() - t0)
            last = fit(model, net, ds, train_idx, val_idx, cfg, left / (rounds - r), cfg.lr / 3, place, rng, log, step)
            samples, train_time, step = samples + last["samples"], train_time + last["seconds"], int(last["steps"])
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)  # rollouts stop at their deadline anyway
    model = model.to("cpu").eval()
    metrics.update({
        "train_loss": last["train_loss"], "val_loss": last["val_loss"], "val_aux_loss": last["val_aux_loss"],
        "val_contact_accuracy": last["val_contact_accuracy"],
        "steps": float(step), "transitions": float(len(ds)), "dagger_rounds": float(rounds),
        "dagger_transitions": float(len(ds) - metrics["recorded_transitions"]),
        "train_transitions": float(len(train_idx)), "val_transitions": float(len(val_idx)),
        "train_s": time.monotonic() - t0, "device_cuda": float(device.type == "cuda"),
        # training samples per second of the whole run (all ranks), gradient steps only
        "samples_per_s": float(place.sum(torch.tensor(float(samples), device=device))) / train_time if train_time else 0.0,
    })
    return model, metrics


# ---------------------------------------------------------------------------------------------
# Recording pixel episodes from an in-process policy (tests and benchmarks; the fleet records its own)
# ---------------------------------------------------------------------------------------------


def record_pixels(state_dir: str | Path, policy, seeds, *, policy_ref: str = "scripted", horizon: int = 300,
                  task: str = "pusht") -> dict[str, int]:
    """Run `policy` (act(obs) on pixel observations) on Push-T from each seed and record every episode
    as a cell and the scheduler do (frames + pusher positions + actions in the episode store, an
    `EpisodeRecord` of kind "agent" on the blackboard). Returns {"episodes", "successes", "transitions"}."""
    from bus.blackboard import Blackboard
    from bus.messages import PolicySpec, Verdict
    from bus.records import EpisodeRecord
    from enpire.episodes import write_trajectory
    from enpire.learning.dataset import BOARD_NAME
    from hw.pusht import PushTDriver

    state_dir = Path(state_dir)
    board = Blackboard(state_dir / BOARD_NAME, map_size=1 << 28)
    driver = PushTDriver(obs_type="pixels")
    n = ok = steps = 0
    try:
        for seed in seeds:
            t0 = time.time()
            obs = driver.reset(int(seed))
            policy.reset()
            observations, actions, rewards, done, reward = [obs], [], [], False, 0.0
            for _ in range(horizon):
                a = np.clip(np.asarray(policy.act(obs), np.float64).reshape(2), ACT_LOW, ACT_HIGH)
                obs = driver.act(a)
                reward, done = driver.outcome()
                observations.append(obs)
                actions.append(a)
                rewards.append(reward)
                if done:
                    break
            episode_id = f"rec-{policy_ref}-{seed}"
            rel = Path("episodes") / f"{episode_id}.npz"
            write_trajectory(state_dir / rel, np.array([o["agent_pos"] for o in observations], np.float32),
                             np.array(actions, np.float32).reshape(-1, 2), np.array(rewards, np.float32),
                             np.stack([o["pixels"] for o in observations]))
            record = EpisodeRecord(
                episode_id=episode_id, job_id=f"rec-{policy_ref}", kind="agent", task=task, seed=int(seed),
                policy=PolicySpec(commit=policy_ref), cell_id="recorder",
                verdict=Verdict(success=done, score=reward, reason="success" if done else "timeout",
                                verifier="pusht_state"),
                success_at_k=done, attempts=1, steps=len(actions), reset_s=0.0, run_s=time.time() - t0,
                verify_s=0.0, finished=time.time(), trajectory_file=str(rel),
            )
            board.put("episodes", episode_id, record)
            n, ok, steps = n + 1, ok + int(done), steps + len(actions)
    finally:
        driver.disconnect()
        board.close()
    return {"episodes": n, "successes": ok, "transitions": steps}
