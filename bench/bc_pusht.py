"""Behaviour cloning on recorded Push-T successes, evaluated on held-out seeds.

    python bench/bc_pusht.py [--episodes N] [--eval N] [--data-dir D] [--recipe bc|rl] [--quick]

1. Records N episodes of the scripted controller (`enpire.agents.pusht_policy`) on training seeds
   0..N-1 into a state-dir-like layout (episodes/*.npz + the blackboard index), exactly as the fleet
   records its own episodes (reused when --data-dir already holds them).
2. Loads only the successful ones through `enpire.learning.dataset.load_dataset`.
3. Trains BC (`enpire.learning.bc`) for a fixed number of epochs (cosine schedule, early stopping, a
   wall-clock cap) on one torch thread; optionally the RL regime on top.
4. Exports the weights to numpy, writes weights.npz, loads it back the way the policy file does, and runs
   `mlp_policy.Policy` through the policy protocol on held-out seeds 100000.. (coverage > 0.95 within
   300 steps = success).
Prints one JSON object: success rate with its Wilson 95% interval, dataset size, training time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from enpire.agents.pusht_policy import INITIAL_PARAMS  # noqa: E402
from enpire.agents.pusht_policy import Policy as Scripted  # noqa: E402
from enpire.learning import bc, mlp_policy  # noqa: E402
from enpire.learning.dataset import (  # noqa: E402
    BOARD_NAME,
    load_dataset,
    make_pusht_env,
    record_scripted,
    rollout_pusht,
)
from enpire.metrics import wilson_interval  # noqa: E402

HELDOUT_SEED0 = 100000


def evaluate(weights: dict[str, np.ndarray], n: int, seed0: int = HELDOUT_SEED0) -> dict:
    env = make_pusht_env()
    policy = mlp_policy.Policy({}, weights=weights)
    wins, covs, lengths = 0, [], []
    t0 = time.monotonic()
    for seed in range(seed0, seed0 + n):
        arrays, success, coverage = rollout_pusht(env, policy, seed, horizon=300)
        wins += int(success)
        covs.append(coverage)
        lengths.append(len(arrays["actions"]))
    env.close()
    lo, hi = wilson_interval(wins, n)
    return {"successes": wins, "n": n, "success_rate": wins / n, "wilson95": [round(lo, 3), round(hi, 3)],
            "mean_final_coverage": float(np.mean(covs)), "mean_steps": float(np.mean(lengths)),
            "eval_s": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=1000, help="recorded episodes (training seeds 0..N-1)")
    ap.add_argument("--eval", type=int, default=200, help="held-out seeds 100000..")
    ap.add_argument("--data-dir", default="", help="state-dir-like folder to record into / reuse")
    ap.add_argument("--recipe", choices=("bc", "rl"), default="bc")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--time-budget-s", type=float, default=600.0, help="wall-clock cap (the epoch count is the real budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="60 episodes, 20 held-out seeds, 30 s training")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.eval, args.time_budget_s = 60, 20, 30.0
    torch.set_num_threads(1)

    tmp = None
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        tmp = tempfile.TemporaryDirectory()
        data_dir = Path(tmp.name)
    t0 = time.monotonic()
    have = len(list((data_dir / "episodes").glob("*.npz"))) if (data_dir / BOARD_NAME).exists() else 0
    if have < args.episodes:
        record_scripted(data_dir, lambda: Scripted(INITIAL_PARAMS), range(have, args.episodes))
    record_s = time.monotonic() - t0
    ds = load_dataset(data_dir, task="pusht", success_only=True, max_episodes=args.episodes)

    cfg = bc.BCConfig(hidden=args.hidden, layers=args.layers, max_epochs=args.max_epochs, patience=args.patience,
                      seed=args.seed, time_budget_s=args.time_budget_s)
    t1 = time.monotonic()
    model, metrics = bc.train_bc(ds, cfg)
    weights = bc.export_numpy(model)
    if args.recipe == "rl":
        from enpire.learning import rl

        rl_cfg = rl.RLConfig(seed=args.seed, time_budget_s=args.time_budget_s)
        actor, rl_metrics = rl.train_td3bc(ds, rl_cfg, init=model)
        weights = bc.export_numpy(actor)
        metrics.update({f"rl_{k}": v for k, v in rl_metrics.items()})
    train_s = time.monotonic() - t1

    with tempfile.TemporaryDirectory() as out:  # through the file, as the sandbox would load it
        path = Path(out) / mlp_policy.WEIGHTS_FILE
        np.savez(path, **weights)
        loaded = mlp_policy.load_weights(str(path))
    result = evaluate(loaded, args.eval)
    print(json.dumps({
        "recipe": args.recipe,
        "heldout": {"seeds": f"{HELDOUT_SEED0}..{HELDOUT_SEED0 + args.eval - 1}", **result},
        "dataset": {"episodes_recorded": args.episodes, "episodes_used": ds.n_episodes, "transitions": len(ds),
                    "skipped": len(ds.skipped)},
        "model": {"hidden": args.hidden, "layers": args.layers, "features": mlp_policy.N_FEATURES},
        "train_s": round(train_s, 1), "record_s": round(record_s, 1),
        "train_metrics": {k: round(float(v), 5) for k, v in metrics.items()},
        "torch_threads": torch.get_num_threads(),
    }, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
