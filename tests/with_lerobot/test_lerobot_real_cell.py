"""Done-when of the real-robot path, on LeRobot's own classes (run in .venv-lerobot: .ci/lerobot-env).

A simulated arm written as a subclass of LeRobot's `Robot` (hw/lerobot_sim.py: Push-T behind it, simulated
latency, a camera) runs as a cell marked real through the LeRobot driver at 10 Hz real time. A scripted
operator on the cell's stdin resets the scene and labels outcomes, looking at the scene itself; the vision
verifier (OpenCV on the camera frame) judges alone once its agreement passes the bound; an e-stop halts an
episode that is then not counted. The run is exported as a LeRobotDataset and loaded by LeRobot.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trio

pytest.importorskip("lerobot.robots", reason="needs LeRobot: .ci/lerobot-env")

from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402
from lerobot.robots import Robot  # noqa: E402

from bus.messages import EvalRequest, EvalResult, PolicySpec  # noqa: E402
from bus.records import EpisodeRecord  # noqa: E402
from enpire import config as cfg  # noqa: E402
from enpire import export  # noqa: E402
from enpire.agents import pusht_policy  # noqa: E402
from enpire.episodes import read_trajectory  # noqa: E402
from enpire.fleet import open_state_dir, start_core  # noqa: E402
from enpire.verify import pusht_coverage  # noqa: E402
from enpire.workspace import Workspace  # noqa: E402
from hw.lerobot_sim import SimPushTArm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the harness the main-env real-cell tests use
from realcell_harness import ScriptedOperator, free_port, pass_smoke, start_real_cell  # noqa: E402

HZ, HORIZON = 10.0, 30

# The host's own pacing noise in the same run: a plain process sleeping to the same 10 Hz deadlines, at
# normal priority, beside the fleet. A shared machine's steal and load show up here as in the cell.
HOST_PACER = """
import sys, time
period, tick = float(sys.argv[1]), time.perf_counter()
with open(sys.argv[2], "w") as out:
    while True:  # until the fixture kills it
        tick += period
        time.sleep(max(0.0, tick - time.perf_counter()))
        out.write(f"{time.perf_counter()}\\n")
        out.flush()
"""


def test_the_simulated_arm_is_a_lerobot_robot():
    assert issubclass(SimPushTArm, Robot)


def _config(url: str) -> cfg.Config:
    return cfg.decode(
        f'[cells]\ncount = 0\ntask = "arm"\n[agents]\ncount = 0\n[bus]\nlisten = "{url}"\n'
        '[scheduler]\nbackground = false\nlease_s = 300.0\n'
        f'[tasks.arm]\ndriver = "lerobot"\nverifier = "vision"\nverifier_kind = "pusht"\nhorizon = {HORIZON}\n'
        f'control_hz = {HZ}\n[tasks.arm.limits]\nmax_delta = 100.0\n'
        '[tasks.arm.limits.joints]\n"x.pos" = [0.0, 512.0]\n"y.pos" = [0.0, 512.0]\n', "arm.toml")


def _driver_options(tmp_path: Path, **extra) -> str:
    config = {"id": "sim-arm", "calibration_dir": str(tmp_path / "calibration"), "latency_s": 0.01,
              "frame_size": 256, "log_file": str(tmp_path / "arm.jsonl"), "scene_file": str(tmp_path / "scene.json"),
              **extra}
    return json.dumps({"task": "arm", "robot": "hw.lerobot_sim:SimPushTArm", "config": config, "camera": "top"})


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The fleet run all checks below read: 6 counted episodes and one e-stopped."""
    tmp_path = tmp_path_factory.mktemp("real")
    secret = "s-" + os.urandom(4).hex()
    os.environ["ENPIRE_SECRET"] = secret
    url = f"tcp://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    board, meta = open_state_dir(state)
    policy = PolicySpec(Workspace(state / "workspace").commit(
        "agent/t", {"policy.py": Path(pusht_policy.__file__).read_text()}, "heuristic"))
    pass_smoke(board, policy)
    prompts = {"reset": 0, "verdict": 0}
    truth = []

    def answer(kind, line):
        prompts[kind] += 1
        if kind == "reset":
            return "y"
        scene = json.loads((tmp_path / "scene.json").read_text())  # the person looks at the scene
        success = pusht_coverage(scene["block_pose"], scene["goal_pose"]) > 0.95
        truth.append(success)
        return "y" if success else "n"

    run = {"tmp": tmp_path, "state": state, "prompts": prompts, "truth": truth}

    async def main():
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, _config(url), state, board, meta)
            proc = start_real_cell(url, "arm-0", tmp_path / "iface", "--driver", "lerobot", "--driver-options",
                                   _driver_options(tmp_path), "--confirm-motion", "--min-labels", "3",
                                   "--max-false-success", "0.6", "--spot-check", "0", "--rt-priority", "10",
                                   secret=secret)
            op = ScriptedOperator(proc, answer)

            async def estop():  # the 5th episode is halted mid-way
                for _ in range(5):
                    await trio.to_thread.run_sync(op.wait_for, "scene reset?", 120)
                await trio.sleep(1.5)
                op.type("e")
                await trio.to_thread.run_sync(op.wait_for, "cell paused: e-stop", 60)
                op.type("resume")

            try:
                async with trio.open_nursery() as n:
                    n.start_soon(estop)
                    with trio.fail_after(300):
                        run["result"] = await core.scheduler.ask(
                            EvalRequest(job_id="real", agent="t", task="arm", policy=policy, seeds=list(range(6))),
                            timeout=300)
            finally:
                proc.kill()
                proc.wait()
                run["lines"], run["log"] = op.lines, op.errors
            core.stopping.set()
            nursery.cancel_scope.cancel()

    pacer = subprocess.Popen([sys.executable, "-c", HOST_PACER, str(1.0 / HZ), str(tmp_path / "host_pacer.txt")])
    try:
        trio.run(main)
        run["records"] = board.values("episodes", EpisodeRecord)
    finally:
        pacer.kill()
        pacer.wait()
        board.close()
    return run


