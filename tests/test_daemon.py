"""The daemon as people run it: bad configs, graceful stop, resume after SIGKILL, status, remote cells."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fleet import FAST, ROOT, _board, _check_ledger, _episodes, _final_episodes, _start, _wait_for

from bus.records import Champion, EpisodeRecord


def _run(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cells]\ncount = -3\n")
    r = _run("enpire.fleet", "--config", str(bad), "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.toml" in lines[0] and "cells.count" in lines[0]
    r = _run("enpire.fleet", "--cells", "-1", "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "cells.count" in r.stderr
    for command in (("enpire.fleet", "--cells", "abc"), ("enpire", "status", "--nosuch")):  # argparse's own errors too
        r = _run(*command, "--state-dir", str(tmp_path / "s"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "argument --cells: invalid int value: 'abc'" in _run("enpire.fleet", "--cells", "abc").stderr
    r = _run("enpire", "status", "--state-dir", str(tmp_path), "--seconds", "3")  # a flag only --follow reads
    assert r.returncode == 2 and r.stderr.strip().endswith("--seconds is for --follow (how long to follow); without "
                                                           "it status prints once"), r.stderr
    assert not (tmp_path / "s").exists()  # nothing was created for a run that never started


@pytest.mark.parametrize("flag", ["--act-timeout -1", "--max-missed 0", "--rt-priority 200", "--memory-mb -5",
                                  "--pids 0", "--connect-timeout nan", "--connect-timeout -3", "--spot-check 2"])
def test_a_cell_with_a_flag_out_of_range_is_refused_in_one_line(flag, capsys):
    """A cell joining with --act-timeout -1 ran and failed every episode it was given (held-out ones too)."""
    from enpire import cell

    name = flag.split()[0]
    with pytest.raises(SystemExit) as exit_:
        cell.parse_args(["--cell-id", "c", "--connect", "tcp://127.0.0.1:1", *flag.split()])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and f"argument {name}: " in err[0] and "outside" in err[0], err
    assert cell.parse_args(["--cell-id", "c", "--connect", "tcp://127.0.0.1:1"]).act_timeout == 0.05  # defaults pass


def test_a_fleet_that_could_do_no_work_is_refused_at_start(tmp_path):
    r = _run("enpire.fleet", "--cells", "0", "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cells.count is 0 and bus.listen is empty" in r.stderr
    r = _run("enpire.fleet", "--agents", "0", "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "agents.count is 0 and fleet.baseline is empty" in r.stderr
    assert not (tmp_path / "s").exists()
    from enpire import config as cfg
    from enpire.fleet import idle_fleet

    unpooled = cfg.with_overrides(cfg.Config(), **{"scheduler.pooled": False, "cells.count": 2, "agents.count": 3})
    assert "agent-2 would wait forever" in idle_fleet(unpooled)
    assert idle_fleet(cfg.with_overrides(unpooled, **{"agents.count": 2})) is None
    assert idle_fleet(cfg.with_overrides(unpooled, **{"bus.listen": "tcp://127.0.0.1:7700"})) is None  # remote cells


def test_leases_shorter_than_an_episode_are_warned_about():
    from enpire import config as cfg
    from enpire.fleet import short_lease

    assert short_lease(cfg.Config()) is None  # 60 s leases
    assert "below 1 s" in short_lease(cfg.with_overrides(cfg.Config(), **{"scheduler.lease_s": 0.01}))
    paced = cfg.with_overrides(cfg.Config(), **{"cells.task": "pusht", "scheduler.lease_s": 20.0})
    paced.tasks["pusht"].control_hz = 10.0  # 300 steps at 10 Hz
    assert "a full episode takes 30 s" in short_lease(paced)
    paced.scheduler.lease_s, paced.tasks["pusht"].attempts = 45.0, 2  # pass@2: one lease, two attempts
    assert "a full episode takes 60 s (2 attempts)" in short_lease(paced)


def test_a_fleet_without_cells_warns_and_progress_reaches_tensorboard(tmp_path):
    port = _free_port()
    config = tmp_path / "alone.toml"
    config.write_text(FAST.format(budget=0.15, cells=0, lease_s=30.0).replace("progress_s = 2.0", "progress_s = 1.0")
                      + f'[bus]\nlisten = "tcp://127.0.0.1:{port}"\nsecret_env = "FLEET_SECRET"\n')
    r = _run("enpire.fleet", "--config", str(config), "--state-dir", str(tmp_path / "state"), "--quiet",
             "--tensorboard", env=dict(os.environ, FLEET_SECRET="s3cret-for-this-test"))
    assert r.returncode == 3, r.stderr[-2000:]  # the budget ended: nobody came
    events = [json.loads(line) for line in (tmp_path / "state" / "logs" / "fleet.jsonl").read_text().splitlines()]
    warnings = [e for e in events if e["event"] == "no_cells"]
    assert warnings and warnings[0]["waiting_s"] >= 5 and warnings[0]["listen"].startswith("tcp://")
    assert any(e["event"] == "final_judging_skipped" for e in events)  # no cell: no wait for a final judging
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 4 and progress[-1]["time_left_s"] < progress[0]["time_left_s"] <= 9.0
    assert all(p["tokens"] == 0 for p in progress)  # the built-in agent uses no model
    from test_sinks import _scalars

    left = _scalars(tmp_path / "state" / "tensorboard")["fleet/time_left_s"]
    assert len(left) >= 4 and left[-1][1] < left[0][1]


def test_a_kill_during_the_final_judging_leaves_the_runs_figures_to_resume_it(tmp_path):
    """SIGKILL once the final judging runs: report.json already holds the run's own figures (written as the
    run ended), so a start again runs that judging alone, on the seeds it drew, and keeps those figures."""
    proc = _start(tmp_path)
    _wait_for(lambda: proc.poll() is not None or len(_final_episodes(tmp_path)) >= 4, 240, "the final judging")
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.kill()
    proc.communicate(timeout=30)
    report = json.loads((tmp_path / "state" / "report.json").read_text())
    assert report["outcome"] == "target" and report["time_to_target_s"] > 0 and report["start_vs_champion"] is None
    events = [json.loads(line) for line in (tmp_path / "state" / "logs" / "fleet.jsonl").read_text().splitlines()]
    said = [(e["event"], e.get("decision") or e.get("outcome")) for e in events
            if e["event"] in ("confirmation_stopped", "run_ended", "final_judging_started")]
    assert said[-3:] == [("confirmation_stopped", "met"), ("run_ended", "target"), ("final_judging_started", None)]
    cut = _final_episodes(tmp_path)
    again = _start(tmp_path)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-2000:]
    assert "its final judging did not finish" in err and "started from" in out
    resumed = json.loads((tmp_path / "state" / "report.json").read_text())
    figures = ("elapsed_s", "time_to_target_s", "mru", "cells")
    assert {k: resumed[k] for k in figures} == {k: report[k] for k in figures}
    final, finals = resumed["start_vs_champion"], _final_episodes(tmp_path)
    assert final["start"]["n"] == final["champion"]["n"] == 100
    assert set(cut) <= set(finals) and len(finals) == len(set(finals)) == 200  # none ran twice
    assert not (tmp_path / "state" / "report.json.part").exists()


def test_print_config_shows_the_effective_configuration(tmp_path):
    r = _run("enpire.fleet", "--print-config", "--cells", "5", "--target", "0.7")
    assert r.returncode == 0
    assert "count = 5" in r.stdout and "target = 0.7" in r.stdout and "[tasks.pusht]" in r.stdout


def test_incompatible_state_dir_is_refused(tmp_path):
    from bus.blackboard import Blackboard
    from bus.records import Meta

    board = Blackboard(tmp_path / "state" / "blackboard.lmdb")
    board.put("meta", "meta", Meta(schema_version=999, run_id="old", created=0.0))
    board.close()
    r = _run("enpire.fleet", "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 2 and "schema version 999" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_baseline_folder_with_weights_is_committed_as_bytes_and_one_too_large_is_refused(tmp_path):
    from bus.blackboard import Blackboard
    from enpire import config as cfg
    from enpire.fleet import _baseline
    from enpire.workspace import MAX_FILE_BYTES, Workspace

    root = tmp_path / "start"
    (root / ".git").mkdir(parents=True)
    (root / "policy.py").write_text("def act(obs):\n    return [0.0, 0.0]\n")
    weights = bytes(range(256)) * 64  # not UTF-8: a starting policy's weights
    (root / "weights.npz").write_bytes(weights)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # a folder that is a git checkout
    config = cfg.with_overrides(cfg.Config(), **{"fleet.baseline": str(root)})
    workspace, board = Workspace(tmp_path / "ws"), Blackboard(tmp_path / "board.lmdb")
    spec = _baseline(config, workspace, board)
    files = workspace.read_bytes(spec.commit)
    assert files["policy.py"] == b"def act(obs):\n    return [0.0, 0.0]\n" and files["weights.npz"] == weights
    assert not any(name.startswith(".git") for name in files)
    board.close()

    (root / "weights.npz").write_bytes(b"\0" * (MAX_FILE_BYTES + 1))
    config_file = tmp_path / "big.toml"
    config_file.write_text(f'[fleet]\nbaseline = "{root}"\n')
    r = _run("enpire.fleet", "--config", str(config_file), "--state-dir", str(tmp_path / "state"), "--cells", "1",
             "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "fleet.baseline" in lines[0] and "weights.npz" in lines[0], r.stderr


def test_second_daemon_on_the_same_state_dir_is_refused_and_the_first_keeps_running(tmp_path):
    from enpire.statelock import StateLock

    proc = _start(tmp_path, cells=1, budget=3.0)
    try:
        _wait_for(lambda: _episodes(tmp_path) >= 3, 120, "episodes")
        r = _run("enpire.fleet", "--state-dir", str(tmp_path / "state"), "--cells", "1", "--quiet")
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {proc.pid}" in lines[0] and str(tmp_path / "state") in lines[0], lines
        before = _episodes(tmp_path)
        _wait_for(lambda: _episodes(tmp_path) >= before + 3, 60, "the first daemon to keep recording")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    StateLock(tmp_path / "state").acquire().release()  # freed when the daemon ended


def test_state_dir_that_cannot_be_used_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    r = _run("enpire.fleet", "--state-dir", str(tmp_path / "afile"), "--quiet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "afile" in r.stderr, r.stderr
    (tmp_path / "s" / "blackboard.lmdb").mkdir(parents=True)
    (tmp_path / "s" / "blackboard.lmdb" / "data.mdb").write_text("junk")
    r = _run("enpire.fleet", "--state-dir", str(tmp_path / "s"), "--quiet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "blackboard" in r.stderr, r.stderr


def test_a_taken_listen_address_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(FAST.format(budget=1.0, cells=1, lease_s=30.0) + f'[bus]\nlisten = "tcp://127.0.0.1:{port}"\n')
        r = _run("enpire.fleet", "--config", str(config), "--state-dir", str(tmp_path / "state"), "--quiet",
                 env=dict(os.environ, ENPIRE_SECRET="s"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bus.listen" in lines[0] and "Address in use" in lines[0], lines


def _start_endless(tmp_path: Path) -> subprocess.Popen:
    """A daemon whose cells keep working for the whole test. FAST's target (0.8) can be met and confirmed
    within seconds, after which the agents rest and the cells go idle; 0.99 is beyond the built-in
    agent's goal (target plus its margin, above 1), and 200 held-out episodes make it a target a
    confirmation could show (so the config is accepted)."""
    config = tmp_path / "endless.toml"
    text = FAST.format(budget=5.0, cells=2, lease_s=60.0).replace("[fleet]\n", "[fleet]\nstop_at_target = false\n", 1)
    text = text.replace("target = 0.8\n", "target = 0.99\n").replace("min_heldout = 30\n", "min_heldout = 200\n")
    assert "target = 0.99" in text and "min_heldout = 200" in text
    config.write_text(text)
    return _start(tmp_path, budget=5.0, extra=("--config", str(config)))


def test_sigterm_drains_within_ten_seconds_and_keeps_the_data(tmp_path):
    proc = _start_endless(tmp_path)
    _wait_for(lambda: _episodes(tmp_path) >= 20, 120, "episodes")
    # status works from another terminal while it runs
    r = _run("enpire.status", "--state-dir", str(tmp_path / "state"), "--json")
    status = json.loads(r.stdout)
    assert status["daemon"]["state"] == "running" and status["episodes"] >= 20
    assert set(status["cells"]) == {"cell-0", "cell-1"}
    assert status["daemon"]["time_left_s"] > 0
    # --follow: the daemon's changes as they happen, over the bus (progress comes every 2 s here; a cell's
    # state reaches the queue with its heartbeat, once a second, and mostly reads "running": 10 s, not 4,
    # so that a change is seen even on a loaded machine)
    r = _run("enpire.status", "--state-dir", str(tmp_path / "state"), "--follow", "--seconds", "10")
    assert r.returncode == 0 and "followed for 10 s" in r.stderr, r.stderr[-2000:]
    followed = r.stdout.split("findings: ", 1)[1].splitlines()[1:]  # after the snapshot
    assert any(" progress: " in line for line in followed) and any(" cell cell-" in line for line in followed), followed

    def busy_cells():  # the cells' live state (written when it changes), not "idle" while they work
        from enpire.status import collect

        cells = collect(tmp_path / "state")["cells"].values()
        return [c["state"] for c in cells if c["state"] in ("running", "resetting", "verifying")]

    _wait_for(busy_cells, 20, "status to show a working cell")
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.time() - t < 10.0
    assert proc.returncode == 130, err[-2000:]
    board = _board(tmp_path)
    _check_ledger(board)
    recorded = board.counter("episodes")
    board.close()
    assert recorded >= 20
    report = json.loads((tmp_path / "state" / "report.json").read_text())
    assert report["outcome"] == "signal" and report["episodes"] == recorded
    r = _run("enpire.status", "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 0 and "stopped: signal" in r.stdout
    # no cell or sandbox process of this fleet outlives the daemon
    time.sleep(1.0)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "state") not in ps


def test_a_second_stop_signal_during_the_drain_is_ignored(tmp_path):
    """Ctrl-C twice, or a supervisor that repeats SIGTERM: the first stops the run, the rest are read and
    logged, and the drain still ends with the summary and report.json (they once killed it mid-drain)."""
    proc = _start_endless(tmp_path)
    _wait_for(lambda: _episodes(tmp_path) >= 10, 120, "episodes")
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
        proc.send_signal(sig)
        time.sleep(0.003)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # during the cells' drain
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    report = json.loads((tmp_path / "state" / "report.json").read_text())
    assert report["outcome"] == "signal" and "champion" in out.lower()
    events = [json.loads(line)["event"] for line in (tmp_path / "state" / "logs" / "fleet.jsonl").read_text().splitlines()]
    assert events.count("stopping") == 1 and "signal_ignored" in events


def test_sigkill_then_restart_resumes_without_loss_or_duplicates(tmp_path):
    proc = _start(tmp_path, budget=5.0)
    _wait_for(lambda: _episodes(tmp_path) >= 40, 120, "episodes")
    proc.kill()  # the daemon dies at once; its cells notice and exit
    proc.wait()
    board = _board(tmp_path)
    before = {k: v.seed for k, v in board.items("episodes", EpisodeRecord)}
    champion_before = board.get("champion", "pusht", Champion)
    findings_before = board.count("findings")
    board.close()
    proc = _start(tmp_path, budget=5.0)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    board = _board(tmp_path)
    _check_ledger(board)
    after = {k: v.seed for k, v in board.items("episodes", EpisodeRecord)}
    assert all(after[k] == seed for k, seed in before.items())  # nothing recorded before was lost or redone
    assert board.count("findings") >= findings_before
    if champion_before is not None:
        assert board.get("champion", "pusht", Champion) is not None
    board.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_cell_over_tcp_needs_the_shared_secret(tmp_path):
    port = _free_port()
    config = tmp_path / "remote.toml"
    config.write_text(FAST.format(budget=3.0, cells=0, lease_s=30.0)
                      + f'[bus]\nlisten = "tcp://127.0.0.1:{port}"\nsecret_env = "FLEET_SECRET"\n')
    env = dict(os.environ, FLEET_SECRET="correct horse battery staple")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "enpire.fleet", "--config", str(config), "--state-dir", str(tmp_path / "state"),
         "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"tcp://127.0.0.1:{port}"
    try:
        wrong = _run("enpire.cell", "--connect", url, "--cell-id", "intruder", "--connect-timeout", "20",
                     env=dict(os.environ, ENPIRE_SECRET="guess"))
        assert wrong.returncode == 3 and "refused" in wrong.stderr
        (tmp := tmp_path / "tmp").mkdir()  # where the cell makes its own scratch folder (no --scratch)
        good = subprocess.Popen(
            [sys.executable, "-m", "enpire.cell", "--connect", url, "--cell-id", "remote-1"],
            cwd=ROOT, env=dict(os.environ, ENPIRE_SECRET="correct horse battery staple", TMPDIR=str(tmp)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: _episodes(tmp_path) >= 10, 120, "the remote cell to run episodes")
            assert [p.name for p in tmp.iterdir() if p.name.startswith("enpire-remote-1-")]
        finally:
            good.terminate()
            good.wait(10)
        # SIGTERM stops it the way Ctrl-C does: what it held is let go (its scratch folder is gone), exit 130
        assert good.returncode == 130 and not [p for p in tmp.iterdir() if p.name.startswith("enpire-remote-1-")]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    board = _board(tmp_path)
    cells = {e.cell_id for e in board.values("episodes", EpisodeRecord)}
    board.close()
    assert cells == {"remote-1"}
    log = (tmp_path / "state" / "logs" / "fleet.jsonl").read_text()
    assert "frame_unauthenticated" in log
    assert "correct horse" not in log


def test_an_emptied_blackboard_beside_a_runs_files_is_refused(tmp_path):
    """data.mdb emptied or replaced while episodes and the workspace remain: a new run there would orphan
    the old one's records and draw a new held-out order; refused in one line, nothing touched."""
    from enpire.fleet import StateDirError, open_state_dir

    state = tmp_path / "state"
    board, meta = open_state_dir(state)
    board.close()
    (state / "episodes").mkdir()
    (state / "episodes" / "e1.npz").write_bytes(b"x")
    (state / "blackboard.lmdb" / "data.mdb").write_bytes(b"")
    with pytest.raises(StateDirError) as e:
        open_state_dir(state)
    assert "emptied or replaced" in str(e.value) and "episodes" in str(e.value) and "\n" not in str(e.value)
    assert (state / "episodes" / "e1.npz").read_bytes() == b"x"


def test_stop_at_target_false_runs_the_whole_budget_past_a_met_target(tmp_path):
    """FAST's target (0.8) is met and confirmed within seconds; with stop_at_target = false the run goes on
    to its budget (benchmarks, soaks), and says it ended on the budget with the target met."""
    config = tmp_path / "on.toml"
    config.write_text(FAST.format(budget=0.8, cells=2, lease_s=30.0).replace(
        "[fleet]\n", "[fleet]\nstop_at_target = false\nfinal_seeds = 10\n", 1))
    r = _run("enpire.fleet", "--config", str(config), "--state-dir", str(tmp_path / "state"), "--quiet", timeout=180)
    report = json.loads((tmp_path / "state" / "report.json").read_text())
    assert r.returncode == 3 and report["outcome"] == "budget" and report["elapsed_s"] >= 0.8 * 60 - 1, r.stderr[-2000:]
    assert report["champion"]["decision"] == "met"  # the target was met early, and the run went on
