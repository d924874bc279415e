"""Run the policy of a CLI agent's worktree on the simulator, on tuning seeds only.

    python -m enpire.agents.local_check                    # policy.py of the current folder, 10 episodes
    python -m enpire.agents.local_check --episodes 20 --params '{"gain": 2.0}' --seeds 100:120

The same loop the fleet's offline evaluation uses (`policy_eval.run_episode`: the task's driver resets the
scene with the seed, every action is checked as a cell checks it, the verifier judges the final trusted
state). The task and its tuning seed range come from the file `$ENPIRE_TASK_FILE` names (in a CLI agent's
jail: the daemon's copy in its read-only run folder, which the agent cannot edit), else from the worktree's
`.enpire/task.json`; seeds outside that range are refused: held-out results come only from the fleet.
The refusal keeps an agent from tuning on held-out seeds by mistake; what keeps the judged seeds unknown
is their secret order (`enpire.heldout`), not this check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
from pathlib import Path


def load_task(folder: Path) -> dict:
    path = Path(os.environ.get("ENPIRE_TASK_FILE") or folder / ".enpire" / "task.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"local_check: {path}: {e} (the daemon writes it into every agent worktree)") from None


def load_policy(path: Path):
    if not path.is_file():
        raise SystemExit(f"local_check: {path} not found")
    sys.path.insert(0, str(path.parent.resolve()))  # a policy may import its own helper modules
    spec = importlib.util.spec_from_file_location("policy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Policy"):
        raise SystemExit(f"local_check: {path} defines no class Policy")
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m enpire.agents.local_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", nargs="?", default="policy.py")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--params", default="{}", help="JSON object passed to Policy(params)")
    ap.add_argument("--seeds", default="", help="A:B half-open range inside the tuning seeds (default: random ones)")
    ap.add_argument("--rng", type=int, default=0)
    args = ap.parse_args(argv)
    policy_path = Path(args.policy)
    task = load_task(policy_path.resolve().parent)
    tuning = range(task["tuning_start"], task["tuning_start"] + task["tuning_count"])
    if args.seeds:
        a, _, b = args.seeds.partition(":")
        seeds = range(int(a), int(b or int(a) + 1))
        if not seeds or seeds.start < tuning.start or seeds.stop > tuning.stop:
            print(f"local_check: seeds {args.seeds} refused: only tuning seeds {tuning.start}:{tuning.stop} run "
                  "here; held-out results come from the fleet", file=sys.stderr)
            return 2
    else:
        seeds = random.Random(args.rng).sample(tuning, min(max(1, args.episodes), len(tuning)))
    try:
        params = json.loads(args.params)
    except ValueError as e:
        raise SystemExit(f"local_check: --params is not JSON: {e}") from None

    from enpire.agents.policy_eval import run_episode
    from enpire.safety import ActionLimits
    from hw import make_driver

    module = load_policy(policy_path)
    driver = make_driver(task["driver"])
    driver.connect()
    limits = ActionLimits(dim=len(driver.action_low), low=list(driver.action_low), high=list(driver.action_high),
                          max_delta=task["max_delta"])
    policy = module.Policy(params)
    results = [run_episode(driver, policy, int(s), limits) for s in seeds]
    wins = sum(r["success"] for r in results)
    print(json.dumps({"task": task["name"], "episodes": len(results), "successes": wins,
                      "success_rate": wins / len(results),
                      "mean_score": round(sum(r["score"] for r in results) / len(results), 4),
                      "violations": [r["violation"] for r in results if r["violation"]][:5],
                      "failed_seeds": [r["seed"] for r in results if not r["success"]][:20]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
