"""Transitions from the fleet's episode store, and a recorder that fills a state dir from a scripted policy.

`load_dataset(state_dir, task=...)` reads the blackboard's episode index (table "episodes",
`EpisodeRecord`), keeps the episodes that match (agents' experiments on tuning seeds only, never
held-out ones; task, successful verdict, recorded trajectory), reads
each `.npz` with `enpire.episodes.read_trajectory` (allow_pickle=False) and concatenates them into flat
transition arrays. A truncated or corrupt file is skipped and reported (`Dataset.skipped` names the file
and what is wrong); it never stops the load.

`record_scripted(state_dir, policy_factory, seeds)` runs a policy on gym-pusht and writes episodes the
way the fleet does (npz under `episodes/`, an `EpisodeRecord` on the blackboard), for tests and benches.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bus.blackboard import Blackboard
from bus.messages import PolicySpec, Verdict
from bus.records import EpisodeRecord
from enpire.episodes import EpisodeFileError, read_trajectory, write_trajectory

BOARD_NAME = "blackboard.lmdb"
ARTIFACTS = "artifacts"  # checkpoints by content hash, in the state dir


class NoDataError(RuntimeError):
    """No usable episode matched the selection."""


@dataclass
class Dataset:
    """Flat transitions of several episodes, in episode order.

    `episode_start[i]` is True on the first transition of an episode (policies that look at the previous
    observation need to know where one episode ends and the next begins).
    """

    obs: np.ndarray  # (N, obs_dim) float32
    actions: np.ndarray  # (N, act_dim) float32
    next_obs: np.ndarray  # (N, obs_dim) float32
    rewards: np.ndarray  # (N,) float32
    dones: np.ndarray  # (N,) float32: 1.0 on the last transition of a successful episode (a true terminal)
    episode_start: np.ndarray  # (N,) bool
    episode_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: why" for each unreadable file

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ids)

    def __len__(self) -> int:
        return len(self.actions)

    def episode_index(self) -> np.ndarray:
        """(N,) int: which episode (0..n_episodes-1) each transition belongs to."""
        return np.cumsum(self.episode_start) - 1


def trainable(record: EpisodeRecord, task: str | None = "pusht", success_only: bool = True) -> bool:
    """An episode a recipe may learn from: an agent's experiment (tuning seeds: held-out and background
    episodes judge policies and must stay unseen by training), matching task, recorded trajectory, a
    successful verdict (unless `success_only=False`), not flagged (e.g. successful at reset)."""
    return (record.kind == "agent" and bool(record.trajectory_file) and not record.flagged
            and (task is None or record.task == task) and (record.verdict.success or not success_only))


def choose(records: Iterable[EpisodeRecord], *, task: str | None = "pusht", success_only: bool = True,
           max_episodes: int | None = None) -> list[EpisodeRecord]:
    """The `trainable` records, the newest `max_episodes` when capped, in chronological order."""
    chosen = [r for r in records if trainable(r, task, success_only)]
    chosen.sort(key=lambda r: (r.finished, r.episode_id), reverse=True)
    if max_episodes is not None:
        chosen = chosen[: max(0, int(max_episodes))]
    chosen.sort(key=lambda r: (r.finished, r.episode_id))  # stable, chronological order for training
    return chosen


def select_episodes(
    state_dir: str | Path, *, task: str | None = "pusht", success_only: bool = True, max_episodes: int | None = None
) -> list[EpisodeRecord]:
    """The `trainable` index entries of a state dir (see `choose`)."""
    path = Path(state_dir) / BOARD_NAME
    if not path.exists():
        raise NoDataError(f"no blackboard at {path}")
    board = Blackboard(path, readonly=True)
    try:
        records = board.values("episodes", EpisodeRecord)
    finally:
        board.close()
    return choose(records, task=task, success_only=success_only, max_episodes=max_episodes)


def load_dataset(
    state_dir: str | Path,
    *,
    task: str | None = "pusht",
    success_only: bool = True,
    max_episodes: int | None = None,
) -> Dataset:
    """Transitions of the selected episodes. Raises NoDataError when nothing usable is left."""
    records = select_episodes(state_dir, task=task, success_only=success_only, max_episodes=max_episodes)
    return _read(Path(state_dir), [(r.episode_id, r.trajectory_file, bool(r.verdict.success)) for r in records],
                 f"task={task!r}, success_only={success_only}")


def load_manifest(state_dir: str | Path, manifest: str | Path) -> Dataset:
    """Transitions of the episodes a manifest names ({"episodes": [{"id", "file", "success"}]}, files
    relative to `state_dir`): the selection the trainer made. Raises NoDataError when nothing is usable."""
    return _read(Path(state_dir), manifest_entries(manifest), f"manifest {Path(manifest).name}")


def manifest_entries(manifest: str | Path) -> list[tuple[str, str, bool]]:
    """(id, file, success) of each episode a manifest names; NoDataError in one line when it is bad."""
    try:
        doc = json.loads(Path(manifest).read_text())
        entries = [(str(e["id"]), str(e["file"]), bool(e["success"])) for e in doc["episodes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NoDataError(f"manifest {manifest}: unreadable ({type(exc).__name__}: {exc})") from None
    for _, file, _ in entries:
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise NoDataError(f"manifest {manifest}: file {file!r} is not inside the state dir")
    return entries


def _read(state_dir: Path, entries: list[tuple[str, str, bool]], selection: str) -> Dataset:
    """Read (id, file, success) episodes; unreadable files are skipped and reported."""
    episodes, ids, skipped = [], [], []
    for episode_id, file, success in entries:
        path = state_dir / file
        try:
            arrays = read_trajectory(path)
            _check_arrays(path, arrays)
        except EpisodeFileError as exc:
            skipped.append(str(exc))
            continue
        if len(arrays["actions"]) == 0:
            skipped.append(f"{path}: empty episode")
            continue
        episodes.append((arrays, success))
        ids.append(episode_id)
    if not episodes:
        why = f"; skipped {len(skipped)} unreadable: {skipped[0]}" if skipped else ""
        raise NoDataError(f"no usable episodes in {state_dir} ({selection}, {len(entries)} selected){why}")
    return from_episodes([a for a, _ in episodes], [s for _, s in episodes], ids=ids, skipped=skipped)


def _check_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    obs, act = arrays["observations"], arrays["actions"]
    if obs.ndim != 2 or act.ndim != 2:
        raise EpisodeFileError(f"{path}: observations/actions must be 2-D, got {obs.shape} and {act.shape}")
    for name, a in arrays.items():
        if a.dtype.kind not in "iuf":
            raise EpisodeFileError(f"{path}: {name} has dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise EpisodeFileError(f"{path}: {name} has non-finite values")


def from_episodes(
    episodes: list[dict[str, np.ndarray]],
    successes: list[bool] | None = None,
    *,
    ids: list[str] | None = None,
    skipped: list[str] | None = None,
) -> Dataset:
    """Concatenate episodes ({observations (T+1, d), actions (T, a), rewards (T,)}) into transitions."""
    if not episodes:
        raise NoDataError("no episodes")
    successes = successes if successes is not None else [True] * len(episodes)
    obs, act, nxt, rew, done, start = [], [], [], [], [], []
    dims = None
    for ep, ok in zip(episodes, successes, strict=True):
        o = np.asarray(ep["observations"], dtype=np.float32)
        a = np.asarray(ep["actions"], dtype=np.float32)
        t = len(a)
        if dims is None:
            dims = (o.shape[1], a.shape[1])
        elif (o.shape[1], a.shape[1]) != dims:
            raise ValueError(f"episode dims {(o.shape[1], a.shape[1])} differ from {dims}")
        obs.append(o[:-1])
        nxt.append(o[1:])
        act.append(a)
        rew.append(np.asarray(ep["rewards"], dtype=np.float32))
        d = np.zeros(t, dtype=np.float32)
        d[-1] = 1.0 if ok else 0.0  # a timeout is a truncation, not a terminal state
        done.append(d)
        s = np.zeros(t, dtype=bool)
        s[0] = True
        start.append(s)
    return Dataset(
        obs=np.concatenate(obs), actions=np.concatenate(act), next_obs=np.concatenate(nxt),
        rewards=np.concatenate(rew), dones=np.concatenate(done), episode_start=np.concatenate(start),
        episode_ids=list(ids) if ids is not None else [f"ep{i}" for i in range(len(episodes))],
        skipped=list(skipped or []),
    )


# ---------------------------------------------------------------------------------------------
# Recording demonstrations from a scripted policy (tests and benchmarks; the fleet records its own).
# ---------------------------------------------------------------------------------------------


def make_pusht_env():
    """The unwrapped gym-pusht env with state observations (the caller owns the 300-step horizon)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gym_pusht  # noqa: F401  (registers the env id)
        import gymnasium as gym

        return gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped


