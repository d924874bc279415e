"""Soak test with fault injection: run the real fleet for N minutes while breaking it, then audit it.

    python bench/soak.py [--minutes 30] [--ci] [--cells 3] [--seed 0] [--state-dir DIR]

Faults, drawn at random every few seconds: SIGKILL of a cell, SIGSTOP of a cell for longer than its
lease, SIGKILL of the daemon followed by a restart on the same state directory, garbage and truncated
frames (and well-formed frames without the fleet's key) sent to every bus endpoint. The blackboard
starts with a 1 MiB map so it must grow several times while the fleet writes.

At the end the state is audited: every episode id ever leased has exactly one recorded result (or
its job is still open and will run on resume), no episode is counted twice, every finding and token
record ever seen is still there, the champion's tallies match the episodes behind them, and the
fleet made progress. Prints one JSON object; exits 1 when the audit fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pynng  # noqa: E402

from bus import messages as m  # noqa: E402
from bus.blackboard import Blackboard  # noqa: E402
from bus.records import CellRecord, Champion, EpisodeRecord, Finding, JobRecord, LeaseRecord  # noqa: E402
from bus.transport import ipc_url  # noqa: E402

CONFIG = """
[fleet]
budget_minutes = 600
stop_at_target = false
target = 1.0  # never "done": the agent keeps searching and idle cells keep confirming
map_size_mb = 1
progress_s = 5.0
[cells]
count = {cells}
[agents]
population = 6
seeds_per_candidate = 4
[scheduler]
promote_seeds = 30
lease_s = {lease_s}
heartbeat_s = 0.5
[tasks.pusht]
heldout_seeds = {{ start = 1000000, count = 1000000 }}
"""


class Fleet:
    """The daemon process under test."""

    def __init__(self, state: Path, config: Path):
        self.state, self.config = state, config
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "enpire.fleet", "--config", str(self.config), "--state-dir", str(self.state),
             "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1

    def board(self) -> Blackboard | None:
        path = self.state / "blackboard.lmdb"
        return Blackboard(path, readonly=True) if path.exists() else None

    def counter(self, name: str) -> int:
        board = self.board()
        if board is None:
            return 0
        try:
            return board.counter(name)
        finally:
            board.close()

    def cell_pids(self) -> list[int]:
        board = self.board()
        if board is None:
            return []
        try:
            return [c.pid for c in board.values("cells", CellRecord) if _alive(c.pid)]
        finally:
            board.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _garbage(url: str, rng: random.Random) -> int:
    """Send junk to an endpoint; returns how many frames were answered (refusals count)."""
    valid = m.encode(m.Envelope(id="soak", sender="soak", body=m.LeaseRequest(cell_id="intruder")))
    frames = [rng.randbytes(rng.randint(0, 2000)), valid[: rng.randint(1, len(valid) - 1)], valid, b""]
    answered = 0
    with pynng.Req0(recv_timeout=2000, send_timeout=2000) as sock:
        sock.dial(url, block=False)
        for frame in frames:
            try:
                sock.send(frame)
                sock.recv()
                answered += 1
            except pynng.NNGException:
                pass
    return answered


def _wait_progress(fleet: Fleet, before: int, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if fleet.counter("episodes") > before:
            return True
        time.sleep(0.5)
    return False


def audit(state: Path, seen_findings: int, seen_tokens: int) -> dict:
    board = Blackboard(state / "blackboard.lmdb", readonly=True)
    try:
        episodes = dict(board.items("episodes", EpisodeRecord))
        jobs = dict(board.items("jobs", JobRecord))
        leased = {r.episode_id: r.job_id for r in board.values("leases", LeaseRecord)}
        lost, open_ = [], 0
        for episode_id, job_id in leased.items():
            if episode_id in episodes:
                continue
            job = jobs.get(job_id)
            if job is not None and not job.done:
                open_ += 1  # still queued: a restart runs it
            elif job is not None and any(e.job_id == job_id and e.flagged for e in episodes.values()):
                continue  # replaced after a success-at-reset flag
            else:
                lost.append(episode_id)
        duplicates = board.counter("episodes") - len(episodes)
        files = Counter(e.trajectory_file for e in episodes.values() if e.trajectory_file)
        duplicates += sum(n - 1 for n in files.values())
        finding_keys = [k for k, _ in board.items("findings", Finding)]
        findings_ok = finding_keys == [f"{i:012d}" for i in range(1, len(finding_keys) + 1)] and len(
            finding_keys) >= seen_findings
        tokens_ok = board.count("tokens") >= seen_tokens
        champion = board.get("champion", "pusht", Champion)
        champion_ok, champion_detail = True, "no champion"
        if champion is not None:
            confirm = [e for e in episodes.values() if e.kind == "background" and e.policy == champion.policy
                       and not e.flagged and jobs.get(e.job_id) is not None and jobs[e.job_id].done]
            judged = [e for e in episodes.values() if e.kind == "heldout" and e.policy == champion.policy
                      and not e.flagged]
            champion_ok = (champion.n == len(confirm) and champion.successes == sum(e.verdict.success for e in confirm)
                           and champion.judged_n <= len(judged))
            champion_detail = (f"confirmed {champion.successes}/{champion.n} vs episodes "
                               f"{sum(e.verdict.success for e in confirm)}/{len(confirm)}; judged "
                               f"{champion.judged_successes}/{champion.judged_n}")
        return {
            "episodes_recorded": len(episodes), "episodes_leased": len(leased), "episodes_open": open_,
            "episodes_lost": len(lost), "lost_ids": lost[:10], "duplicates": duplicates,
            "findings": len(finding_keys), "findings_intact": findings_ok, "tokens_intact": tokens_ok,
            "champion_consistent": champion_ok, "champion": champion_detail,
            "blackboard_file_mb": round((state / "blackboard.lmdb" / "data.mdb").stat().st_size / 2**20, 2),
            "blackboard_grown": (state / "logs" / "fleet.jsonl").read_text().count('"blackboard_grown"'),
        }
    finally:
        board.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--ci", action="store_true", help="2-minute mode")
    p.add_argument("--cells", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", type=Path)
    args = p.parse_args(argv)
    minutes = 2.0 if args.ci else args.minutes
    rng = random.Random(args.seed)
    tmp = None
    if args.state_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.state_dir = Path(tmp.name) / "state"
    lease_s = 4.0
    config = args.state_dir.parent / "soak.toml"
    args.state_dir.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG.format(cells=args.cells, lease_s=lease_s))
    fleet = Fleet(args.state_dir, config)
    fleet.start()
    injected, survived = Counter(), Counter()
    rss = {"daemon_mb": 0.0, "cell_mb": 0.0}
    seen_findings = seen_tokens = 0
    started = time.time()
    deadline = started + minutes * 60
    _wait_progress(fleet, 0, 120)
    while time.time() < deadline:
        time.sleep(rng.uniform(3.0, 8.0) if not args.ci else rng.uniform(2.0, 4.0))
        rss["daemon_mb"] = max(rss["daemon_mb"], _rss_mb(fleet.proc.pid))
        for pid in fleet.cell_pids():
            rss["cell_mb"] = max(rss["cell_mb"], _rss_mb(pid))
        board = fleet.board()
        seen_findings, seen_tokens = max(seen_findings, board.count("findings")), max(seen_tokens, board.count("tokens"))
        board.close()
        before = fleet.counter("episodes")
        kind = rng.choice(["kill_cell", "stop_cell", "kill_daemon", "garbage"])
        pids = fleet.cell_pids()
        if kind in ("kill_cell", "stop_cell") and not pids:
            kind = "garbage"
        if kind == "kill_cell":
            os.kill(rng.choice(pids), signal.SIGKILL)
        elif kind == "stop_cell":
            pid = rng.choice(pids)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(lease_s + 2.0)  # past its lease: the episode must go to another cell
            os.kill(pid, signal.SIGCONT)
        elif kind == "kill_daemon":
            fleet.proc.kill()
            fleet.proc.wait()
            time.sleep(1.0)
            fleet.start()
        else:
            _garbage(ipc_url(args.state_dir, "bus"), rng)
        injected[kind] += 1
        if _wait_progress(fleet, before, 90):
            survived[kind] += 1
    # Stop gracefully and audit.
    fleet.proc.send_signal(signal.SIGTERM)
    try:
        code = fleet.proc.wait(30)
    except subprocess.TimeoutExpired:
        fleet.proc.kill()
        code = "killed after 30 s"
    result = {
        "minutes": minutes, "cells": args.cells, "daemon_starts": fleet.starts,
        "faults_injected": dict(injected), "faults_survived": dict(survived),
        "model_errors": "not injected: the built-in agent makes no model calls",
        "final_exit_code": code, "max_rss": {k: round(v, 1) for k, v in rss.items()},
        **audit(args.state_dir, seen_findings, seen_tokens),
    }
    result["progress"] = result["episodes_recorded"] > 0 and result["champion"] != "no champion"
    result["ok"] = (result["episodes_lost"] == 0 and result["duplicates"] == 0 and result["findings_intact"]
                    and result["tokens_intact"] and result["champion_consistent"] and result["progress"]
                    and injected == survived)
    print(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
