"""Evaluate or tune a built-in policy template directly on its simulator (no fleet, no sandbox).

    python -m enpire.agents.policy_eval --task pusht --params '{"ang_len": 80}' --seeds 1000000:1000200
    python -m enpire.agents.policy_eval --task drawer-open-v3 --cem --episodes-budget 2000 --eval-after
    python -m enpire.agents.policy_eval --task peg-insert-side-v3 --params @tuned.json --seeds 0:50
    python -m enpire.agents.policy_eval --task pusht --observation pixels --seeds 1000000:1000200

One loop for every task, judged the way the fleet judges: the driver (`hw.make_driver`) resets the
scene with the seed, the template's `Policy` acts, `enpire.safety.check_action` checks every action as a
cell does (a violation ends the episode as a failure), and `enpire.verify` gives the verdict on the final
trusted state. An episode ends at the task's own termination (success) or at the driver's horizon.
The cross-entropy search scores a candidate like the built-in researcher: success first, then the
verdict's progress score, optionally minus a speed term; tuning seeds are 0..8999, checks use 9000...
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time

import numpy as np

from enpire import command
from enpire.agents.builtin import PIXEL_TEMPLATES, TEMPLATES
from enpire.config import ActionLimitsConfig
from enpire.safety import ActionLimits, check_action
from enpire.verify import verify
from hw import VERIFIER_KIND, make_driver


def run_episode(driver, policy, seed: int, limits: ActionLimits) -> dict:
    obs = driver.reset(int(seed))
    policy.reset()
    previous, violation, steps = None, None, 0
    for steps in range(1, driver.horizon + 1):  # noqa: B007 (the count is used after the loop)
        try:
            action = policy.act(obs.copy())
        except Exception as exc:  # noqa: BLE001 - a crashing policy is a failed episode
            violation = f"policy_error: {type(exc).__name__}: {exc}"
            break
        violation = check_action(action, previous, limits)
        if violation:
            break
        previous = np.asarray(action, dtype=np.float64)
        result = driver.step(previous)
        obs = result.observation
        if result.done:
            break
    verdict = verify(VERIFIER_KIND[driver.task], driver.trusted_state())
    return {"seed": int(seed), "success": verdict.success and violation is None, "score": verdict.score,
            "steps": steps, "violation": violation}


def evaluate(driver, template, params: dict, seeds, limits: ActionLimits) -> dict:
    policy = template.Policy(params)
    t0 = time.perf_counter()
    res = [run_episode(driver, policy, int(s), limits) for s in seeds]
    dt = time.perf_counter() - t0
    succ = [r for r in res if r["success"]]
    total_steps = sum(r["steps"] for r in res)
    return {
        "task": driver.task,
        "episodes": len(res),
        "success_rate": len(succ) / max(len(res), 1),
        "mean_score": float(np.mean([r["score"] for r in res])) if res else 0.0,
        "mean_steps": total_steps / max(len(res), 1),
        "mean_steps_success": (sum(r["steps"] for r in succ) / len(succ)) if succ else None,
        "violations": sum(1 for r in res if r["violation"]),
        "first_violation": next((r["violation"] for r in res if r["violation"]), None),
        "steps_per_s": total_steps / dt if dt > 0 else 0.0,
        "wall_s": round(dt, 2),
        "failed_seeds": [r["seed"] for r in res if not r["success"]][:50],
    }


# --------------------------------------------------------------------------------------------
# Cross-entropy method in the normalised box [0, 1]^d.
# --------------------------------------------------------------------------------------------

def cem(driver, template, limits: ActionLimits, *, budget: int, pop: int, elites: int, seeds_per: int,
        rng_seed: int, init: dict, sigma0: float, check_every: int, check_seeds: int, step_weight: float = 0.0,
        target: float = 0.95, stop_at_target: bool = False, log=print) -> dict:
    """Score of a candidate = mean(success + score - step_weight * steps / horizon) over common seeds."""
    space = template.PARAM_SPACE
    names = list(space)
    lo = np.array([space[n][0] for n in names])
    hi = np.array([space[n][1] for n in names])
    rng = np.random.default_rng(rng_seed)
    mu = np.clip((np.array([init.get(n, template.INITIAL_PARAMS[n]) for n in names]) - lo) / (hi - lo), 0, 1)
    sigma = np.full(len(names), sigma0)

    def to_params(z):
        return {n: float(v) for n, v in zip(names, lo + np.clip(z, 0, 1) * (hi - lo), strict=True)}

    check = list(range(9000, 9000 + check_seeds))  # fixed tuning seeds for progress checks
    used, gen, reached = 0, 0, None
    best_z, best_check = mu.copy(), -1.0
    if check_every:
        r = evaluate(driver, template, to_params(mu), check, limits)
        best_check = r["success_rate"]
        log(json.dumps({"gen": 0, "episodes": 0, "check_success_of_mean": r["success_rate"],
                        "check_steps": round(r["mean_steps"], 1)}))
        if r["success_rate"] >= target:
            reached = 0
    while used + pop * seeds_per <= budget and not (stop_at_target and reached is not None):
        gen += 1
        seeds = rng.integers(0, 9000, size=seeds_per)  # common seeds for the generation
        zs = [mu] + [np.clip(mu + sigma * rng.standard_normal(len(names)), 0, 1) for _ in range(pop - 1)]
        scores = []
        for z in zs:
            policy = template.Policy(to_params(z))
            rs = [run_episode(driver, policy, int(s), limits) for s in seeds]
            scores.append(float(np.mean([r["success"] + r["score"] - step_weight * r["steps"] / driver.horizon
                                         for r in rs])))
        used += pop * seeds_per
        order = np.argsort(scores)[::-1]
        elite = np.array([zs[i] for i in order[:elites]])
        mu = 0.7 * elite.mean(axis=0) + 0.3 * mu
        sigma = np.maximum(0.7 * elite.std(axis=0) + 0.3 * sigma, 0.02)
        line = {"gen": gen, "episodes": used, "best": round(scores[order[0]], 3),
                "elite_mean": round(float(np.mean([scores[i] for i in order[:elites]])), 3),
                "sigma": round(float(sigma.mean()), 3)}
        if check_every and gen % check_every == 0:
            r = evaluate(driver, template, to_params(mu), check, limits)
            line["check_success_of_mean"] = r["success_rate"]
            line["check_steps"] = round(r["mean_steps"], 1)
            if r["success_rate"] >= best_check:
                best_check, best_z = r["success_rate"], mu.copy()
            if reached is None and r["success_rate"] >= target:
                reached = used
        log(json.dumps(line))
        sys.stdout.flush()
    return {"params": to_params(mu), "best_checked_params": to_params(best_z), "best_check_success": best_check,
            "episodes_used": used, "generations": gen, "episodes_to_target_on_check": reached}


def parse_seeds(spec: str) -> range:
    """A:B, a half-open range of at least one seed."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not A:B (a half-open range of seeds)") from None
    if b <= a:
        raise argparse.ArgumentTypeError(f"{spec!r} holds no seed (A:B is half-open: B must exceed A)")
    if a < 0 or b > 2**32:
        raise argparse.ArgumentTypeError(f"{spec!r}: seeds are 0 to 2**32 - 1 (simulators take no others)")
    return range(a, b)


