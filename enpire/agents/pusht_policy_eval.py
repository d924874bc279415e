"""Evaluate / tune the heuristic Push-T policy directly on gym-pusht (no fleet).

    python -m enpire.agents.pusht_policy_eval --params '{"ang_len": 80}' --seeds 100000:100200
    python -m enpire.agents.pusht_policy_eval --cem --episodes-budget 3000

Action constraints enforced (a violation ends the episode as a failure): finite, shape (2,),
inside [0, 512]^2, within 100 px of the previous action (the first one within 100 px of the pusher).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from enpire.agents import pusht_policy as pp

HORIZON = 300
MAX_JUMP = 100.0


def make_env():
    import gym_pusht  # noqa: F401  (registers the environment)
    import gymnasium as gym

    return gym.make("gym_pusht/PushT-v0", obs_type="state")


def run_episode(env, policy, seed: int) -> dict:
    obs, _ = env.reset(seed=seed)
    policy.reset()
    prev = np.asarray(obs[:2], dtype=np.float64)
    coverage, success, violation = 0.0, False, None
    steps = 0
    for steps in range(1, HORIZON + 1):  # noqa: B007 (the count is used after the loop)
        a = np.asarray(policy.act(np.asarray(obs, dtype=np.float64)), dtype=np.float64)
        if a.shape != (2,) or not np.all(np.isfinite(a)):
            violation = "bad action"
        elif np.any(a < 0.0) or np.any(a > 512.0):
            violation = "out of bounds"
        elif float(np.hypot(*(a - prev))) > MAX_JUMP:
            violation = "jump"
        if violation:
            success = False
            break
        prev = a
        obs, _r, terminated, truncated, info = env.step(a)
        coverage = float(info.get("coverage", 0.0))
        if terminated:
            success = bool(info.get("is_success", False))
            break
        if truncated:
            break
    return {"seed": seed, "success": success, "coverage": coverage, "steps": steps, "violation": violation}


def evaluate(env, params: dict, seeds) -> dict:
    policy = pp.Policy(params)
    t0 = time.perf_counter()
    res = [run_episode(env, policy, int(s)) for s in seeds]
    dt = time.perf_counter() - t0
    succ = [r for r in res if r["success"]]
    total_steps = sum(r["steps"] for r in res)
    return {
        "episodes": len(res),
        "success_rate": len(succ) / max(len(res), 1),
        "mean_coverage": float(np.mean([r["coverage"] for r in res])) if res else 0.0,
        "mean_steps": total_steps / max(len(res), 1),
        "mean_steps_success": (sum(r["steps"] for r in succ) / len(succ)) if succ else None,
        "violations": sum(1 for r in res if r["violation"]),
        "steps_per_s": total_steps / dt if dt > 0 else 0.0,
        "failed_seeds": [r["seed"] for r in res if not r["success"]][:50],
    }


# --------------------------------------------------------------------------------------------
# Cross-entropy method in the normalised box [0, 1]^d.
# --------------------------------------------------------------------------------------------

def cem(env, budget: int, pop: int, elites: int, seeds_per: int, rng_seed: int, init: dict,
        sigma0: float, check_every: int, check_seeds: int, step_weight: float = 0.0, log=print) -> dict:
    """Score of a candidate = mean(success + coverage - step_weight * steps / HORIZON)."""
    names = list(pp.PARAM_SPACE)
    lo = np.array([pp.PARAM_SPACE[n][0] for n in names])
    hi = np.array([pp.PARAM_SPACE[n][1] for n in names])
    rng = np.random.default_rng(rng_seed)
    mu = np.clip((np.array([init.get(n, pp.INITIAL_PARAMS[n]) for n in names]) - lo) / (hi - lo), 0, 1)
    sigma = np.full(len(names), sigma0)
    def to_params(z):
        return {n: float(v) for n, v in zip(names, lo + np.clip(z, 0, 1) * (hi - lo), strict=True)}

    check = list(range(9000, 9000 + check_seeds))  # fixed tuning seeds for progress checks
    used, gen, reached = 0, 0, None
    if check_every:
        r = evaluate(env, to_params(mu), check)
        log(json.dumps({"gen": 0, "episodes": 0, "check_success_of_mean": r["success_rate"],
                        "check_steps": round(r["mean_steps"], 1)}))
        if r["success_rate"] >= 0.95:
            reached = 0
    while used + pop * seeds_per <= budget:
        gen += 1
        seeds = rng.integers(0, 9000, size=seeds_per)   # common seeds for the generation
        zs = [mu] + [np.clip(mu + sigma * rng.standard_normal(len(names)), 0, 1) for _ in range(pop - 1)]
        scores = []
        for z in zs:
            policy = pp.Policy(to_params(z))
            rs = [run_episode(env, policy, int(s)) for s in seeds]
            scores.append(float(np.mean([r["success"] + r["coverage"] - step_weight * r["steps"] / HORIZON
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
            r = evaluate(env, to_params(mu), check)
            line["check_success_of_mean"] = r["success_rate"]
            line["check_steps"] = round(r["mean_steps"], 1)
            if reached is None and r["success_rate"] >= 0.95:
                reached = used
        log(json.dumps(line))
        sys.stdout.flush()
    return {"params": to_params(mu), "episodes_used": used, "generations": gen,
            "episodes_to_95_on_check": reached}


def parse_seeds(spec: str):
    a, b = spec.split(":")
    return range(int(a), int(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="{}", help="JSON dict of parameters (or @file.json)")
    ap.add_argument("--seeds", default="100000:100200", help="A:B half-open seed range")
    ap.add_argument("--cem", action="store_true", help="run the cross-entropy search")
    ap.add_argument("--episodes-budget", type=int, default=2000)
    ap.add_argument("--pop", type=int, default=16)
    ap.add_argument("--elites", type=int, default=4)
    ap.add_argument("--seeds-per", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.15)
    ap.add_argument("--rng", type=int, default=0)
    ap.add_argument("--check-every", type=int, default=5, help="evaluate the mean every N generations")
    ap.add_argument("--check-seeds", type=int, default=40)
    ap.add_argument("--step-weight", type=float, default=0.0,
                    help="optional speed term: score -= step_weight * steps / 300")
    args = ap.parse_args(argv)

    text = args.params
    if text.startswith("@"):
        with open(text[1:]) as fh:
            text = fh.read()
    params = json.loads(text)
    env = make_env()
    if args.cem:
        out = cem(env, args.episodes_budget, args.pop, args.elites, args.seeds_per, args.rng, params,
                  args.sigma, args.check_every, args.check_seeds, args.step_weight)
        print(json.dumps(out))
    else:
        print(json.dumps(evaluate(env, params, parse_seeds(args.seeds))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
