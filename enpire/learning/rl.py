"""Offline reinforcement learning with a behaviour-cloning regulariser (TD3+BC), top to bottom in one file.

Regime: offline-to-online, with the online part optional.
1. The actor starts from a BC model (`enpire.learning.bc.MLP`, same features, same normalised-offset
   output, so the result exports with `bc.export_numpy` and runs in `mlp_policy.py` unchanged).
2. Offline: twin critics Q(s, a) learn from the recorded transitions with clipped double-Q targets and
   target-policy smoothing; every `policy_delay` steps the actor maximises
       lambda * Q(s, pi(s)) / mean|Q|  -  ||pi(s) - a_data||^2
   (TD3+BC: the Q term is rescaled so `alpha` alone sets the trade-off against staying near the data).
3. Online (optional, `online_episodes > 0`): the actor runs on gym-pusht in this process with Gaussian
   exploration noise; its transitions join the replay buffer and training continues the same way.

Reward: the recorded per-step reward is gym-pusht's coverage reward, clip(coverage / 0.95, 0, 1), and an
episode ends (terminal) at success. Taken as is, a positive reward every step makes *delaying* success
pay, so the learner uses `reward - 1` (zero only once the goal is covered): it is still the coverage
signal, but every step short of success costs, and reaching the terminal sooner is better.
Everything is bounded by `steps` and a wall-clock budget; losses are checked for NaN.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from enpire.learning.bc import MLP, NaNLossError, make_xy, seed_everything
from enpire.learning.dataset import Dataset
from enpire.learning.device import CPU, Placement
from enpire.learning.mlp_policy import features


@dataclass
class RLConfig:
    steps: int = 20000  # offline gradient steps
    batch_size: int = 256
    gamma: float = 0.98
    tau: float = 0.005
    actor_lr: float = 1e-4
    critic_lr: float = 3e-4
    alpha: float = 2.5  # TD3+BC: weight of the Q term against the BC term
    policy_delay: int = 2
    policy_noise: float = 0.2  # target smoothing, in normalised action units
    noise_clip: float = 0.5
    critic_hidden: int = 256
    online_episodes: int = 0  # optional online fine-tuning episodes on gym-pusht
    online_steps_per_env_step: int = 1
    explore_noise: float = 0.1
    seed: int = 0
    time_budget_s: float = 600.0


class Critic(nn.Module):
    """Two Q heads over (normalised features, normalised action offset)."""

    def __init__(self, n_in: int, n_act: int, hidden: int):
        super().__init__()

        def head() -> nn.Sequential:
            return nn.Sequential(nn.Linear(n_in + n_act, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

        self.q1, self.q2 = head(), head()

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa = torch.cat([x, a], dim=1)
        return self.q1(xa).squeeze(1), self.q2(xa).squeeze(1)


class Replay:
    """Normalised transitions as tensors; grows when online data arrives."""

    def __init__(self, x, a, r, x2, d):
        self.x, self.a, self.r, self.x2, self.d = x, a, r, x2, d

    def __len__(self) -> int:
        return len(self.x)

    def add(self, x, a, r, x2, d) -> None:
        self.x = torch.cat([self.x, x])
        self.a = torch.cat([self.a, a])
        self.r = torch.cat([self.r, r])
        self.x2 = torch.cat([self.x2, x2])
        self.d = torch.cat([self.d, d])

    def sample(self, n: int, gen: torch.Generator):
        idx = torch.randint(0, len(self.x), (n,), generator=gen).to(self.x.device)  # CPU generator: same draws anywhere
        return self.x[idx], self.a[idx], self.r[idx], self.x2[idx], self.d[idx]


def _replay_from(ds: Dataset, actor: MLP, device: torch.device) -> Replay:
    x, y = make_xy(ds)
    # next features: the next observation, with the current one as its "previous"
    x2 = features(ds.next_obs, ds.obs).astype(np.float32)
    with torch.no_grad():
        tensors = (actor.normalise_x(torch.as_tensor(x)), actor.normalise_y(torch.as_tensor(y)),
                   torch.as_tensor(ds.rewards - 1.0), actor.normalise_x(torch.as_tensor(x2)), torch.as_tensor(ds.dones))
        return Replay(*(t.to(device) for t in tensors))


def train_td3bc(ds: Dataset, cfg: RLConfig | None = None, init: MLP | None = None, log=None,
                place: Placement | None = None) -> tuple[MLP, dict]:
    """Returns the trained actor (a `bc.MLP`, on the CPU) and metrics, `samples_per_s` among them. `init` is a
    BC model to start from. One process on `place.device` (default the CPU): the networks are small, so
    data parallelism would cost more in gradient exchange than it saves."""
    cfg = cfg or RLConfig()
    dev = (place or CPU).device
    t0 = time.monotonic()
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if init is None:
        from enpire.learning.bc import BCConfig, train_bc

        init, _ = train_bc(ds, BCConfig(seed=cfg.seed, time_budget_s=cfg.time_budget_s / 3), place=place)
    actor = copy.deepcopy(init).cpu()
    actor_targ = copy.deepcopy(actor)
    n_in = actor.linears[0].in_features
    n_act = actor.linears[-1].out_features
    critic = Critic(n_in, n_act, cfg.critic_hidden)  # built on the CPU: the same init on every device
    critic_targ = copy.deepcopy(critic)
    for net in (actor, actor_targ, critic, critic_targ):
        net.to(dev)
    a_opt = torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr)
    c_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
    buf = _replay_from(ds, actor, dev)

    def soft_update(net: nn.Module, targ: nn.Module) -> None:
        with torch.no_grad():
            for p, pt in zip(net.parameters(), targ.parameters(), strict=True):
                pt.mul_(1 - cfg.tau).add_(cfg.tau * p)

    stats = {"critic_loss": math.nan, "actor_bc": math.nan, "q_mean": math.nan}
    # losses stay on the device between checks: a host sync per step would idle a GPU
    live = {k: torch.full((), math.nan, device=dev) for k in stats}

    def check(step: int) -> None:
        stats.update({k: float(v) for k, v in live.items()})
        if not math.isfinite(stats["critic_loss"]):
            raise NaNLossError(f"non-finite critic loss by step {step}")
        if step >= cfg.policy_delay and not math.isfinite(stats["actor_bc"] + stats["q_mean"]):
            raise NaNLossError(f"non-finite actor loss by step {step}")

    def update(step: int) -> None:
        x, a, r, x2, d = buf.sample(cfg.batch_size, gen)
        with torch.no_grad():
            noise = (torch.randn(a.shape, generator=gen) * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip).to(dev)
            a2 = actor_targ(x2) + noise
            q1t, q2t = critic_targ(x2, a2)
            target = r + cfg.gamma * (1 - d) * torch.min(q1t, q2t)
        q1, q2 = critic(x, a)
        c_loss = ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()
        c_opt.zero_grad(set_to_none=True)
        c_loss.backward()
        c_opt.step()
        live["critic_loss"] = c_loss.detach()
        if step % cfg.policy_delay == 0:
            pi = actor(x)
            q = critic(x, pi)[0]
            lam = cfg.alpha / q.abs().mean().detach().clamp_min(1e-6)
            bc_term = ((pi - a) ** 2).mean()
            a_loss = -lam * q.mean() + bc_term
            a_opt.zero_grad(set_to_none=True)
            a_loss.backward()
            a_opt.step()
            soft_update(critic, critic_targ)
            soft_update(actor, actor_targ)
            live["actor_bc"], live["q_mean"] = bc_term.detach(), q.mean().detach()

    step = 0
    stopped = "steps"
    began = time.monotonic()
    for step in range(1, cfg.steps + 1):
        update(step)
        if step % 200 == 0:
            check(step)
            if log and step % 1000 == 0:
                log(f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        if time.monotonic() - t0 > cfg.time_budget_s:
            stopped = "time_budget"
            break
    check(step)
    offline_s = time.monotonic() - began

    online = {"online_episodes": 0.0, "online_successes": 0.0}
    if cfg.online_episodes > 0 and stopped != "time_budget":
        online = _online(actor, buf, update, cfg, step, t0)
        check(step)
    actor.cpu().eval()
    metrics = {"offline_steps": float(step), "rl_s": time.monotonic() - t0,
               "samples_per_s": step * cfg.batch_size / offline_s if offline_s > 0 else 0.0,
               "time_limited": float(stopped == "time_budget"), **stats, **online}
    return actor, metrics


def _online(actor: MLP, buf: Replay, update, cfg: RLConfig, step: int, t0: float) -> dict:
    """Fine-tune online on gym-pusht (training seeds, never the held-out ones): act with exploration noise,
    store the transition, take gradient steps. Bounded by episodes and the wall-clock budget."""
    from enpire.learning.dataset import make_pusht_env

    env = make_pusht_env()
    rng = np.random.default_rng(cfg.seed)
    dev = buf.x.device
    mean, std = actor.act_mean.cpu().numpy(), actor.act_std.cpu().numpy()
    wins = episodes = 0

    def normalised(obs: np.ndarray, prev: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(features(obs[None], prev[None]), dtype=torch.float32, device=dev)
        return actor.normalise_x(x)

    try:
        for ep in range(cfg.online_episodes):
            obs, _ = env.reset(seed=10_000_000 + cfg.seed * 100_000 + ep)
            prev = np.asarray(obs, dtype=np.float64)
            last = prev[:2].copy()
            episodes += 1
            for _ in range(300):
                o = np.asarray(obs, dtype=np.float64)
                with torch.no_grad():
                    xn = normalised(o, prev)
                    an = actor(xn)[0].cpu().numpy() + rng.normal(0.0, cfg.explore_noise, 2)
                a = o[:2] + an * std + mean
                a = np.clip(np.clip(a, last - 95.0, last + 95.0), 0.0, 512.0)
                an = ((a - o[:2]) - mean) / std  # what was executed
                obs2, reward, terminated, _trunc, _info = env.step(a)
                o2 = np.asarray(obs2, dtype=np.float64)
                with torch.no_grad():
                    x2n = normalised(o2, o)
                buf.add(xn, torch.as_tensor(an[None], dtype=torch.float32, device=dev),
                        torch.tensor([reward - 1.0], device=dev), x2n, torch.tensor([float(terminated)], device=dev))
                prev, obs, last = o, obs2, a
                for _ in range(cfg.online_steps_per_env_step):
                    step += 1
                    update(step)
                if terminated:
                    wins += 1
                    break
                if time.monotonic() - t0 > cfg.time_budget_s:
                    return {"online_episodes": float(episodes), "online_successes": float(wins)}
    finally:
        env.close()
    return {"online_episodes": float(episodes), "online_successes": float(wins)}


