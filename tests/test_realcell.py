"""The environment interface of a real cell: a person at the terminal, verifier agreement, e-stop, dry run."""

import io
import json
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from bus.messages import EvalRequest, EvalResult, PolicySpec
from bus.records import EpisodeRecord
from enpire import config as cfg
from enpire.fleet import open_state_dir, start_core
from enpire.metrics import wilson_interval
from enpire.realcell import Agreement, Operator, RealSettings, approve, load_reset_program
from enpire.workspace import Workspace
from tests.realcell_harness import ScriptedOperator, free_port, pass_smoke, start_real_cell

ROOT = Path(__file__).resolve().parents[1]
STILL = ("import numpy as np\nclass Policy:\n    def __init__(self, params): pass\n"
         "    def act(self, obs): return np.asarray(obs[:2], dtype=float)\n")


class Pipe(io.TextIOBase):
    """A line source fed by the test, like a terminal's stdin."""

    def __init__(self):
        self.lines: list[str] = []
        self.cv = threading.Condition()
        self.closed_ = False

    def feed(self, line: str | None) -> None:
        with self.cv:
            if line is None:
                self.closed_ = True
            else:
                self.lines.append(line + "\n")
            self.cv.notify_all()

    def __iter__(self):
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.lines or self.closed_)
                if self.lines:
                    line = self.lines.pop(0)
                else:
                    return
            yield line


def test_agreement_trusts_the_program_only_past_the_bound():
    s = RealSettings(max_false_success=0.3, min_labels=5)
    a = Agreement()
    for _ in range(8):
        a.record(person=False, program=False)
    assert a.false_success_bound() == pytest.approx(wilson_interval(0, 8)[1])
    assert not a.trusted(s)  # 0 of 8: Wilson upper bound 0.324 > 0.3
    for _ in range(4):
        a.record(person=False, program=False)
    assert a.trusted(s)  # 0 of 12: upper bound 0.242 <= 0.3
    a.record(person=False, program=True)  # one false success: 1 of 13
    assert a.false_success == 1 and a.false_success_bound() > 0.3 and not a.trusted(s)
    b = Agreement()
    for _ in range(4):
        b.record(person=True, program=True)
    assert not b.trusted(RealSettings(max_false_success=0.9, min_labels=5))  # too few labels


def test_operator_times_out_and_hears_the_estop():
    pipe, out = Pipe(), io.StringIO()
    op = Operator(pipe, out)
    t = time.monotonic()
    assert op.ask("scene reset?", timeout=0.3) is None and time.monotonic() - t >= 0.3
    threading.Timer(0.2, lambda: (pipe.feed("maybe"), pipe.feed("y"))).start()
    assert op.ask("scene reset?", timeout=5) == "y"
    assert "please answer y or n" in out.getvalue()
    pipe.feed("e")
    deadline = time.monotonic() + 5
    while not op.estop.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert op.estop.is_set() and "E-STOP" in out.getvalue()
    pipe.feed("y")  # typed before the question: not an answer to it
    time.sleep(0.1)
    assert op.ask("success?", timeout=0.2) is None
    pipe.feed(None)
    assert op.ask("success?", timeout=5) is None  # input closed: nobody answers


def test_only_approved_unchanged_reset_programs_run(tmp_path):
    program = tmp_path / "reset.py"
    program.write_text("def reset(driver, seed):\n    driver.calls.append(seed)\n")
    pipe = Pipe()
    threading.Timer(0.3, pipe.feed, ["n"]).start()  # the person answers once the program is shown
    assert approve(program, tmp_path / "iface", Operator(pipe, io.StringIO()), timeout=5) is None
    with pytest.raises(ValueError, match="not approved"):
        load_reset_program(program, tmp_path / "iface")
    pipe.feed(None)
    pipe = Pipe()  # a new terminal session
    threading.Timer(0.3, pipe.feed, ["y"]).start()
    kept = approve(program, tmp_path / "iface", Operator(pipe, io.StringIO()), timeout=5)
    assert kept is not None and kept.parent.name == "approved"
    assert oct(kept.stat().st_mode & 0o777) == "0o444" and oct(kept.parent.stat().st_mode & 0o777) == "0o555"

    class D:
        calls: list = []

    load_reset_program(kept, tmp_path / "iface")(D, 7)
    assert D.calls == [7]
    os.chmod(kept.parent, 0o755)
    os.chmod(kept, 0o644)
    kept.write_text("def reset(driver, seed):\n    pass  # swapped\n")
    with pytest.raises(ValueError, match="changed since it was approved"):
        load_reset_program(kept, tmp_path / "iface")


