"""Evaluate / tune a heuristic Meta-World policy template directly on `hw.metaworld.MetaWorldDriver`
(no fleet).

    python -m enpire.agents.metaworld_policy_eval --task drawer-open-v3 --seeds 1000000:1000100
    python -m enpire.agents.metaworld_policy_eval --task drawer-open-v3 --cem --episodes-budget 2000
    python -m enpire.agents.metaworld_policy_eval --task drawer-open-v3 --params @tuned.json --seeds 0:50

Action checks, as the fleet does them (a violation ends the episode as a failure): shape (4,), finite,
inside [-1, 1], and no component changing by more than --max-delta from the previous action (the
first action is free).  Success is the env's own info["success"]; an episode stops at success or at
the horizon (500 steps).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import numpy as np

from hw.metaworld import MetaWorldDriver

TEMPLATES = {
    "drawer-open-v3": "enpire.agents.metaworld_drawer_policy",
    "peg-insert-side-v3": "enpire.agents.metaworld_peg_policy",
}


def load_template(task: str):
    if task not in TEMPLATES:
        raise SystemExit(f"no policy template for {task!r}; known: {', '.join(TEMPLATES)}")
    return importlib.import_module(TEMPLATES[task])


def run_episode(driver: MetaWorldDriver, policy, seed: int, max_delta: float) -> dict:
    obs = driver.reset(int(seed))
    policy.reset()
    start_err = None
    prev = None
    success, violation, steps = False, None, 0
    err = float("nan")
    for steps in range(1, driver.horizon + 1):  # noqa: B007 (the count is used after the loop)
        try:
            raw = np.asarray(policy.act(obs.copy()))
        except Exception as exc:  # noqa: BLE001 - a crashing policy is a failed episode
            violation = f"policy error: {type(exc).__name__}: {exc}"
            break
        if raw.shape != (4,) or raw.dtype.kind not in "iuf":
            violation = f"bad action shape/dtype {raw.shape} {raw.dtype}"
        else:
            a = raw.astype(np.float64)
            if not np.all(np.isfinite(a)):
                violation = "non-finite action"
            elif np.any(a < -1.0) or np.any(a > 1.0):
                violation = "action out of bounds"
            elif prev is not None and float(np.max(np.abs(a - prev))) > max_delta:
                violation = f"step change {float(np.max(np.abs(a - prev))):.3g} > {max_delta:g}"
        if violation:
            break
        prev = a
        res = driver.step(a)
        obs = res.observation
        info = driver._last_info
        err = float(info.get("obj_to_target", np.nan))
        if start_err is None:
            start_err = err
        if info.get("success", 0.0):
            success = True
            break
    progress = 0.0
    if start_err and np.isfinite(err) and start_err > 0:
        progress = float(np.clip(1.0 - err / start_err, 0.0, 1.0))
    if success:
        progress = 1.0
    return {"seed": int(seed), "success": bool(success), "steps": steps, "progress": progress,
            "violation": violation}


def evaluate(driver, template, params: dict, seeds, max_delta: float) -> dict:
    policy = template.Policy(params)
    t0 = time.perf_counter()
    res = [run_episode(driver, policy, int(s), max_delta) for s in seeds]
    dt = time.perf_counter() - t0
    succ = [r for r in res if r["success"]]
    total_steps = sum(r["steps"] for r in res)
    return {
        "task": driver.task,
        "episodes": len(res),
        "success_rate": len(succ) / max(len(res), 1),
        "mean_progress": float(np.mean([r["progress"] for r in res])) if res else 0.0,
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

def cem(driver, template, budget: int, pop: int, elites: int, seeds_per: int, rng_seed: int, init: dict,
        sigma0: float, check_every: int, check_seeds: int, max_delta: float, step_weight: float = 0.0,
        target: float = 0.95, stop_at_target: bool = False, log=print) -> dict:
    """Score of a candidate = mean(success + progress - step_weight * steps / horizon) over common seeds."""
    space = template.PARAM_SPACE
    names = list(space)
    lo = np.array([space[n][0] for n in names])
    hi = np.array([space[n][1] for n in names])
    rng = np.random.default_rng(rng_seed)
    mu = np.clip((np.array([init.get(n, template.INITIAL_PARAMS[n]) for n in names]) - lo) / (hi - lo), 0, 1)
    sigma = np.full(len(names), sigma0)
    horizon = driver.horizon

    def to_params(z):
        return {n: float(v) for n, v in zip(names, lo + np.clip(z, 0, 1) * (hi - lo), strict=True)}

    check = list(range(9000, 9000 + check_seeds))  # fixed tuning seeds for progress checks
    used, gen, reached = 0, 0, None
    best_z, best_check = mu.copy(), -1.0
    if check_every:
        r = evaluate(driver, template, to_params(mu), check, max_delta)
        best_check = r["success_rate"]
        log(json.dumps({"gen": 0, "episodes": 0, "check_success_of_mean": r["success_rate"],
                        "check_steps": round(r["mean_steps"], 1)}))
        if r["success_rate"] >= target:
            reached = 0
    while used + pop * seeds_per <= budget:
        if stop_at_target and reached is not None:
            break
        gen += 1
        seeds = rng.integers(0, 9000, size=seeds_per)   # common seeds for the generation
        zs = [mu] + [np.clip(mu + sigma * rng.standard_normal(len(names)), 0, 1) for _ in range(pop - 1)]
        scores = []
        for z in zs:
            policy = template.Policy(to_params(z))
            rs = [run_episode(driver, policy, int(s), max_delta) for s in seeds]
            scores.append(float(np.mean([r["success"] + r["progress"] - step_weight * r["steps"] / horizon
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
            r = evaluate(driver, template, to_params(mu), check, max_delta)
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


def parse_seeds(spec: str):
    a, b = spec.split(":")
    return range(int(a), int(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="drawer-open-v3", choices=sorted(TEMPLATES))
    ap.add_argument("--params", default="{}", help="JSON dict of parameters (or @file.json)")
    ap.add_argument("--seeds", default="1000000:1000100", help="A:B half-open seed range")
    ap.add_argument("--max-delta", type=float, default=2.0, help="largest per-component change between actions")
    ap.add_argument("--cem", action="store_true", help="run the cross-entropy search (tuning seeds 0..9999)")
    ap.add_argument("--episodes-budget", type=int, default=2000)
    ap.add_argument("--pop", type=int, default=12)
    ap.add_argument("--elites", type=int, default=3)
    ap.add_argument("--seeds-per", type=int, default=3)
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
    if text.startswith("@"):
        with open(text[1:]) as fh:
            text = fh.read()
    params = json.loads(text)
    template = load_template(args.task)
    driver = MetaWorldDriver(args.task)
    driver.connect()
    try:
        if args.cem:
            t0 = time.perf_counter()
            out = cem(driver, template, args.episodes_budget, args.pop, args.elites, args.seeds_per, args.rng,
                      params, args.sigma, args.check_every, args.check_seeds, args.max_delta, args.step_weight,
                      args.target, args.stop_at_target)
            out["cem_wall_s"] = round(time.perf_counter() - t0, 1)
            if args.eval_after:
                out["eval"] = evaluate(driver, template, out["params"], parse_seeds(args.seeds), args.max_delta)
            print(json.dumps(out))
        else:
            print(json.dumps(evaluate(driver, template, params, parse_seeds(args.seeds), args.max_delta)))
    finally:
        driver.disconnect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
