"""Rollout benchmark: the full cell path against a raw gym-pusht loop, in the same run.

    python bench/rollout.py [--episodes N] [--rounds R] [--quick] [--cells 1 [2]] [--no-ablation]

Full path = a real fleet core (scheduler, verifier, bus) and 1 or 2 cell processes, each running the
policy in its sandbox process, checking every action, asking the verifier, recording trajectories.
Raw = the same policy object called in-process on a bare gym-pusht env, no checks, no recording; one
worker process per cell, started (imports, env) before any timing, so only the loops are timed.

The machine is shared and noisy, so the two alternate: the seeds are split into R rounds, and each
round runs its seeds raw, then through the fleet. Each round gives a ratio of step throughputs
(full / raw); the JSON has every round's ratio, their median (the figure to quote) and the totals.
Done for 1 and 2 cells with the fleet's default CPU placement (`[cells] cpu_pinning = "auto"`) and,
as an ablation, the other placement at each size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
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
from bus.messages import EvalRequest, EvalResult, PolicySpec, QueueDepth  # noqa: E402
from bus.records import EpisodeRecord  # noqa: E402
from enpire import config as cfg  # noqa: E402
from enpire.agents import pusht_policy  # noqa: E402
from enpire.fleet import open_state_dir, start_core  # noqa: E402

HORIZON = 300


def _raw_worker(params: dict[str, float], inbox, outbox) -> None:
    """One raw 'cell': env and policy made once, then a timed loop per list of seeds it is sent."""
    import gym_pusht  # noqa: F401
    import gymnasium as gym

    env = gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped
    policy = pusht_policy.Policy(params)
    outbox.put("ready")
    while (seeds := inbox.get()) is not None:
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
        outbox.put((len(seeds), steps, time.perf_counter() - t))


class RawWorkers:
    """`procs` raw loops side by side, in their own processes like cells."""

    def __init__(self, procs: int, params: dict[str, float]):
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(procs)]
        self.workers = [ctx.Process(target=_raw_worker, args=(params, q, self.outbox), daemon=True)
                        for q in self.inboxes]
        for w in self.workers:
            w.start()
        for _ in self.workers:
            assert self.outbox.get(timeout=120) == "ready"

    def run(self, seeds: list[int]) -> tuple[int, int, float]:
        """(episodes, steps, seconds): all workers start together; the round lasts as long as the slowest."""
        for i, inbox in enumerate(self.inboxes):
            inbox.put(seeds[i :: len(self.inboxes)])
        results = [self.outbox.get(timeout=600) for _ in self.inboxes]
        return sum(r[0] for r in results), sum(r[1] for r in results), max(r[2] for r in results)

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for w in self.workers:
            w.join(timeout=10)


def _rates(episodes: int, steps: int, secs: float) -> dict:
    return {"episodes": episodes, "steps": steps, "seconds": round(secs, 3),
            "episodes_per_s": round(episodes / secs, 2), "steps_per_s": round(steps / secs, 1)}


def measure(seeds: list[int], params: dict[str, float], cells: int, pinning: str, rounds: int) -> dict:
    """Alternate raw and full rounds for one fleet size and CPU placement."""
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **{"cells.count": cells, "cells.cpu_pinning": pinning,
                                                 "agents.count": 0, "scheduler.background": False})
    chunks = [seeds[r::rounds] for r in range(rounds)]

    async def main(state_dir: Path, raw: RawWorkers) -> dict:
        board, meta = open_state_dir(state_dir)
        per_round, episodes = [], []
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, state_dir, board, meta)
            commit = core.workspace.commit("agent/bench", {"policy.py": Path(pusht_policy.__file__).read_text()},
                                           "bench policy")
            with trio.fail_after(120), core.events.subscribe(QueueDepth) as depths:  # every cell has joined
                depth = core.events.latest(QueueDepth)  # (their imports take seconds)
                while depth is None or depth.cells < cells:
                    depth = await depths.receive()

            async def full(job_seeds: list[int]) -> tuple[EvalResult, float]:
                t = time.perf_counter()
                result = await core.judge.ask(
                    EvalRequest(job_id=uuid.uuid4().hex, agent="bench", task="pusht",
                                policy=PolicySpec(commit, params), seeds=job_seeds), timeout=1800)
                assert isinstance(result, EvalResult), result
                return result, time.perf_counter() - t

            await full(list(range(cells)))  # warm-up: each cell starts its sandbox once
            for chunk in chunks:
                raw_n, raw_steps, raw_secs = await trio.to_thread.run_sync(raw.run, chunk)
                result, secs = await full(chunk)
                steps = sum(e.steps for e in result.episodes)
                episodes += result.episodes
                per_round.append({"raw_steps_per_s": round(raw_steps / raw_secs, 1),
                                  "full_steps_per_s": round(steps / secs, 1),
                                  "ratio": round((steps / secs) / (raw_steps / raw_secs), 3),
                                  "raw": (raw_n, raw_steps, raw_secs), "full": (len(result.episodes), steps, secs)})
            core.stopping.set()
            nursery.cancel_scope.cancel()
        board.close()
        rec = Blackboard(state_dir / "blackboard.lmdb", readonly=True)
        files = [state_dir / e.trajectory_file for e in rec.values("episodes", EpisodeRecord) if e.trajectory_file]
        rec.close()
        total = lambda key: [sum(r[key][i] for r in per_round) for i in range(3)]  # noqa: E731
        return {
            "cells": cells, "cpu_pinning": pinning if pinning != "auto" else
            f"auto ({'on' if cells >= len(os.sched_getaffinity(0)) else 'off'})",
            "ratio_median": round(statistics.median(r["ratio"] for r in per_round), 3),
            "ratios": [r["ratio"] for r in per_round],
            "raw": _rates(*total("raw")), "full": _rates(*total("full")),
            "success": sum(e.success for e in episodes) / len(episodes),
            "recorded_bytes_per_episode": round(sum(f.stat().st_size for f in files) / max(1, len(files))),
        }

    raw = RawWorkers(cells, params)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return trio.run(main, Path(tmp) / "state", raw)
    finally:
        raw.close()


def main(argv: list[str] | None = None) -> None:
    from enpire import log

    log.configure(None, "bench")  # JSON on stdout is the result: keep the fleet's log lines out of it
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=240)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="48 episodes in 4 rounds")
    p.add_argument("--cells", type=int, nargs="+", choices=(1, 2), default=[1, 2], help="fleet sizes to measure")
    p.add_argument("--no-ablation", action="store_true", help="only the fleet's default CPU placement")
    args = p.parse_args(argv)
    n, rounds = (48, 4) if args.quick else (args.episodes, args.rounds)
    seeds = list(range(50_000, 50_000 + n))
    params = dict(pusht_policy.INITIAL_PARAMS)
    out: dict = {"episodes": n, "rounds": rounds, "cpus": len(os.sched_getaffinity(0)),
                 "policy": "enpire.agents.pusht_policy (INITIAL_PARAMS)"}
    cpus = out["cpus"]
    for cells in args.cells:
        # the fleet's "auto" placement pins when cells >= CPUs; the other placement is the ablation
        other = "off" if cells >= cpus else "on"
        auto = measure(seeds, params, cells, "auto", rounds)
        out[f"cells_{cells}"] = auto
        out[f"ratio_steps_{cells}"] = auto["ratio_median"]
        if args.no_ablation:
            continue
        ablation = measure(seeds, params, cells, other, rounds)
        out[f"cells_{cells}_pinning_{other}"] = ablation
        out[f"ratio_steps_{cells}_pinning_{other}"] = ablation["ratio_median"]
    if {1, 2} <= set(args.cells):
        out["ratio_full_2_over_raw_1"] = round(out["cells_2"]["full"]["steps_per_s"] / out["cells_1"]["raw"]["steps_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