async def _real_fleet(tmp_path, monkeypatch, body, *, horizon=20, cell_args=("--driver", "pusht"), lease_s=120.0,
                      task_extra="", local_cells=0):
    """A fleet core on loopback tcp (no local cells) and one real cell; `body(core, board, spawn, policy)`
    where `policy` (standing still) already passed its smoke test."""
    secret = "test-secret-" + os.urandom(4).hex()
    monkeypatch.setenv("ENPIRE_SECRET", secret)
    url = f"tcp://127.0.0.1:{free_port()}"
    config = cfg.decode(
        f'[cells]\ncount = {local_cells}\ntask = "pusht"\n[agents]\ncount = 0\n[bus]\nlisten = "{url}"\n'
        f'[scheduler]\nbackground = false\nlease_s = {lease_s}\n'
        f'[tasks.pusht]\nhorizon = {horizon}\ncontrol_hz = 10.0\n{task_extra}', "real.toml")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # local cells find the test robots too
    board, meta = open_state_dir(tmp_path / "state")
    policy = PolicySpec(Workspace(tmp_path / "state" / "workspace").commit("agent/t", {"policy.py": STILL}, "still"))
    pass_smoke(board, policy)
    procs = []

    def spawn(*args):
        proc = start_real_cell(url, "arm-0", tmp_path / "iface", *cell_args, *args, secret=secret,
                               env={"PYTHONPATH": str(ROOT)})
        procs.append(proc)
        return proc

    try:
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, tmp_path / "state", board, meta)
            await body(core, board, spawn, policy)
            core.stopping.set()
            nursery.cancel_scope.cancel()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        board.close()


async def test_person_then_program_then_estop_and_silence(tmp_path, monkeypatch):
    """Person labels 3 episodes, then the program judges alone; a silent operator pauses the cell, an
    e-stop halts an episode that is then not counted; 'resume' brings the cell back each time."""
    prompts = {"reset": 0, "verdict": 0}
    silent_reset = 4  # the 4th reset prompt gets no answer

    def answer(kind, line):
        prompts[kind] += 1
        if kind == "reset" and prompts[kind] == silent_reset:
            return None
        return "y" if kind == "reset" else "n"  # standing still never solves Push-T

    async def body(core, board, spawn, policy):
        proc = spawn("--confirm-motion", "--min-labels", "3", "--max-false-success", "0.6", "--spot-check", "0",
                     "--reset-timeout", "2")
        op = ScriptedOperator(proc, answer)

        async def operator_side():
            await trio.to_thread.run_sync(op.wait_for, "cell paused: operator_timeout", 90)
            op.type("resume")
            # next: the e-stop in the middle of an episode (2 s long at 10 Hz)
            await trio.to_thread.run_sync(op.wait_for, "scene reset?", 60)
            await trio.sleep(1.0)
            op.type("e")
            await trio.to_thread.run_sync(op.wait_for, "cell paused: e-stop", 30)
            op.type("resume")

        async with trio.open_nursery() as n:
            n.start_soon(operator_side)
            with trio.fail_after(240):
                result = await core.scheduler.ask(EvalRequest(job_id="real", agent="t", task="pusht", policy=policy,
                                                              seeds=list(range(7))), timeout=240)
        assert isinstance(result, EvalResult), result
        assert len(result.episodes) == 7 and not any(e.success for e in result.episodes)
        records = board.values("episodes", EpisodeRecord)
        flags = sorted(r.flagged for r in records if r.flagged)
        assert flags == ["estop", "operator_timeout"], flags
        estop = next(r for r in records if r.flagged == "estop")
        assert 0 < estop.steps < 20 and estop.verdict.reason.startswith("unverified: estop")
        counted = [r for r in records if not r.flagged]
        by = [r.verdict.verifier for r in counted]
        assert by.count("person") == 3 and by.count("pusht_state") == 4, by
        assert prompts["verdict"] == 3  # the program judged alone after 3 agreeing labels
        agreement = Agreement(**__import__("json").loads((tmp_path / "iface" / "agreement.json").read_text()))
        assert agreement.n == 3 and agreement.agree == 3

    await _real_fleet(tmp_path, monkeypatch, body)


