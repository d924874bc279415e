"""Push-T from pixels, the built-in agent's two regimes measured on held-out seeds; prints JSON.

    python bench/pixels_pusht.py --record-minutes 15 --train-minutes 55 --max-episodes 230   # the whole measurement
    python bench/pixels_pusht.py --state-dir runs/px --train-minutes 20 --n-b 200   # reuse a fleet run

1. Recording: the fleet itself (`python -m enpire.fleet`, 2 cells, 1 built-in agent, Push-T with
   `observation = "pixels"`, learning off) runs for --record-minutes: the agent tunes the perception
   template (`enpire/agents/pusht_pixels_policy.py`) and the cells record every episode with its frames.
   With --state-dir the recordings of an earlier such run are used instead.
2. Regime (a), perception inside the policy: the template with the fleet champion's parameters (or its
   initial parameters when the run has no champion), --n-a episodes on held-out seeds.
3. Regime (b), a visuomotor policy: the "visuomotor" recipe (`enpire.learning.recipes`, the trainer's
   entry point) trains the CNN on the run's recorded successes (agents' tuning-seed episodes only,
   relabelled by the champion's perception template with its memory cleared each step, then DAgger
   rounds on tuning seeds 50,000..) for --train-minutes with --threads torch threads and as many
   relabelling/rollout processes; then the numpy policy file the cells would run, --n-b episodes on
   held-out seeds. The training's wall time and the CPU time of all its processes are reported.

Held-out seeds here start at 2,000,000: never a tuning seed (0..99,999) and never one the fleet judged
(its held-out range is 1,000,000..1,099,999). Episodes run in-process on the cell's driver with the
cell's action checks and the trusted verifier (`enpire.agents.policy_eval.run_episode`), in --workers processes. Success rates
come with Wilson 95% intervals; the machine's load average is reported with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HELDOUT = 2_000_000
FLEET_TOML = """
[fleet]
budget_minutes = {minutes}
stop_at_target = false
[cells]
count = 2
task = "pusht"
[agents]
learn = false
[scheduler]
background = false
[sandbox]
act_timeout_s = 0.5  # perception takes a few ms, but a loaded machine stretches that
[tasks.pusht]
observation = "pixels"
"""


def _episodes(kind: str, payload, seeds: list[int]) -> list[dict]:
    """Run one worker's share of episodes (a separate process: the simulator is CPU-bound)."""
    from enpire.agents.policy_eval import run_episode
    from enpire.safety import ActionLimits
    from hw import make_driver

    driver = make_driver("pusht", obs_type="pixels")
    limits = ActionLimits(dim=2, low=list(driver.action_low), high=list(driver.action_high), max_delta=100.0)
    if kind == "perception":
        from enpire.agents import pusht_pixels_policy

        policy = pusht_pixels_policy.Policy(payload)
    else:
        from enpire.learning import visuomotor_policy

        policy = visuomotor_policy.Policy({}, weights=visuomotor_policy.load_weights(payload))
    out = []
    for seed in seeds:
        r = run_episode(driver, policy, seed, limits)
        out.append({"seed": r["seed"], "success": bool(r["success"]), "steps": r["steps"],
                    "violation": r["violation"]})
    driver.disconnect()
    return out


def evaluate(kind: str, payload, n: int, start: int, workers: int) -> dict:
    from enpire.metrics import wilson_interval

    seeds = list(range(start, start + n))
    t0 = time.monotonic()
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_episodes, [kind] * workers, [payload] * workers,
                              [seeds[i::workers] for i in range(workers)]))
    results = sorted((r for part in parts for r in part), key=lambda r: r["seed"])
    wins = sum(r["success"] for r in results)
    lo, hi = wilson_interval(wins, len(results))
    return {"successes": wins, "n": len(results), "rate": round(wins / max(1, len(results)), 4),
            "wilson95": [round(lo, 4), round(hi, 4)], "seeds": f"{start}..{start + n - 1}",
            "violations": sum(1 for r in results if r["violation"]),
            "mean_steps": round(sum(r["steps"] for r in results) / max(1, len(results)), 1),
            "wall_s": round(time.monotonic() - t0, 1)}


