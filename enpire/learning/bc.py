"""Behaviour cloning for Push-T, top to bottom in one file.

Data: recorded transitions (`enpire.learning.dataset.Dataset`), usually only successful episodes.
Input: hand-made features of the current and previous observation (`mlp_policy.features`, the one
definition the numpy policy also uses). Target: the action as an offset from the agent position
(`action - agent_xy`), which is small and centred, instead of an absolute position on the table.
Model: an MLP with ReLU; inputs and targets are normalised with statistics of the training split, and
those statistics travel with the weights. Loss: mean squared error on the normalised target.
Training: Adam, minibatches, validation on held-out *episodes* (not transitions: neighbouring steps are
nearly identical), early stopping on the validation loss, best weights kept; deterministic for a seed.
Export: `export_numpy(model)` gives the plain arrays `mlp_policy.py` loads from `weights.npz`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from enpire.learning.dataset import Dataset
from enpire.learning.device import CPU, Placement, autocast
from enpire.learning.mlp_policy import FEATURE_VERSION, N_FEATURES, features

ACT_LOW, ACT_HIGH, MAX_DELTA = 0.0, 512.0, 100.0  # Push-T action bounds and per-step change limit


class NaNLossError(RuntimeError):
    """Training produced a non-finite loss."""


@dataclass
class BCConfig:
    hidden: int = 256
    layers: int = 3  # linear layers, so layers - 1 hidden activations
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 15  # epochs without a better validation loss before stopping
    val_fraction: float = 0.1
    seed: int = 0
    time_budget_s: float = 600.0
    inject_nan_at_step: int = -1  # tests only: poison one batch to exercise the NaN path


# ---------------------------------------------------------------------------------------------
# Data: features and targets
# ---------------------------------------------------------------------------------------------


def previous_obs(ds: Dataset) -> np.ndarray:
    """The observation one step earlier for every transition (the same one on an episode's first step)."""
    prev = np.empty_like(ds.obs)
    prev[1:] = ds.obs[:-1]
    prev[ds.episode_start] = ds.obs[ds.episode_start]
    return prev


def make_xy(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, F) and targets (N, 2) = action - agent position, float32."""
    x = features(ds.obs, previous_obs(ds)).astype(np.float32)
    y = (ds.actions - ds.obs[:, :2]).astype(np.float32)
    return x, y


def split_episodes(ds: Dataset, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) over transitions, splitting whole episodes."""
    ep = ds.episode_index()
    n = ds.n_episodes
    n_val = int(round(n * val_fraction)) if n >= 2 else 0
    n_val = min(max(n_val, 1 if n >= 2 and val_fraction > 0 else 0), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val_eps = np.zeros(n, dtype=bool)
    val_eps[order[:n_val]] = True
    val = val_eps[ep]
    return ~val, val


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """features -> normalised offset; normalisation statistics kept as buffers (exported with the weights)."""

    def __init__(self, n_in: int = N_FEATURES, n_out: int = 2, hidden: int = 256, layers: int = 3):
        super().__init__()
        sizes = [n_in] + [hidden] * (layers - 1) + [n_out]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.register_buffer("feat_mean", torch.zeros(n_in))
        self.register_buffer("feat_std", torch.ones(n_in))
        self.register_buffer("act_mean", torch.zeros(n_out))
        self.register_buffer("act_std", torch.ones(n_out))

    def set_normalisation(self, x: np.ndarray, y: np.ndarray) -> None:
        self.feat_mean.copy_(torch.as_tensor(x.mean(0)))
        self.feat_std.copy_(torch.as_tensor(np.maximum(x.std(0), 1e-3)))
        self.act_mean.copy_(torch.as_tensor(y.mean(0)))
        self.act_std.copy_(torch.as_tensor(np.maximum(y.std(0), 1e-3)))

    def forward(self, x_norm: torch.Tensor) -> torch.Tensor:
        h = x_norm
        for i, layer in enumerate(self.linears):
            h = layer(h)
            if i < len(self.linears) - 1:
                h = torch.relu(h)
        return h

    def normalise_x(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.feat_mean) / self.feat_std

    def normalise_y(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.act_mean) / self.act_std

    @torch.no_grad()
    def predict_actions(self, obs: np.ndarray, prev_obs: np.ndarray) -> np.ndarray:
        """Absolute action targets (unclipped), float64, for a batch of observations (tests, evaluation)."""
        x = torch.as_tensor(features(obs, prev_obs), dtype=torch.float64)
        m = self.double()
        out = m(m.normalise_x(x)) * m.act_std + m.act_mean
        self.float()
        return np.asarray(obs, dtype=np.float64).reshape(-1, 5)[:, :2] + out.numpy()


def export_numpy(model: MLP) -> dict[str, np.ndarray]:
    """The arrays `mlp_policy.py` reads (save with np.savez; loads with allow_pickle=False). Kept in the
    model's own float32: exact, and half the bytes every lease carries to a cell."""
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(model.linears):
        out[f"w{i}"] = layer.weight.detach().numpy().T.copy()
        out[f"b{i}"] = layer.bias.detach().numpy().copy()
    for name in ("feat_mean", "feat_std", "act_mean", "act_std"):
        out[name] = getattr(model, name).detach().numpy().copy()
    out["n_layers"] = np.array(len(model.linears))
    out["feature_version"] = np.array(FEATURE_VERSION)
    out["act_low"] = np.full(2, ACT_LOW)
    out["act_high"] = np.full(2, ACT_HIGH)
    out["max_delta"] = np.array(MAX_DELTA)
    return out


def import_numpy(weights: dict[str, np.ndarray]) -> MLP:
    """The model back from exported arrays (e.g. a BC checkpoint that RL starts from)."""
    if int(weights.get("feature_version", -1)) != FEATURE_VERSION:
        raise ValueError(f"checkpoint feature_version {weights.get('feature_version')} != {FEATURE_VERSION}")
    n = int(weights["n_layers"])
    w0 = weights["w0"]
    model = MLP(w0.shape[0], weights[f"w{n - 1}"].shape[1], hidden=w0.shape[1] if n > 1 else 1, layers=n)
    with torch.no_grad():
        for i, layer in enumerate(model.linears):
            if tuple(weights[f"w{i}"].shape) != (layer.in_features, layer.out_features):
                raise ValueError(f"checkpoint layer {i} has shape {weights[f'w{i}'].shape}, "
                                 f"expected {(layer.in_features, layer.out_features)}")
            layer.weight.copy_(torch.as_tensor(np.asarray(weights[f"w{i}"]).T.copy()))
            layer.bias.copy_(torch.as_tensor(np.asarray(weights[f"b{i}"])))
        for name in ("feat_mean", "feat_std", "act_mean", "act_std"):
            getattr(model, name).copy_(torch.as_tensor(np.asarray(weights[name])))
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def train_bc(ds: Dataset, cfg: BCConfig | None = None, log=None,
             place: Placement | None = None) -> tuple[MLP, dict[str, float]]:
    """Fit the MLP on `place` (default: the CPU, one process); returns the best model (by validation loss,
    on the CPU) and metrics, `samples_per_s` among them. Raises NaNLossError.

    Data-parallel (place.world > 1): every rank holds the whole (small) dataset and draws the same
    permutation; each global batch is split across the ranks and DDP averages the gradients, so a step sees
    the same batch as one process would. Validation runs on every rank on identical weights, and the stop
    decision is agreed on, so no rank waits for another that has stopped."""
    cfg = cfg or BCConfig()
    place = place or CPU
    dev = place.device
    t0 = time.monotonic()
    seed_everything(cfg.seed)
    x, y = make_xy(ds)
    train_mask, val_mask = split_episodes(ds, cfg.val_fraction, cfg.seed)
    xt, yt = x[train_mask], y[train_mask]
    xv, yv = x[val_mask], y[val_mask]

    model = MLP(x.shape[1], y.shape[1], cfg.hidden, cfg.layers)  # built on the CPU: same init on any device
    model.set_normalisation(xt, yt)
    with torch.no_grad():
        xt_n, yt_n = model.normalise_x(torch.as_tensor(xt)), model.normalise_y(torch.as_tensor(yt))
        xv_n, yv_n = model.normalise_x(torch.as_tensor(xv)), model.normalise_y(torch.as_tensor(yv))
    xt_n, yt_n, xv_n, yv_n = (t.to(dev) for t in (xt_n, yt_n, xv_n, yv_n))
    model.to(dev)
    net = model
    if place.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(xt) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs * steps_per_epoch, eta_min=cfg.lr * 0.05)
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same batches on every device and rank

    best_val, best_state, best_epoch, bad_epochs, step = math.inf, None, -1, 0, 0
    train_loss = math.nan
    stopped = "max_epochs"
    epoch = 0
    samples, train_time = 0, 0.0
    for epoch in range(cfg.max_epochs):
        model.train()
        began = time.monotonic()
        perm = torch.randperm(len(xt_n), generator=gen)
        total = torch.zeros((), device=dev)  # summed on the device: no host sync per step on a GPU
        for i in range(steps_per_epoch):
            batch = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            idx = batch[place.rank::place.world].to(dev)
            xb, yb = xt_n[idx], yt_n[idx]
            if step == cfg.inject_nan_at_step:
                xb = xb * float("nan")
            with autocast(dev, place.amp):
                out = net(xb)
            per_sample = ((out.float() - yb) ** 2).mean(1)
            # the mean over the GLOBAL batch once DDP averages over ranks, even when the shards differ in size
            loss = per_sample.sum() * place.world / len(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += per_sample.detach().sum()
            samples += len(idx)
            step += 1
        train_loss = float(place.sum(total)) / len(xt_n)
        train_time += time.monotonic() - began
        if not math.isfinite(train_loss):
            raise NaNLossError(f"non-finite training loss in epoch {epoch} (by step {step})")
        model.eval()
        with torch.no_grad(), autocast(dev, place.amp):
            val_loss = float(((model(xv_n).float() - yv_n) ** 2).mean()) if len(xv_n) else train_loss
        if not math.isfinite(val_loss):
            raise NaNLossError(f"non-finite validation loss at epoch {epoch}")
        if log:
            log(f"epoch {epoch} train {train_loss:.4f} val {val_loss:.4f}")
        if val_loss < best_val - 1e-5:
            best_val, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                stopped = "early_stopping"
                break
        if place.any(time.monotonic() - t0 > cfg.time_budget_s):
            stopped = "time_budget"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.cpu().eval()
    metrics = {
        "train_loss": train_loss, "val_loss": best_val, "best_epoch": float(best_epoch), "epochs": float(epoch + 1),
        "steps": float(step), "train_transitions": float(len(xt)), "val_transitions": float(len(xv)),
        "episodes": float(ds.n_episodes), "train_s": time.monotonic() - t0,
        "early_stopped": float(stopped == "early_stopping"), "time_limited": float(stopped == "time_budget"),
        # training samples per second of the whole run (all ranks), gradient steps only
        "samples_per_s": float(place.sum(torch.tensor(float(samples), device=dev))) / train_time if train_time > 0 else 0.0,
    }
    return model, metrics


def config_dict(cfg: BCConfig) -> dict:
    return asdict(cfg)