async def test_without_confirm_motion_a_real_cell_only_prints(tmp_path, monkeypatch):
    async def body(core, board, spawn, policy):
        proc = spawn("--min-labels", "1")
        op = ScriptedOperator(proc, lambda kind, line: "y" if kind == "reset" else "n")
        async with trio.open_nursery() as n:
            n.start_soon(lambda: core.scheduler.ask(EvalRequest(job_id="dry", agent="t", task="pusht", policy=policy,
                                                                seeds=[3]), timeout=120))
            line = await trio.to_thread.run_sync(op.wait_for, "dry run: would move", 90)
            n.cancel_scope.cancel()
        assert "x" not in line or "0=" in line  # pusht names no actions: components by index
        with trio.fail_after(30):
            while not board.values("episodes", EpisodeRecord):
                await trio.sleep(0.2)
        (rec, *_) = board.values("episodes", EpisodeRecord)
        assert rec.flagged == "dry_run"  # never counted
        assert any("dry run (no --confirm-motion)" in line for line in op.errors)

    await _real_fleet(tmp_path, monkeypatch, body, horizon=5)


async def test_silent_verdict_holds_the_episode_and_pauses_the_cell(tmp_path, monkeypatch):
    """The operator resets but never labels: the episode is held unverified (not counted), the cell pauses;
    after 'resume' a labelled episode counts."""
    labels = {"n": 0}

    def answer(kind, line):
        if kind == "reset":
            return "y"
        labels["n"] += 1
        return None if labels["n"] == 1 else "n"

    async def body(core, board, spawn, policy):
        proc = spawn("--confirm-motion", "--verdict-timeout", "1")
        op = ScriptedOperator(proc, answer)

        async def operator_side():
            await trio.to_thread.run_sync(op.wait_for, "cell paused: no verdict from the operator", 60)
            op.type("resume")

        async with trio.open_nursery() as n:
            n.start_soon(operator_side)
            with trio.fail_after(120):
                result = await core.scheduler.ask(EvalRequest(job_id="v", agent="t", task="pusht", policy=policy,
                                                              seeds=[1]), timeout=120)
        assert isinstance(result, EvalResult) and len(result.episodes) == 1
        records = board.values("episodes", EpisodeRecord)
        assert sorted(r.flagged for r in records) == ["", "unverified"]
        assert next(r for r in records if not r.flagged).verdict.verifier == "person"

    await _real_fleet(tmp_path, monkeypatch, body, horizon=5)


