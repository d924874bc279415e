"""export-policy: the champion's code, params and safetensors weights, played by its runner outside the fleet."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load

from bus.messages import PolicySpec
from bus.records import Champion
from enpire import export_policy
from enpire.fleet import open_state_dir
from enpire.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]

# Moves the agent by a learned offset per step: its behaviour lives in weights.npz.
POLICY = """import numpy as np
class Policy:
    def __init__(self, params):
        with np.load("weights.npz", allow_pickle=False) as w:
            self.step = w["step"] * params.get("scale", 1.0)
    def act(self, obs):
        return np.clip(np.asarray(obs[:2]) + self.step, 0, 512)
"""


def _state_with_champion(tmp_path: Path) -> tuple[Path, dict]:
    state = tmp_path / "state"
    board, _ = open_state_dir(state)
    weights = {"step": np.array([4.0, -2.0]), "unused": np.arange(6, dtype=np.float32).reshape(2, 3)}
    buf = io.BytesIO()
    np.savez(buf, **weights)
    commit = Workspace(state / "workspace").commit("agent/a", {"policy.py": POLICY, "weights.npz": buf.getvalue()}, "c")
    board.put("champion", "pusht", Champion("pusht", PolicySpec(commit, {"scale": 2.0}), 9, 10, time.time(), agent="a"))
    board.close()
    return state, weights


def test_champion_exports_and_plays_on_the_simulator(tmp_path, capsys):
    state, weights = _state_with_champion(tmp_path)
    out = tmp_path / "champ"
    assert export_policy.main(["--state-dir", str(state), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"] == ["weights.safetensors"] and info["heldout"]["judged"] == [9, 10]
    assert "weights.npz" not in {p.name for p in (out / "policy").iterdir()}  # it became safetensors
    restored = load((out / "weights.safetensors").read_bytes())
    assert set(restored) == set(weights) and all(np.array_equal(restored[k], weights[k]) for k in weights)
    assert json.loads((out / "params.json").read_text()) == {"scale": 2.0}
    r = subprocess.run([sys.executable, str(out / "run.py"), "--sim", "pusht", "--episodes", "2", "--steps", "10"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["seed"] for x in lines] == [0, 1] and all(x["steps"] == 10 for x in lines)
    # The learned offset (scale 2 x [4, -2] per step) moved the agent right and up from where it started.
    import gym_pusht  # noqa: F401
    import gymnasium as gym

    env = gym.make("gym_pusht/PushT-v0", obs_type="state")
    start, _ = env.reset(seed=0)
    assert lines[0]["final_obs"][0] > start[0] + 20 and lines[0]["final_obs"][1] < start[1] - 10


def test_runner_on_a_robot_prints_without_confirm_motion(tmp_path, capsys):
    state, _ = _state_with_champion(tmp_path)
    out = tmp_path / "champ"
    assert export_policy.main(["--state-dir", str(state), "--out", str(out)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(out / "run.py"), "--robot", "tests.test_lerobot_driver:TwoJointArm",
                        "--steps", "3", "--hz", "50"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "dry run: would move shoulder.pos=8, elbow.pos=0"  # clipped at 0 by the policy
    assert json.loads(lines[-1]) == {"steps": 3, "moved": False}


def test_export_policy_bad_input(tmp_path, capsys):
    assert export_policy.main(["--state-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no blackboard.lmdb" in capsys.readouterr().err
    board, _ = open_state_dir(tmp_path / "empty")
    board.close()
    assert export_policy.main(["--state-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no champion" in capsys.readouterr().err
    state, _ = _state_with_champion(tmp_path / "run")
    (tmp_path / "a-file").write_text("x")
    for out, says in ((tmp_path / "a-file", "exists and is not an empty directory"),
                      (tmp_path / "a-file" / "below", "Not a directory")):
        assert export_policy.main(["--state-dir", str(state), "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
