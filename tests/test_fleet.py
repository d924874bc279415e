"""The real fleet, end to end: daemon, cell processes, sandbox, verifier, scheduler, agent, blackboard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from bus.blackboard import Blackboard
from bus.records import CellRecord, EpisodeRecord, JobRecord, LeaseRecord

ROOT = Path(__file__).resolve().parent.parent

# Small and fast: judged on 30 held-out seeds, confirmed on 30 more.
FAST = """
[fleet]
budget_minutes = {budget}
target = 0.8
min_heldout = 30
progress_s = 2.0
[cells]
count = {cells}
task = "pusht"  # pinned: these tests check the Push-T run (the default is pin insertion)
[agents]
population = 6
seeds_per_candidate = 4
[scheduler]
promote_seeds = 30
lease_s = {lease_s}
heartbeat_s = 0.5
"""


FAKE_SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-fake-7Hq2ZtXk9LmN3pQr",
    "OPENAI_API_KEY": "sk-fake-openai-Vw8Yb4Cd6Ef2Gh",
    "ENPIRE_SECRET": "fleet-secret-Jk5Lm7No9Pq1",
    "HF_TOKEN": "hf_fakeTokenRs3Tu5Vw7",
}


def _start(tmp_path: Path, cells=2, budget=2.0, lease_s=60.0, extra=(), env=None) -> subprocess.Popen:
    config = tmp_path / "fleet.toml"
    config.write_text(FAST.format(budget=budget, cells=cells, lease_s=lease_s))
    return subprocess.Popen(
        [sys.executable, "-m", "enpire.fleet", "--config", str(config), "--state-dir", str(tmp_path / "state"),
         "--quiet", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _board(tmp_path: Path) -> Blackboard:
    return Blackboard(tmp_path / "state" / "blackboard.lmdb", readonly=True)


def _wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _episodes(tmp_path: Path) -> int:
    if not (tmp_path / "state" / "blackboard.lmdb").exists():
        return 0
    try:
        board = _board(tmp_path)
    except lmdb.Error:  # the daemon made the folder but LMDB has not yet written its data file's header
        return 0
    try:
        return board.counter("episodes")
    finally:
        board.close()


def _final_episodes(tmp_path: Path) -> list[tuple[str, int]]:
    """(job, seed) of each recorded episode of the final judging."""
    if _episodes(tmp_path) == 0:
        return []
    board = _board(tmp_path)
    try:
        return [(e.job_id, e.seed) for e in board.values("episodes", EpisodeRecord) if e.job_id.startswith("final-") and not e.flagged]
    finally:
        board.close()


def _check_ledger(board: Blackboard) -> None:
    """Every episode of every finished job is recorded exactly once; counters agree with records."""
    episodes = {k: v for k, v in board.items("episodes", EpisodeRecord)}
    assert board.counter("episodes") == len(episodes)
    for job in board.values("jobs", JobRecord):
        if job.done and not job.cancelled:
            recorded = [e for e in episodes.values() if e.job_id == job.job_id and not e.flagged]
            assert len(recorded) == len(job.seeds), job.job_id
            assert len({e.episode_id for e in recorded}) == len(recorded)


def _cell_environments(daemon_pid: int, timeout: float) -> list[bytes]:
    """The environments of the daemon's cell processes, read from /proc once they are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != daemon_pid:
                    continue
                if b"enpire.cell" in (stat.parent / "cmdline").read_bytes():
                    found.append((stat.parent / "environ").read_bytes())
            except (OSError, ValueError, IndexError):
                continue
        if found:
            return found
        time.sleep(0.2)
    return []