async def test_camera_without_frame_pauses_a_real_lerobot_cell(tmp_path, monkeypatch):
    """A LeRobot robot whose camera stops giving frames mid-episode: the episode is held (driver_error),
    the cell pauses with one line naming the camera, the daemon keeps serving."""
    options = json.dumps({"task": "pusht", "robot": "tests.test_lerobot_driver:TwoJointArm",
                          "config": {"blind_after": 4}})
    limits = '[tasks.pusht.limits.joints]\n"shoulder.pos" = [0.0, 512.0]\n"elbow.pos" = [0.0, 512.0]\n'

    async def body(core, board, spawn, policy):
        proc = spawn("--confirm-motion")
        op = ScriptedOperator(proc, lambda kind, line: "y" if kind == "reset" else "n")
        async with trio.open_nursery() as n:
            n.start_soon(lambda: core.scheduler.ask(EvalRequest(job_id="c", agent="t", task="pusht", policy=policy,
                                                                seeds=[1]), timeout=120))
            line = await trio.to_thread.run_sync(op.wait_for, "cell paused: robot fault", 60)
            n.cancel_scope.cancel()
        assert "camera 'wrist' returned no frame" in line
        with trio.fail_after(30):
            while not (records := board.values("episodes", EpisodeRecord)):
                await trio.sleep(0.2)
        assert records[0].flagged == "driver_error" and "camera 'wrist'" in records[0].verdict.reason
        assert records[0].steps > 0  # mid-episode, after the policy acted: held-out work would count it failed
        assert proc.poll() is None  # paused, not dead

    await _real_fleet(tmp_path, monkeypatch, body, horizon=10, task_extra=limits,
                      cell_args=("--driver", "lerobot", "--driver-options", options))


async def test_a_local_robot_that_cannot_connect_leaves_the_fleet_serving(tmp_path, monkeypatch, capfd):
    """The task's local cell drives a robot that never connects: its process stops with one line and is
    restarted with backoff, while the fleet keeps serving the real cell that works."""
    broken = ('driver = "lerobot"\nverifier_kind = "pusht"\n[tasks.pusht.driver_options]\n'
              'task = "pusht"\nrobot = "tests.test_lerobot_driver:TwoJointArm"\nconfig = { fail_connect = true }\n'
              '[tasks.pusht.limits.joints]\n"shoulder.pos" = [0.0, 512.0]\n"elbow.pos" = [0.0, 512.0]\n')
    working = json.dumps({"task": "pusht", "robot": "tests.test_lerobot_driver:TwoJointArm"})

    async def body(core, board, spawn, policy):
        proc = spawn("--confirm-motion", "--min-labels", "1", "--max-false-success", "0.99", "--spot-check", "0")
        ScriptedOperator(proc, lambda kind, line: "y" if kind == "reset" else "n")
        with trio.fail_after(120):
            result = await core.scheduler.ask(EvalRequest(job_id="ok", agent="t", task="pusht", policy=policy,
                                                          seeds=[1, 2]), timeout=120)
        assert isinstance(result, EvalResult) and len(result.episodes) == 2  # served by the working robot
        out = capfd.readouterr()
        refusals = [x for x in out.err.splitlines() if "failed to connect" in x]
        assert refusals and all(x.startswith("enpire.cell: robot ") and x.endswith(
            "failed to connect: OSError: could not open port /dev/ttyACM0") for x in refusals)
        assert "cell_process_exited" in out.out + out.err  # the daemon restarts it with backoff

    await _real_fleet(tmp_path, monkeypatch, body, horizon=5, task_extra=broken, local_cells=1,
                      cell_args=("--driver", "lerobot", "--driver-options", working))


def test_the_interface_command_names_a_bad_directory_or_record(tmp_path, capsys):
    from enpire import realcell

    assert realcell.main(["agreement", "--dir", str(tmp_path / "none")]) == 2
    assert "not a cell's interface directory" in capsys.readouterr().err
    (tmp_path / "agreement.json").write_text('{"n": ')
    assert realcell.main(["agreement", "--dir", str(tmp_path)]) == 2
    assert "unreadable agreement record" in capsys.readouterr().err
    (tmp_path / "agreement.json").write_text('{"n": 2, "agree": 2}')
    assert realcell.main(["agreement", "--dir", str(tmp_path)]) == 0 and '"n": 2' in capsys.readouterr().out
