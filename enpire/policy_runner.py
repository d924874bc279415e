"""Play an exported enpire policy outside the fleet (this file is copied as `run.py` by `export_policy`).

    python run.py --sim pusht --episodes 10 [--seed 0] [--steps 300]
    python run.py --robot package.module:RobotClass --config '{...}' [--confirm-motion] [--hz 10] [--steps 300]

Needs numpy and safetensors, plus gym-pusht for --sim pusht or LeRobot for --robot. It prints one JSON
line per episode. A real robot moves only with --confirm-motion; without it each command is printed.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_policy():
    """Policy(params) from ./policy, run in a scratch folder holding its files and its .npz weights."""
    from safetensors.numpy import load

    scratch = Path(tempfile.mkdtemp(prefix="enpire-policy-"))
    atexit.register(shutil.rmtree, scratch, True)  # the copy goes when the program does
    for f in (HERE / "policy").rglob("*"):
        if f.is_file():
            (scratch / f.relative_to(HERE / "policy")).parent.mkdir(parents=True, exist_ok=True)
            (scratch / f.relative_to(HERE / "policy")).write_bytes(f.read_bytes())
    for name in json.loads((HERE / "champion.json").read_text())["weights"]:
        arrays = load((HERE / name).read_bytes())
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (scratch / (name[: -len(".safetensors")] + ".npz")).write_bytes(buf.getvalue())
    sys.path.insert(0, str(scratch))
    os.chdir(scratch)  # policies read their checkpoint from the working directory, as in the sandbox
    module = importlib.import_module("policy")
    params = json.loads((HERE / "params.json").read_text())
    return module.Policy(params)


def play_pusht(policy, episodes: int, seed: int, steps: int) -> None:
    import gym_pusht  # noqa: F401  (registers the environment)
    import gymnasium as gym

    env = gym.make("gym_pusht/PushT-v0", obs_type="state")
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        if hasattr(policy, "reset"):
            policy.reset()
        success, done, reward = False, 0, 0.0
        while done < steps and not success:
            obs, reward, terminated, _, info = env.step(np.asarray(policy.act(np.asarray(obs, dtype=np.float64))))
            done += 1
            success = bool(info.get("is_success", False))
            if terminated:
                break
        print(json.dumps({"episode": k, "seed": seed + k, "success": success, "steps": done, "reward": float(reward),
                          "final_obs": [round(float(v), 3) for v in obs]}), flush=True)
    env.close()


def play_robot(policy, spec: str, config: dict, steps: int, hz: float, confirm: bool) -> None:
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    try:
        import draccus

        robot = cls(draccus.decode(cls.config_class, config))
    except ImportError:
        robot = cls(cls.config_class(**config))
    scalars = [k for k, v in robot.observation_features.items() if not isinstance(v, tuple)]
    actions = list(robot.action_features)
    robot.connect()
    try:
        if hasattr(policy, "reset"):
            policy.reset()
        tick = time.perf_counter()
        for _ in range(steps):
            obs = robot.get_observation()
            a = np.asarray(policy.act(np.array([float(obs[k]) for k in scalars])), dtype=np.float64)
            command = {n: float(v) for n, v in zip(actions, a, strict=True)}
            if confirm:
                robot.send_action(command)
            else:
                print("dry run: would move " + ", ".join(f"{n}={v:.4g}" for n, v in command.items()), flush=True)
            tick += 1.0 / hz
            time.sleep(max(0.0, tick - time.perf_counter()))
        print(json.dumps({"steps": steps, "moved": confirm}), flush=True)
    finally:
        robot.disconnect()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--sim", choices=("pusht",), help="play on a simulator")
    where.add_argument("--robot", help="a LeRobot Robot class, package.module:Class")
    p.add_argument("--config", default="{}", help="JSON fields of the robot's config class")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hz", type=float, default=10.0)
    p.add_argument("--confirm-motion", action="store_true", help="let the robot move")
    args = p.parse_args(argv)
    policy = load_policy()
    if args.sim:
        play_pusht(policy, args.episodes, args.seed, args.steps)
    else:
        play_robot(policy, args.robot, json.loads(args.config), args.steps, args.hz, args.confirm_motion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