def test_person_first_then_the_verifier_and_the_estop_is_not_counted(real_run):
    result = real_run["result"]
    assert isinstance(result, EvalResult) and len(result.episodes) == 6
    records = real_run["records"]
    assert [r.flagged for r in records].count("estop") == 1
    estop = next(r for r in records if r.flagged == "estop")
    assert 0 < estop.steps < HORIZON  # halted mid-episode
    counted = [r for r in records if not r.flagged]
    by = sorted(r.verdict.verifier for r in counted)
    assert by == ["person"] * 3 + ["pusht_vision"] * 3, by
    assert real_run["prompts"]["verdict"] == 3
    agreement = json.loads((real_run["tmp"] / "iface" / "agreement.json").read_text())
    assert agreement["n"] == 3 and agreement["false_success"] == 0


def test_ten_hertz_real_time(real_run):
    """The period between commands the arm received: mean within 2% of the nominal 100 ms; p99 and p1
    within 10% of it beyond what the host's own pacer (same run, same deadlines) strayed by."""
    d = np.concatenate([np.diff(np.asarray(s)) for s in _episode_stamps(real_run)])
    lines = (real_run["tmp"] / "host_pacer.txt").read_text().splitlines()[:-1]  # the last may be cut off
    host = np.diff(np.asarray([float(x) for x in lines]))
    nominal = 1.0 / HZ
    p99, p1 = float(np.percentile(d, 99)), float(np.percentile(d, 1))
    host_late = max(0.0, float(np.percentile(host, 99)) - nominal)
    host_early = max(0.0, nominal - float(np.percentile(host, 1)))
    print(json.dumps({"steps": int(d.size), "mean_ms": 1000 * d.mean(), "p1_ms": 1000 * p1, "p99_ms": 1000 * p99,
                      "host_ticks": int(host.size), "host_p99_late_ms": 1000 * host_late,
                      "host_p1_early_ms": 1000 * host_early}))
    assert d.size >= 5 * (HORIZON - 1) and host.size >= d.size
    assert abs(d.mean() - nominal) < 0.02 * nominal
    assert p99 <= 1.10 * nominal + host_late and p1 >= 0.90 * nominal - host_early


def _episode_stamps(run):
    """Each episode's control commands. An e-stopped episode (fewer than HORIZON commands) ends with the
    halt, sent the moment the person pressed e and not on the 10 Hz clock: it is left out."""
    episodes, stamps = [], []
    for line in (run["tmp"] / "arm.jsonl").read_text().splitlines() + ['{"reset": null}']:
        event = json.loads(line)
        if "reset" in event:
            if len(stamps) < HORIZON:
                stamps = stamps[:-1]
            if len(stamps) > 1:
                episodes.append(stamps)
            stamps = []
        else:
            stamps.append(event["t"])
    return episodes


def test_export_loads_in_lerobot_with_matching_frames(real_run, tmp_path):
    out = tmp_path / "dataset"
    summary = export.export(real_run["state"], out, repo_id="local/arm", fps=int(HZ))
    counted = sorted((r for r in real_run["records"] if not r.flagged), key=lambda r: (r.finished, r.episode_id))
    assert summary["episodes"] == len(counted) == 6
    ds = LeRobotDataset("local/arm", root=out)
    assert ds.num_episodes == 6 and ds.num_frames == sum(r.steps for r in counted) == summary["frames"]
    meta = [json.loads(x) for x in (out / "meta" / "enpire_episodes.jsonl").read_text().splitlines()]
    assert [m["episode_id"] for m in meta] == [r.episode_id for r in counted]
    assert all(m["frames_source"] == "recorded" for m in meta)
    # Frames: decoded video against the frames the cell recorded (AV1 is lossy: close, and closest to the
    # frame of the same index among its neighbours), observations and actions exactly.
    index = 0
    for r in counted[:2]:
        traj = read_trajectory(real_run["state"] / r.trajectory_file)
        for t in (0, r.steps // 2, r.steps - 1):
            item = ds[index + t]
            got = (item["observation.image"].numpy().transpose(1, 2, 0) * 255.0)
            err = np.abs(got - traj["frames"][t]).mean()
            assert err < 6.0, err
            others = [np.abs(got - traj["frames"][u]).mean() for u in (t - 3, t + 3) if 0 <= u < r.steps]
            assert all(err < o for o in others if o > 1.0)
            assert np.allclose(item["observation.state"].numpy(), traj["observations"][t])
            assert np.allclose(item["action"].numpy(), traj["actions"][t])
            assert int(item["episode_index"]) == counted.index(r)
        index += r.steps
