"""Visuomotor behaviour cloning for Push-T from pixels: a small CNN trained on the fleet's recorded
successes (camera frames + pusher position -> action), top to bottom in one file.

Data: episodes recorded with pixel observations (`frames` in the episode store; the flat observation is
the pusher position), selected like every recipe's (`dataset.select_episodes`: agents' experiments on
tuning seeds, successful, never held-out episodes). Input: the current and the previous frame and the
pusher position and its change (`visuomotor_policy.frames_input` / `pos_input`, the numpy policy's own
definitions). Target: the action as an offset from the pusher position, normalised. Model: the network
`visuomotor_policy.forward` runs (convolutions, spatial soft-argmax keypoints, MLP). Training: AdamW,
minibatches, validation on held-out *episodes*, best weights kept, a time budget; deterministic for a
seed on the CPU. `device` ("auto", "cpu", "cuda", "cuda:1") picks where it trains: "auto" takes CUDA
when torch sees one. Export: `export_numpy(model)` gives the arrays `visuomotor_policy.py` loads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from enpire.episodes import EpisodeFileError, read_trajectory
from enpire.learning.dataset import NoDataError, manifest_entries, select_episodes
from enpire.learning.device import CPU, Placement, autocast
from enpire.learning.visuomotor_policy import POLICY_KIND

ACT_LOW, ACT_HIGH, MAX_DELTA = 0.0, 512.0, 100.0  # Push-T action bounds and per-step change limit


class NaNLossError(RuntimeError):
    """Training produced a non-finite loss."""


@dataclass
class VisuomotorConfig:
    # The first convolution cuts the frame into 4x4 patches (25x25 maps): 3x the samples per second of a
    # 5x5 stride-2 stem on a loaded CPU core, and the soft-argmax keeps sub-pixel positions anyway.
    channels: tuple[int, ...] = (16, 32, 32)
    strides: tuple[int, ...] = (4, 1, 1)
    kernels: tuple[int, ...] = (4, 3, 3)
    hidden: int = 256
    mlp_layers: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 64
    max_epochs: int = 100
    patience: int = 8
    val_fraction: float = 0.1
    seed: int = 0
    time_budget_s: float = 600.0
    device: str = "auto"
    inject_nan_at_step: int = -1  # tests only


@dataclass
class FrameDataset:
    """Transitions of pixel episodes; `prev[i]` indexes the transition one step earlier (itself on an
    episode's first step), so frames are stored once."""

    frames: np.ndarray  # (N, H, W, 3) uint8: the frame each action was chosen on
    pos: np.ndarray  # (N, 2) float32 pusher position
    actions: np.ndarray  # (N, 2) float32
    prev: np.ndarray  # (N,) int64
    episode: np.ndarray  # (N,) int64 episode number
    episode_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ids)


def from_episodes(episodes: list[dict[str, np.ndarray]], ids: list[str] | None = None,
                  skipped: list[str] | None = None) -> FrameDataset:
    """Concatenate episodes ({frames (T+1, H, W, 3), observations (T+1, 2), actions (T, 2)})."""
    if not episodes:
        raise NoDataError("no episodes")
    frames, pos, act, prev, ep = [], [], [], [], []
    n = 0
    for k, e in enumerate(episodes):
        t = len(e["actions"])
        frames.append(e["frames"][:t])
        pos.append(np.asarray(e["observations"][:t, :2], np.float32))
        act.append(np.asarray(e["actions"], np.float32))
        prev.append(n + np.maximum(np.arange(t) - 1, 0))
        ep.append(np.full(t, k))
        n += t
    return FrameDataset(np.concatenate(frames), np.concatenate(pos), np.concatenate(act), np.concatenate(prev),
                        np.concatenate(ep), list(ids or [f"ep{i}" for i in range(len(episodes))]), list(skipped or []))


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