def record(state_dir: Path, minutes: float) -> dict:
    cfg = Path(tempfile.mkdtemp()) / "pixels.toml"
    cfg.write_text(FLEET_TOML.format(minutes=minutes))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "enpire.fleet", "--config", str(cfg), "--state-dir", str(state_dir),
                        "--quiet"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode not in (0, 3):
        raise SystemExit(f"recording fleet failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return {"minutes": minutes, "wall_s": round(time.monotonic() - t0, 1)}


def store_summary(state_dir: Path) -> dict:
    from bus.blackboard import Blackboard
    from bus.records import Champion, EpisodeRecord
    from enpire.learning.dataset import trainable

    board = Blackboard(state_dir / "blackboard.lmdb", readonly=True)
    try:
        episodes = board.values("episodes", EpisodeRecord)
        champion = board.get("champion", "pusht", Champion)
    finally:
        board.close()
    train = [e for e in episodes if trainable(e, "pusht")]
    agent = [e for e in episodes if e.kind == "agent"]
    return {"agent_episodes": len(agent), "agent_successes": len(train),
            "trainable_transitions": sum(e.steps for e in train),
            "champion": None if champion is None else {"params": champion.policy.params,
                                                       "judged": f"{champion.judged_successes}/{champion.judged_n}"}}


def train(state_dir: Path, out: Path, minutes: float, threads: int, max_episodes: int | None,
          options: list[str]) -> dict:
    cmd = [sys.executable, "-m", "enpire.learning.recipes", "--recipe", "visuomotor", "--task", "pusht",
           "--state-dir", str(state_dir), "--out", str(out), "--time-budget-s", str(minutes * 60),
           "--max-rss-mb", "12000", "--option", f"threads={threads}", "--option", f"workers={threads}",
           "--device", "auto"]
    if max_episodes:
        cmd += ["--option", f"max_episodes={max_episodes}"]
    for option in options:
        cmd += ["--option", option]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training failed: {r.stderr.strip()[-1000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["command_wall_s"] = round(time.monotonic() - t0, 1)
    # the recipe and its relabelling/rollout workers, all processes together
    metrics["process_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    return metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path, help="a fleet run with pixel recordings (default: record one)")
    ap.add_argument("--record-minutes", type=float, default=30.0)
    ap.add_argument("--train-minutes", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training (the 2 CPU cores)")
    ap.add_argument("--max-episodes", type=int, default=0, help="train on at most this many successes (0: all)")
    ap.add_argument("--n-a", type=int, default=200, help="held-out episodes for regime (a)")
    ap.add_argument("--n-b", type=int, default=500, help="held-out episodes for regime (b)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--weights", type=Path, help="evaluate these visuomotor weights instead of training")
    ap.add_argument("--option", action="append", default=[], help="recipe option key=value (repeatable)")
    args = ap.parse_args(argv)

    out: dict = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(), "heldout_start": HELDOUT}
    state_dir = args.state_dir
    if state_dir is None:
        state_dir = Path(tempfile.mkdtemp(prefix="pixels-bench-")) / "state"
        out["recording"] = record(state_dir, args.record_minutes)
    out["state_dir"] = str(state_dir)
    out["store"] = store_summary(state_dir)

    if not args.skip_a:
        from enpire.agents import pusht_pixels_policy

        champion = out["store"]["champion"]
        params = champion["params"] if champion else dict(pusht_pixels_policy.INITIAL_PARAMS)
        out["regime_a"] = {"policy": "perception template, " + ("fleet champion's parameters" if champion
                                                                 else "initial parameters"),
                           **evaluate("perception", params, args.n_a, HELDOUT, args.workers)}
        print(json.dumps(out), file=sys.stderr, flush=True)

    if not args.skip_b:
        if args.weights:
            weights, trained = args.weights, {"weights": str(args.weights)}
        else:
            ckpt = Path(tempfile.mkdtemp(prefix="visuomotor-"))
            trained = train(state_dir, ckpt, args.train_minutes, args.threads, args.max_episodes or None, args.option)
            weights = ckpt / "weights.npz"
            out["weights"] = str(weights)
            out["load_average_after_training"] = os.getloadavg()
        out["regime_b"] = {"policy": "visuomotor CNN (numpy policy file)", "training": trained,
                           **evaluate("visuomotor", str(weights), args.n_b, HELDOUT, args.workers)}
    out["load_average_at_end"] = os.getloadavg()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
