"""Reference ceiling: Meta-World's shipped scripted experts on our driver's seeded starts.

    python bench/metaworld_experts.py --seeds 50

A reference only: the agents never start from these policies. Prints JSON success rates (Wilson 95 %
interval) per task, judged by enpire.verify on the driver's trusted state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enpire.verify import verify
from hw.metaworld import TASKS, MetaWorldDriver


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_task(task: str, seeds: range) -> dict:
    from metaworld.policies import ENV_POLICY_MAP

    driver = MetaWorldDriver(task)
    policy = ENV_POLICY_MAP[task]()
    wins, steps, t0 = 0, [], time.perf_counter()
    for seed in seeds:
        obs, used = driver.reset(seed), 0
        while used < driver.horizon:
            result = driver.step(policy.get_action(obs))
            used += 1
            if result.done:
                break
            obs = result.observation
        verdict = verify("metaworld", driver.trusted_state())
        wins += verdict.success
        steps.append(used)
    driver.disconnect()
    n = len(seeds)
    lo, hi = wilson(wins, n)
    return {"success_rate": wins / n, "successes": wins, "episodes": n, "wilson95": [round(lo, 3), round(hi, 3)],
            "mean_steps": sum(steps) / n, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(json.dumps({task: run_task(task, seeds) for task in args.tasks}, indent=2))


if __name__ == "__main__":
    main()