# ---------------------------------------------------------------------------------------------
# The network (the same arithmetic as visuomotor_policy.forward)
# ---------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, cfg: VisuomotorConfig):
        super().__init__()
        chans = (6, *cfg.channels)
        self.strides = tuple(cfg.strides)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, k, stride=s, padding=k // 2)
                                   for a, b, k, s in zip(chans[:-1], chans[1:], cfg.kernels, cfg.strides, strict=True))
        sizes = [2 * chans[-1] + 4] + [cfg.hidden] * (cfg.mlp_layers - 1) + [2]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        for name in ("pos_mean", "pos_std", "act_mean", "act_std"):
            self.register_buffer(name, torch.zeros(2) if "mean" in name else torch.ones(2))

    def forward(self, image: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = image
        for conv in self.convs:
            h = torch.relu(conv(h))
        n, c, hh, ww = h.shape
        soft = torch.softmax(h.reshape(n, c, hh * ww), dim=2)
        xs = torch.linspace(-1.0, 1.0, ww, device=h.device, dtype=h.dtype).repeat(hh)
        ys = torch.linspace(-1.0, 1.0, hh, device=h.device, dtype=h.dtype).repeat_interleave(ww)
        z = torch.cat([soft @ xs, soft @ ys, pos], dim=1)
        for i, layer in enumerate(self.linears):
            z = layer(z)
            if i < len(self.linears) - 1:
                z = torch.relu(z)
        return z


def export_numpy(model: Net) -> dict[str, np.ndarray]:
    """The arrays `visuomotor_policy.py` reads (np.savez; loads with allow_pickle=False)."""
    model = model.to("cpu")
    out: dict[str, np.ndarray] = {}
    for i, conv in enumerate(model.convs):
        out[f"c{i}_w"] = conv.weight.detach().numpy().copy()
        out[f"c{i}_b"] = conv.bias.detach().numpy().copy()
    for i, layer in enumerate(model.linears):
        out[f"m{i}_w"] = layer.weight.detach().numpy().T.copy()
        out[f"m{i}_b"] = layer.bias.detach().numpy().copy()
    for name in ("pos_mean", "pos_std", "act_mean", "act_std"):
        out[name] = getattr(model, name).detach().numpy().copy()
    out["n_conv"] = np.array(len(model.convs))
    out["strides"] = np.array(model.strides)
    out["n_mlp"] = np.array(len(model.linears))
    out["act_low"], out["act_high"], out["max_delta"] = np.full(2, ACT_LOW), np.full(2, ACT_HIGH), np.array(MAX_DELTA)
    out["policy_kind"] = np.array(POLICY_KIND)
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
    from enpire.learning.visuomotor_policy import frames_input

    image = frames_input(ds.frames[idx], ds.frames[ds.prev[idx]])
    pos = ds.pos[idx]
    prev_pos = ds.pos[ds.prev[idx]]
    return torch.as_tensor(image, device=device), torch.as_tensor(np.concatenate([pos, prev_pos], 1), device=device)


def train_visuomotor(ds: FrameDataset, cfg: VisuomotorConfig | None = None, log=None,
                     place: Placement | None = None) -> tuple[Net, dict[str, float]]:
    """Fit the network on `place` (default: `cfg.device`, one process); returns the best model (by
    validation loss) on the CPU and metrics, `samples_per_s` among them.

    bf16 autocast when `place.amp` (CUDA). Data-parallel when place.world > 1: every rank draws the same
    permutation, takes its share of each global batch, and the loss is scaled so DDP's averaged gradient
    is the global batch's; the stop decisions (time, patience) are agreed on by all ranks."""
    cfg = cfg or VisuomotorConfig()
    t0 = time.monotonic()
    place = place or (CPU if cfg.device == "cpu" else Placement(pick_device(cfg.device)))
    device = place.device
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_ep = ds.n_episodes
    val_eps = set(rng.permutation(n_ep)[: int(round(cfg.val_fraction * n_ep))].tolist()) if n_ep > 1 else set()
    is_val = np.isin(ds.episode, list(val_eps))
    train_idx, val_idx = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]

    model = Net(cfg)
    offsets = ds.actions - ds.pos
    with torch.no_grad():
        model.pos_mean.copy_(torch.as_tensor(ds.pos[train_idx].mean(0)))
        model.pos_std.copy_(torch.as_tensor(np.maximum(ds.pos[train_idx].std(0), 1e-3)))
        model.act_mean.copy_(torch.as_tensor(offsets[train_idx].mean(0)))
        model.act_std.copy_(torch.as_tensor(np.maximum(offsets[train_idx].std(0), 1e-3)))
    model.to(device)
    net = model
    if place.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    target = torch.as_tensor((offsets - model.act_mean.cpu().numpy()) / model.act_std.cpu().numpy(), device=device)

    def inputs(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, pp = _batch(ds, idx, device)
        pos = (pp[:, :2] - model.pos_mean) / model.pos_std
        return image, torch.cat([pos, (pp[:, :2] - pp[:, 2:]) / 20.0], dim=1)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_val, best_state, best_epoch, bad, step, epoch = math.inf, None, -1, 0, 0, 0
    train_loss, stopped = math.nan, "max_epochs"
    samples, train_time = 0, 0.0
    for epoch in range(cfg.max_epochs):
        model.train()
        began = time.monotonic()
        perm = rng.permutation(train_idx)
        total = torch.zeros((), device=device)  # summed on the device: no host sync per step on a GPU
        seen = 0
        for i in range(0, len(perm), cfg.batch_size):
            batch = perm[i : i + cfg.batch_size]
            idx = batch[place.rank :: place.world]
            image, pos = inputs(idx)
            if step == cfg.inject_nan_at_step:
                image = image * float("nan")
            with autocast(device, place.amp):
                out = net(image, pos)
            per_sample = ((out.float() - target[idx]) ** 2).mean(1)
            loss = per_sample.sum() * place.world / len(batch)  # the global batch's mean once DDP averages
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += per_sample.detach().sum()
            seen += len(batch)
            samples += len(idx)
            step += 1
            if step % 20 == 0 and place.any(time.monotonic() - t0 > cfg.time_budget_s):
                stopped = "time_budget"
                break
        train_loss = float(place.sum(total)) / max(1, seen)
        train_time += time.monotonic() - began
        if not math.isfinite(train_loss):
            raise NaNLossError(f"non-finite training loss in epoch {epoch} (by step {step})")
        model.eval()
        with torch.no_grad(), autocast(device, place.amp):
            val_loss = train_loss
            if len(val_idx):
                sums = 0.0
                for j in range(0, len(val_idx), 256):
                    idx = val_idx[j : j + 256]
                    sums += float(((model(*inputs(idx)).float() - target[idx]) ** 2).sum()) / 2
                val_loss = sums / len(val_idx)
        if not math.isfinite(val_loss):
            raise NaNLossError(f"non-finite validation loss at epoch {epoch}")
        if log:
            log(f"epoch {epoch} train {train_loss:.4f} val {val_loss:.4f} ({time.monotonic() - t0:.0f} s)")
        if val_loss < best_val - 1e-5:
            best_val, best_epoch, bad = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                stopped = "early_stopping"
        if stopped == "max_epochs" and place.any(time.monotonic() - t0 > cfg.time_budget_s):
            stopped = "time_budget"
        if stopped != "max_epochs":
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.to("cpu").eval()
    metrics = {
        "train_loss": train_loss, "val_loss": best_val, "best_epoch": float(best_epoch), "epochs": float(epoch + 1),
        "steps": float(step), "train_transitions": float(len(train_idx)), "val_transitions": float(len(val_idx)),
        "episodes": float(ds.n_episodes), "transitions": float(len(ds)), "frames_mb": ds.frames.nbytes / 2**20,
        "train_s": time.monotonic() - t0, "device_cuda": float(device.type == "cuda"),
        # training samples per second of the whole run (all ranks), gradient steps only
        "samples_per_s": float(place.sum(torch.tensor(float(samples), device=device))) / train_time if train_time else 0.0,
        "early_stopped": float(stopped == "early_stopping"), "time_limited": float(stopped == "time_budget"),
    }
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