def rollout_pusht(env, policy, seed: int, horizon: int = 300) -> tuple[dict[str, np.ndarray], bool, float]:
    """One episode of `policy` (the policy protocol: reset(), act(obs)); ends at success or the horizon."""
    obs, _ = env.reset(seed=int(seed))
    policy.reset()
    observations, actions, rewards = [np.asarray(obs, dtype=np.float32)], [], []
    success, coverage = False, 0.0
    for _ in range(horizon):
        a = np.asarray(policy.act(np.asarray(obs, dtype=np.float64)), dtype=np.float64).reshape(2)
        obs, reward, terminated, _trunc, info = env.step(a)
        observations.append(np.asarray(obs, dtype=np.float32))
        actions.append(a.astype(np.float32))
        rewards.append(float(reward))
        coverage = float(info.get("coverage", 0.0))
        if terminated:
            success = True
            break
    arrays = {
        "observations": np.stack(observations),
        "actions": np.stack(actions).reshape(-1, 2),
        "rewards": np.asarray(rewards, dtype=np.float32),
    }
    return arrays, success, coverage


def record_scripted(
    state_dir: str | Path,
    policy_factory: Callable[[], object],
    seeds: Iterable[int],
    *,
    task: str = "pusht",
    policy_ref: str = "scripted",
    horizon: int = 300,
) -> dict[str, int]:
    """Run the policy on each seed and record every episode as the fleet would (npz + index entry).
    Returns {"episodes", "successes", "transitions"}."""
    state_dir = Path(state_dir)
    board = Blackboard(state_dir / BOARD_NAME, map_size=1 << 28)
    env = make_pusht_env()
    policy = policy_factory()
    n = ok = steps = 0
    try:
        for seed in seeds:
            t0 = time.time()
            arrays, success, coverage = rollout_pusht(env, policy, seed, horizon)
            episode_id = f"rec-{policy_ref}-{seed}"
            rel = Path("episodes") / f"{episode_id}.npz"
            write_trajectory(state_dir / rel, arrays["observations"], arrays["actions"], arrays["rewards"])
            t = len(arrays["actions"])
            record = EpisodeRecord(
                episode_id=episode_id, job_id=f"rec-{policy_ref}", kind="agent", task=task, seed=int(seed),
                policy=PolicySpec(commit=policy_ref), cell_id="recorder",
                verdict=Verdict(success=success, score=coverage, reason="success" if success else "timeout",
                                verifier="pusht_state"),
                success_at_k=success, attempts=1, steps=t, reset_s=0.0, run_s=time.time() - t0, verify_s=0.0,
                finished=time.time(), trajectory_file=str(rel),
            )
            board.put("episodes", episode_id, record)
            n += 1
            ok += int(success)
            steps += t
    finally:
        env.close()
        board.close()
    return {"episodes": n, "successes": ok, "transitions": steps}
