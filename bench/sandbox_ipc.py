"""Sandbox round-trip benchmark: `PolicySandbox.act` against a direct in-process call, in the same run.

    python bench/sandbox_ipc.py [--steps N] [--repeat R] [--spin-us US]

For a trivial policy and for the Push-T policy (`enpire.agents.pusht_policy`, fed observations recorded
from a real gym-pusht episode): act round trips/s and per-call p50/p99 (µs), sandbox vs direct. Then an
interleaved loop on gym-pusht (policy act + env.step per step), sandbox vs direct, steps/s. Every figure
is the median over `--repeat` rounds; sandbox and direct rounds alternate so machine noise hits both.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from enpire.agents import pusht_policy  # noqa: E402
from enpire.sandbox import PolicySandbox, SandboxLimits  # noqa: E402

TRIVIAL = """
import numpy as np
class Policy:
    def __init__(self, params):
        pass
    def act(self, obs):
        return np.array([256.0, 256.0])
"""


class _Trivial:
    def act(self, obs):
        return np.array([256.0, 256.0])

    def reset(self):
        pass


def _percentiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2] * 1e6, s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6


def _time_calls(call, inputs: list[np.ndarray]) -> dict:
    lat = []
    clock = time.perf_counter
    t0 = clock()
    for obs in inputs:
        t = clock()
        call(obs)
        lat.append(clock() - t)
    secs = clock() - t0
    p50, p99 = _percentiles(lat)
    return {"per_s": len(inputs) / secs, "p50_us": p50, "p99_us": p99}


def _median(rounds: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rounds), 1) for k in rounds[0]}


def record_observations(n: int) -> list[np.ndarray]:
    """Observations of a real Push-T episode driven by the Push-T policy (so act takes its real branches)."""
    import gym_pusht  # noqa: F401
    import gymnasium as gym

    env = gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped
    policy = pusht_policy.Policy(dict(pusht_policy.INITIAL_PARAMS))
    out: list[np.ndarray] = []
    seed = 1000
    while len(out) < n:
        obs, _ = env.reset(seed=seed)
        policy.reset()
        for _ in range(300):
            out.append(np.array(obs, dtype=np.float64))
            obs, _, terminated, _, _ = env.step(np.asarray(policy.act(obs), dtype=np.float64))
            if terminated or len(out) >= n:
                break
        seed += 1
    return out


def interleaved(act, reset, steps: int, seed: int = 50_000) -> float:
    """Steps/s of act + env.step on gym-pusht, as a cell's rollout does it (minus the safety check)."""
    import gym_pusht  # noqa: F401
    import gymnasium as gym

    env = gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        obs, _ = env.reset(seed=seed)
        reset()
        seed += 1
        for _ in range(300):
            action = act(obs)
            obs, _, terminated, _, _ = env.step(np.asarray(action, dtype=np.float64))
            done += 1
            if terminated or done >= steps:
                break
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000, help="act calls per round")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--spin-us", type=float, default=None, help="SandboxLimits.spin_us (default: its default)")
    args = p.parse_args(argv)
    kw = {} if args.spin_us is None else {"spin_us": args.spin_us}
    limits = SandboxLimits(**kw)
    params = dict(pusht_policy.INITIAL_PARAMS)
    observations = record_observations(args.steps)
    zeros = [np.zeros(5) for _ in range(args.steps)]
    out: dict = {"steps": args.steps, "repeat": args.repeat, "limits": {"spin_us": getattr(limits, "spin_us", None)}}

    with tempfile.TemporaryDirectory() as tmp:
        with PolicySandbox(limits, Path(tmp) / "trivial") as sb_triv, PolicySandbox(limits, Path(tmp) / "pusht") as sb_pt:
            sb_triv.load({"policy.py": TRIVIAL}, {})
            sb_triv.reset()
            sb_pt.load({"policy.py": Path(pusht_policy.__file__).read_text()}, params)
            sb_pt.reset()
            direct_pt = pusht_policy.Policy(params)
            trivial = _Trivial()

            def sandboxed(sb):
                def call(obs):
                    r = sb.act(obs)
                    if r.action is None:
                        raise RuntimeError(r.error or "deadline missed")
                    return r.action

                return call

            for call in (sandboxed(sb_triv), sandboxed(sb_pt), direct_pt.act):  # warm-up
                _time_calls(call, observations[:200])
            rounds: dict[str, list] = {k: [] for k in ("trivial_sandbox", "trivial_direct", "pusht_sandbox",
                                                       "pusht_direct", "loop_sandbox", "loop_direct")}
            for _ in range(args.repeat):
                rounds["trivial_sandbox"].append(_time_calls(sandboxed(sb_triv), zeros))
                rounds["trivial_direct"].append(_time_calls(trivial.act, zeros))
                sb_pt.reset()
                rounds["pusht_sandbox"].append(_time_calls(sandboxed(sb_pt), observations))
                direct_pt.reset()
                rounds["pusht_direct"].append(_time_calls(direct_pt.act, observations))
                rounds["loop_sandbox"].append({"steps_per_s": interleaved(sandboxed(sb_pt), sb_pt.reset, args.steps)})
                rounds["loop_direct"].append({"steps_per_s": interleaved(direct_pt.act, direct_pt.reset, args.steps)})
            cpu = {}
            for name, sb in (("trivial", sb_triv), ("pusht", sb_pt)):
                cpu[name] = round(sb._cpu_used(), 2)
    for key, rs in rounds.items():
        out[key] = _median(rs)
    out["pusht_sandbox_overhead_us"] = round(out["pusht_sandbox"]["p50_us"] - out["pusht_direct"]["p50_us"], 1)
    out["loop_ratio"] = round(out["loop_sandbox"]["steps_per_s"] / out["loop_direct"]["steps_per_s"], 3)
    out["child_cpu_s"] = cpu
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
