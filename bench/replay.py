"""Replay audit of a run: every recorded episode's actions are what the policy it is recorded under does.

    python bench/replay.py --state-dir DIR [--config enpire.toml] [--env-sample 200] [--seed 0]

1. Policy replay, every episode with a trajectory (pass@1): the recorded policy (its commit's files
   from the workspace, its parameters) runs in the policy sandbox (the same jail a cell uses, with a
   generous deadline) on the recorded observations, and each action must equal the recorded one
   exactly (trajectories are float64, as the policy saw them). A missed deadline leaves a visible
   trace: the cell held its previous action (then the live policy's state is ahead of what the
   recording shows and the comparison stops there, "matched until a hold"), or, before the first
   action, it asked again with the same observation (the replay tries 1-3 extra first calls). Any other
   difference is a mismatch: an episode recorded under a policy that did not produce it.
2. Environment replay, a random sample: the recorded actions from reset(seed) give the recorded
   observations bit for bit and the recorded score (the verifier's, for episodes it judged).

Prints one JSON object; `ok` is false when any episode mismatches. `bench/soak.py` runs it after its
fault-injection run, with hostile policies among the candidates.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.blackboard import Blackboard  # noqa: E402
from bus.records import EpisodeRecord  # noqa: E402
from enpire import config as cfg  # noqa: E402
from enpire import verify  # noqa: E402
from enpire.episodes import EpisodeFileError, read_trajectory  # noqa: E402
from enpire.sandbox import PolicyError, PolicySandbox, SandboxLimits  # noqa: E402
from enpire.workspace import Workspace  # noqa: E402
from hw import make_driver, verifier_name  # noqa: E402

REPLAY_LIMITS = SandboxLimits(act_timeout_s=5.0, call_timeout_s=5.0, load_timeout_s=30.0)


def _actions(sb: PolicySandbox, observations: np.ndarray, n: int, extra_first: int) -> list[np.ndarray | None]:
    """The policy's actions for the first n observations (None where it failed), after `extra_first`
    additional calls on the first observation (a resubmission after a missed first deadline)."""
    sb.reset()
    for _ in range(extra_first):
        sb.act(observations[0])
    out: list[np.ndarray | None] = []
    for t in range(n):
        result = sb.act(observations[t])
        if result.error or result.action is None:
            out.append(None)
            break
        out.append(np.asarray(result.action, dtype=np.float64))
    return out


def _compare(replayed: list[np.ndarray | None], recorded: np.ndarray) -> str:
    """"exact", "until_hold" or "mismatch" (see the module docstring)."""
    for t, action in enumerate(replayed):
        want = recorded[t]
        if action is not None and action.shape == want.shape and np.array_equal(action, want):
            continue
        if t > 0 and np.array_equal(want, recorded[t - 1]):
            return "until_hold"  # the cell held its last action here: the live policy was late
        return "mismatch"
    return "exact" if len(replayed) == len(recorded) else "mismatch"


def policy_replay(state: Path, episodes: list[EpisodeRecord]) -> dict:
    workspace = Workspace(state / "workspace")
    outcome: Counter[str] = Counter()
    mismatched: list[str] = []
    files_of: dict[str, dict[str, bytes]] = {}
    steps = 0
    # One sandbox, episodes grouped by policy: a new jail per code version, as a cell does.
    episodes = sorted(episodes, key=lambda e: (e.policy.commit, json.dumps(e.policy.params, sort_keys=True)))
    with tempfile.TemporaryDirectory() as scratch, PolicySandbox(REPLAY_LIMITS, Path(scratch)) as sb:
        for e in episodes:
            try:
                arrays = read_trajectory(state / e.trajectory_file)
            except EpisodeFileError:
                outcome["unreadable"] += 1
                continue
            observations, recorded = arrays["observations"], arrays["actions"]
            if e.policy.commit not in files_of:
                files_of[e.policy.commit] = workspace.read_bytes(e.policy.commit)
            try:
                try:
                    sb.load(files_of[e.policy.commit], e.policy.params)
                except PolicyError:  # a policy that hoards (e.g. forks at load) in a reused process: a fresh jail
                    sb.close()
                    sb.load(files_of[e.policy.commit], e.policy.params)
            except PolicyError:
                outcome["exact" if len(recorded) == 0 else "mismatch"] += 1  # it cannot act: nothing recorded
                if len(recorded):
                    mismatched.append(e.episode_id)
                continue
            verdict = "mismatch"
            for fresh in (False, True):  # in the reused process, then (a policy that hoards, e.g. forks) a fresh jail
                if fresh:
                    sb.close()
                    try:
                        sb.load(files_of[e.policy.commit], e.policy.params)
                    except PolicyError:
                        break
                for extra in range(4):  # as recorded, then after 1-3 resubmissions of the first observation
                    verdict = _compare(_actions(sb, observations, len(recorded), extra), recorded)
                    steps += len(recorded)
                    if verdict != "mismatch":
                        break
                if verdict != "mismatch":
                    break
            outcome[verdict if extra == 0 or verdict == "mismatch" else "after_resubmission"] += 1
            if verdict == "mismatch":
                mismatched.append(e.episode_id)
    return {"episodes": len(episodes), "steps_replayed": steps, **dict(outcome), "mismatched_ids": mismatched[:20],
            "mismatches": len(mismatched)}


def env_replay(state: Path, episodes: list[EpisodeRecord], config: cfg.Config, sample: int, rng: random.Random) -> dict:
    chosen = rng.sample(episodes, min(sample, len(episodes)))
    drivers: dict[str, object] = {}
    same_obs = same_score = judged = 0
    bad: list[str] = []
    for e in chosen:
        task = config.task(e.task)
        driver = drivers.get(task.driver)
        if driver is None:
            driver = drivers[task.driver] = make_driver(task.driver, **task.driver_options)
            driver.connect()  # type: ignore[attr-defined]
        arrays = read_trajectory(state / e.trajectory_file)
        obs = [np.asarray(driver.reset(e.seed), dtype=np.float64)]  # type: ignore[attr-defined]
        for action in arrays["actions"]:
            obs.append(np.asarray(driver.act(action), dtype=np.float64))  # type: ignore[attr-defined]
            driver.outcome()  # type: ignore[attr-defined]
        ok_obs = np.array_equal(np.asarray(obs), arrays["observations"])
        same_obs += ok_obs
        ok_score = True
        if e.verdict.verifier != "cell":  # the verifier judged the end state
            judged += 1
            again = verify.verify(task.verifier_kind or verifier_name(task.driver), driver.trusted_state())  # type: ignore[attr-defined]
            ok_score = abs(again.score - e.verdict.score) < 1e-9
            same_score += ok_score
        if not (ok_obs and ok_score):
            bad.append(e.episode_id)
    for driver in drivers.values():
        driver.disconnect()  # type: ignore[attr-defined]
    return {"episodes": len(chosen), "same_observations": same_obs, "judged": judged, "same_score": same_score,
            "differing_ids": bad[:20]}


def audit(state: Path, config: cfg.Config, env_sample: int = 200, seed: int = 0) -> dict:
    board = Blackboard(state / "blackboard.lmdb", readonly=True)
    try:
        records = board.values("episodes", EpisodeRecord)
    finally:
        board.close()
    replayable = [e for e in records if e.trajectory_file and e.attempts <= 1 and not e.flagged]
    t0 = time.time()
    policy = policy_replay(state, replayable)
    t1 = time.time()
    env = env_replay(state, replayable, config, env_sample, random.Random(seed))
    return {
        "recorded": len(records), "replayable": len(replayable), "policy_replay": policy,
        "policy_replay_s": round(t1 - t0, 1), "env_replay": env, "env_replay_s": round(time.time() - t1, 1),
        "ok": policy["mismatches"] == 0 and not env["differing_ids"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--config", type=Path)
    p.add_argument("--env-sample", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = audit(args.state_dir, cfg.load(args.config), args.env_sample, args.seed)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