def main(argv=None) -> int:
    ap = command.Parser(prog="python -m enpire.agents.policy_eval", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="pusht", choices=sorted(TEMPLATES))
    ap.add_argument("--observation", default="state", choices=("state", "pixels"),
                    help="what the policy sees; pixels: a 96x96 frame and the pusher position (Push-T)")
    ap.add_argument("--params", default="{}", help="JSON dict of parameters (or @file.json)")
    ap.add_argument("--seeds", default=parse_seeds("1000000:1000100"), type=parse_seeds,
                    help="A:B half-open seed range (default: held-out)")
    ap.add_argument("--max-delta", type=float, default=ActionLimitsConfig().max_delta,
                    help="largest change of any action component between steps (the fleet's default)")
    ap.add_argument("--cem", action="store_true", help="run the cross-entropy search (tuning seeds 0..8999)")
    ap.add_argument("--episodes-budget", type=int, default=2000)
    ap.add_argument("--pop", type=int, default=12)
    ap.add_argument("--elites", type=int, default=3)
    ap.add_argument("--seeds-per", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.15)
    ap.add_argument("--rng", type=int, default=0)
    ap.add_argument("--check-every", type=int, default=5, help="evaluate the mean every N generations (0: never)")
    ap.add_argument("--check-seeds", type=int, default=30, help="check on tuning seeds 9000..9000+N")
    ap.add_argument("--target", type=float, default=0.95, help="check success rate reported as 'reached'")
    ap.add_argument("--stop-at-target", action="store_true", help="stop once a check reaches --target")
    ap.add_argument("--step-weight", type=float, default=0.0,
                    help="optional speed term: score -= step_weight * steps / horizon")
    ap.add_argument("--eval-after", action="store_true", help="after CEM, evaluate the result on --seeds")
    args = ap.parse_args(argv)

    text = args.params
    try:
        if text.startswith("@"):
            with open(text[1:]) as fh:
                text = fh.read()
        params = json.loads(text)
        if not isinstance(params, dict):
            raise ValueError("not a JSON object")
        if bad := [k for k, v in params.items() if isinstance(v, bool) or not isinstance(v, int | float)
                   or not math.isfinite(v)]:
            raise ValueError(f"not a finite number: {', '.join(bad)}")
    except (OSError, ValueError) as e:
        ap.error(f"--params {args.params!r}: {e}")
    if args.observation == "pixels":
        if args.task not in PIXEL_TEMPLATES:
            ap.error(f"--observation pixels: no pixels template for task {args.task!r}")
        template = importlib.import_module(PIXEL_TEMPLATES[args.task])
    else:
        template = importlib.import_module(TEMPLATES[args.task])
    try:
        template.Policy(params)  # refuses unknown parameter names before any episode runs
    except ValueError as e:
        ap.error(f"--params: {e}")
    driver = make_driver(args.task, obs_type="pixels") if args.observation == "pixels" else make_driver(args.task)
    driver.connect()
    limits = ActionLimits(dim=len(driver.action_low), low=list(driver.action_low), high=list(driver.action_high),
                          max_delta=args.max_delta)
    try:
        if args.cem:
            t0 = time.perf_counter()
            out = cem(driver, template, limits, budget=args.episodes_budget, pop=args.pop, elites=args.elites,
                      seeds_per=args.seeds_per, rng_seed=args.rng, init=params, sigma0=args.sigma,
                      check_every=args.check_every, check_seeds=args.check_seeds, step_weight=args.step_weight,
                      target=args.target, stop_at_target=args.stop_at_target)
            out["cem_wall_s"] = round(time.perf_counter() - t0, 1)
            if args.eval_after:
                out["eval"] = evaluate(driver, template, out["params"], args.seeds, limits)
            print(json.dumps(out))
        else:
            print(json.dumps(evaluate(driver, template, params, args.seeds, limits)))
    finally:
        driver.disconnect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