def test_short_fleet_run_improves_over_its_start(tmp_path):
    proc = _start(tmp_path, env={**os.environ, **FAKE_SECRETS})  # keys in the environment must leak nowhere
    cell_envs = _cell_environments(proc.pid, timeout=60)
    # Ctrl-C during the final judging, once a few of its episodes are recorded: the run keeps its outcome
    _wait_for(lambda: proc.poll() is not None or len(_final_episodes(tmp_path)) >= 4, 240, "the final judging")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert cell_envs, "no cell process seen"
    for environ in cell_envs:  # cells need no model key: they never get one
        assert not any(value.encode() in environ for value in FAKE_SECRETS.values())
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
    report = json.loads((tmp_path / "state" / "report.json").read_text())
    champion = report["champion"]
    # The agent started from no policy (0% success); the champion now succeeds on held-out seeds.
    assert champion["policy"] and champion["heldout_confirm"]["n"] >= 30
    assert champion["heldout_confirm"]["rate"] >= 0.8
    assert report["time_to_target_s"] > 0 and report["outcome"] == "target"
    assert report["start_vs_champion"] is None  # cut short
    assert set(report["cells"]) == {"cell-0", "cell-1"}
    assert 0.0 < report["mru"] <= 1.0
    assert report["regimes"]["agent-0"][0] == "tune"  # it starts by tuning its heuristic
    assert "held-out success" in out and "agent-0: regimes tune" in out
    board = _board(tmp_path)
    _check_ledger(board)
    # trajectories were recorded and read back as arrays
    some = next(e for e in board.values("episodes", EpisodeRecord) if e.trajectory_file)
    import numpy as np

    data = np.load(tmp_path / "state" / some.trajectory_file)
    assert data["observations"].shape[1] == 5 and data["actions"].shape[1] == 2
    board.close()
    # the report CLI draws the run
    r = subprocess.run([sys.executable, "-m", "enpire.report", "--state-dir", str(tmp_path / "state")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("success.png", "success_robot_hours.png", "cells.png"):
        png = tmp_path / "state" / "report" / name
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert not (tmp_path / "state" / "report" / "tokens.png").exists()  # built-in agents use no tokens
    summary = (tmp_path / "state" / "report" / "summary.md").read_text()
    assert "champion" in summary and "held-out" in summary
    # No secret in any log line, finding, digest, error, report, workspace object or episode file.
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in FAKE_SECRETS.values():
                assert value.encode() not in data, f"{value} leaked into {path}"
    for value in FAKE_SECRETS.values():
        assert value not in out and value not in err
    # the state directory is private to its user
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0
    # Started again: the final judging alone goes on, on the seeds it drew; the run's own figures stay.
    cut = _final_episodes(tmp_path)
    again = _start(tmp_path)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert "its final judging did not finish" in err and "started from" in out
    resumed = json.loads((tmp_path / "state" / "report.json").read_text())
    assert {k: resumed[k] for k in ("elapsed_s", "time_to_target_s", "mru", "cells")} == \
        {k: report[k] for k in ("elapsed_s", "time_to_target_s", "mru", "cells")}
    final, finals = resumed["start_vs_champion"], _final_episodes(tmp_path)
    assert final["start"]["n"] == final["champion"]["n"] == 100 and final["champion"]["rate"] >= 0.8
    assert set(cut) <= set(finals) and len(finals) == len(set(finals)) == 200  # none ran twice
    # Started again on the finished state: one line saying the target was met, and nothing recorded changes.
    before, episodes = (tmp_path / "state" / "report.json").read_bytes(), _episodes(tmp_path)
    again = _start(tmp_path)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert err.count("\n") == 1 and "the target was already met here" in err and champion["policy"] in err
    assert (tmp_path / "state" / "report.json").read_bytes() == before
    assert _episodes(tmp_path) == episodes


def _stop_holding_a_lease(tmp_path: Path, cell: CellRecord, tries: int = 50) -> None:
    """SIGSTOP the cell at a moment its last lease has no recorded result: mid-episode, not between leases
    (a cell stopped while idle holds nothing to requeue)."""
    for _ in range(tries):
        os.kill(cell.pid, signal.SIGSTOP)
        time.sleep(0.3)  # a report already sent gets recorded meanwhile
        board = _board(tmp_path)
        try:
            leases = [lease for lease in board.values("leases", LeaseRecord) if lease.cell_id == cell.cell_id]
            last = max(leases, key=lambda lease: lease.granted, default=None)
            if last and board.get("episodes", last.episode_id, EpisodeRecord) is None:
                return
        finally:
            board.close()
        os.kill(cell.pid, signal.SIGCONT)
        time.sleep(0.2)
    raise AssertionError(f"{cell.cell_id} held no lease at any of {tries} tries")


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_cell_fault_mid_episode_loses_nothing(tmp_path, fault):
    proc = _start(tmp_path, budget=2.0, lease_s=3.0)
    try:
        _wait_for(lambda: _episodes(tmp_path) >= 20, 120, "episodes to flow")
        board = _board(tmp_path)
        victim = board.get("cells", "cell-0", CellRecord)
        board.close()
        _stop_holding_a_lease(tmp_path, victim)
        if fault == "kill":
            os.kill(victim.pid, signal.SIGKILL)
        before = _episodes(tmp_path)
        _wait_for(lambda: _episodes(tmp_path) >= before + 30, 120, "the fleet to go on")
        if fault == "freeze":
            os.kill(victim.pid, signal.SIGCONT)  # it wakes up and reports a result someone else recorded
            time.sleep(2)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 3), err[-3000:]
    board = _board(tmp_path)
    _check_ledger(board)
    assert board.counter("episodes_requeued") >= 1
    board.close()


def test_a_final_judging_or_a_report_of_another_start_is_not_taken_for_this_runs(tmp_path):
    """The final judging on the board counts only for the champion it judged; a report.json resumes a
    final judging only when it says the run met its target (an earlier start's, stopped by a signal or
    its budget, does not)."""
    from bus.messages import PolicySpec
    from bus.records import Champion, FinalRecord
    from enpire.fleet import _run_figures, current_final

    start, c1, c2 = PolicySpec("s"), PolicySpec("c1"), PolicySpec("c2")
    board = Blackboard(tmp_path / "bb")
    record = FinalRecord("pusht", [1, 2], start, 0, 2, c1, 2, 2, 0.0)
    board.put("meta", "final", record)
    board.put("champion", "pusht", Champion("pusht", c1, 30, 30, 0.0))
    assert current_final(board, "pusht") == record and current_final(board, "other") is None
    board.put("champion", "pusht", Champion("pusht", c2, 30, 30, 0.0))  # the run went on to another champion
    assert current_final(board, "pusht") is None
    board.close()
    cells = {"cell-0": {"mru": 0.9, "agent_share": 0.8, "wall_s": 10.0, "by_state_s": {"running": 9.0}}}
    figures = {"outcome": "target", "elapsed_s": 50.0, "time_to_target_s": 40.0, "mru": 0.9, "cells": cells,
               "actor_restarts": {}, "champion": {"policy": "c2"}}
    report = tmp_path / "report.json"
    for change, resumable in (({}, True), ({"outcome": "signal"}, False), ({"time_to_target_s": None}, False),
                              ({"mru": "high"}, False), ({"cells": []}, False)):
        report.write_text(json.dumps({**figures, **change}))
        assert (_run_figures(report) is not None) == resumable, change
    assert _run_figures(tmp_path / "missing.json") is None
    # killed after its final judging, before the last report: a start again fills it in, and touches nothing else
    from enpire import config as cfg
    from enpire.fleet import completed_report

    board = Blackboard(tmp_path / "bb")
    board.put("meta", "final", FinalRecord("pusht", [1, 2], start, 0, 2, c2, 2, 2, 0.0))
    config = cfg.with_overrides(cfg.Config(), **{"cells.task": "pusht"})
    report.write_text(json.dumps({**figures, "start_vs_champion": None}))
    completed_report(tmp_path, board, config)
    done = json.loads(report.read_text())
    assert done["start_vs_champion"]["champion"]["successes"] == 2 and done["mru"] == 0.9
    before = report.read_bytes()
    completed_report(tmp_path, board, config)  # complete already: not written again
    assert report.read_bytes() == before
    board.close()
    report.write_text(json.dumps(figures))
    assert "champion" not in _run_figures(report)  # only the run's own figures are carried over
