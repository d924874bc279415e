"""Rollout benchmark: the full cell path against a raw gym-pusht loop, in the same run.

    python bench/rollout.py [--episodes N] [--quick]

Full path = a real fleet core (scheduler, verifier, bus) and 1 or 2 cell processes, each running the
policy in its sandbox process, checking every action, asking the verifier, recording trajectories.
Raw = the same policy object called in-process on a bare gym-pusht env, no checks, no recording (for 2
cells: two such processes side by side). Same seeds, same parameters. Prints JSON with episodes/s,
steps/s and the ratio full/raw, for the fleet's default CPU placement (`[cells] cpu_pinning = "auto"`)
and, as an ablation, the other placement at each size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import trio  # noqa: E402

from bus.blackboard import Blackboard  # noqa: E402
from bus.messages import EvalRequest, EvalResult, PolicySpec  # noqa: E402
from bus.records import EpisodeRecord  # noqa: E402
from enpire import config as cfg  # noqa: E402
from enpire.agents import pusht_policy  # noqa: E402
from enpire.fleet import open_state_dir, start_core  # noqa: E402

HORIZON = 300


def raw_loop(seeds: list[int], params: dict[str, float]) -> tuple[int, int, float]:
    """(episodes, steps, seconds) of the policy on a bare env, in this process."""
    import gym_pusht  # noqa: F401
    import gymnasium as gym

    env = gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped
    policy = pusht_policy.Policy(params)
    steps = 0
    t = time.perf_counter()
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        policy.reset()
        for _ in range(HORIZON):
            obs, _, terminated, _, _ = env.step(np.asarray(policy.act(obs), dtype=np.float64))
            steps += 1
            if terminated:
                break
    return len(seeds), steps, time.perf_counter() - t


def _raw_worker(seeds, params, out):
    out.put(raw_loop(seeds, params))


def raw(seeds: list[int], params: dict[str, float], procs: int) -> dict:
    if procs == 1:
        n, steps, secs = raw_loop(seeds, params)
    else:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        parts = [seeds[i::procs] for i in range(procs)]
        workers = [ctx.Process(target=_raw_worker, args=(p, params, out)) for p in parts]
        t = time.perf_counter()
        for w in workers:
            w.start()
        results = [out.get(timeout=600) for _ in workers]
        secs = time.perf_counter() - t
        for w in workers:
            w.join()
        n, steps = sum(r[0] for r in results), sum(r[1] for r in results)
    return {"episodes": n, "steps": steps, "seconds": round(secs, 3), "episodes_per_s": round(n / secs, 2),
            "steps_per_s": round(steps / secs, 1)}


def full_path(seeds: list[int], params: dict[str, float], cells: int, pinning: str = "auto") -> dict:
    base = cfg.Config()
    config = cfg.with_overrides(base, **{"cells.count": cells, "cells.cpu_pinning": pinning, "agents.count": 0,
                                         "scheduler.background": False})

    async def main(state_dir: Path):
        board, meta = open_state_dir(state_dir)
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, state_dir, board, meta)
            commit = core.workspace.commit("agent/bench", {"policy.py": Path(pusht_policy.__file__).read_text()},
                                           "bench policy")
            scheduler = core.system.actors["scheduler"]
            with trio.fail_after(120):  # wait until every cell process has joined (imports take seconds)
                while len(getattr(scheduler.current, "cells", {})) < cells:
                    await trio.sleep(0.1)
            # warm-up: each cell starts its sandbox once
            await core.scheduler.ask(EvalRequest(job_id="warm", agent="bench", task="pusht",
                                                 policy=PolicySpec(commit, params), seeds=list(range(cells))))
            t = time.perf_counter()
            result = await core.scheduler.ask(
                EvalRequest(job_id=uuid.uuid4().hex, agent="bench", task="pusht", policy=PolicySpec(commit, params),
                            seeds=seeds), timeout=1800)
            secs = time.perf_counter() - t
            assert isinstance(result, EvalResult), result
            core.stopping.set()
            nursery.cancel_scope.cancel()
        board.close()
        steps = sum(e.steps for e in result.episodes)
        n = len(result.episodes)
        rec = Blackboard(state_dir / "blackboard.lmdb", readonly=True)
        files = [state_dir / e.trajectory_file for e in rec.values("episodes", EpisodeRecord) if e.trajectory_file]
        rec.close()
        disk = sum(f.stat().st_size for f in files)
        return {"episodes": n, "steps": steps, "seconds": round(secs, 3), "episodes_per_s": round(n / secs, 2),
                "steps_per_s": round(steps / secs, 1), "success": sum(e.success for e in result.episodes) / n,
                "recorded_bytes_per_episode": round(disk / max(1, len(files))), "cpu_pinning": pinning}

    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(main, Path(tmp) / "state")


def main(argv: list[str] | None = None) -> None:
    from enpire import log

    log.configure(None, "bench")  # JSON on stdout is the result: keep the fleet's log lines out of it
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="40 episodes")
    args = p.parse_args(argv)
    n = 40 if args.quick else args.episodes
    seeds = list(range(50_000, 50_000 + n))
    params = dict(pusht_policy.INITIAL_PARAMS)
    out = {"episodes": n, "policy": "enpire.agents.pusht_policy (INITIAL_PARAMS)"}
    for cells in (1, 2):
        out[f"raw_{cells}"] = raw(seeds, params, cells)
        out[f"full_{cells}"] = full_path(seeds, params, cells)
        out[f"ratio_steps_{cells}"] = round(out[f"full_{cells}"]["steps_per_s"] / out[f"raw_{cells}"]["steps_per_s"], 3)
    # Ablation: the other CPU placement than "auto" chose for each size ("auto" = off for 1 cell on a
    # multi-core machine, on for as many cells as CPUs).
    for cells, pinning in ((1, "on"), (2, "off")):
        full = full_path(seeds, params, cells, pinning)
        out[f"full_{cells}_pinning_{pinning}"] = full
        out[f"ratio_steps_{cells}_pinning_{pinning}"] = round(full["steps_per_s"] / out[f"raw_{cells}"]["steps_per_s"], 3)
    out["ratio_full_2_over_raw_1"] = round(out["full_2"]["steps_per_s"] / out["raw_1"]["steps_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
