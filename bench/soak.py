"""Soak test with fault injection: run the real fleet for N minutes while breaking it, then audit it.

    python bench/soak.py [--minutes 30] [--ci] [--cells 3] [--agents 2] [--seed 0] [--state-dir DIR]

The agents are model-driven: the `openai` backend (official SDK) configured through enpire.toml as a
user would (`base_url`, `api_key_env`, `request_timeout_s`, `max_failures`, `pause_s`), pointed at
`bench/model_sim.py` served from this process on 127.0.0.1, so it outlives every daemon kill. The key
is a fake one made per run and passed only in the daemon's environment. The simulator answers fast
(0.05 s per reply, 200k input and 5k output tokens/s): the soak is about faults, not latency.
Episodes are cut to 100 steps, where the heuristic policy succeeds about half the time: the champion
stays short of the target (1.0), so the agents never idle and keep calling the model.

Faults, drawn every few seconds from a shuffled bag of every kind (each kind once per round):
SIGKILL of a cell, SIGSTOP of a cell for longer than its lease, SIGKILL of the daemon followed by a
restart on the same state directory, garbage and truncated frames (and well-formed frames without the
fleet's key) sent to every bus endpoint, and model backend errors met by the next model request: 429
with retry-after, 500 echoing the Authorization header, a timeout (held past the client's timeout),
a completion cut off mid-JSON, valid JSON that is no completion, and an outage (`max_failures` errors
in a row to one agent, which must pause that agent and not the fleet). The blackboard starts with a
1 MiB map so it must grow several times while the fleet writes.

Hostile policies (tests/adversarial/: the audit-hook bypass with a setsid grandchild, the stale-frame
flood, a connect to the bus socket, a 1 MB reason, scratch filling, memfd hoarding, SIGXCPU ignored,
...) are committed by the simulated team and evaluated among its candidates, at least `HOSTILE_SHARE`
of its evaluate calls. After the run, `bench/replay.py` audits every recorded episode: its actions
must be what the policy it is recorded under does on its observations (and, for a sample, the
simulator must give back its observations and score), so an episode recorded under the wrong policy
(say, a survivor of an earlier sandbox swapping in its own code) is found. No process of any sandbox
may outlive the run.

A fault is survived when the fleet records new episodes afterwards (within 90 s); a model fault also
needs the agent it hit to get a later answer onto the token ledger (within 2 minutes), and an outage
needs episodes recorded between its last fault and that answer, i.e. while its agent was paused (the
fleet kept working; a paused agent holds no room in the queue, so its teammates keep thinking). The
JSON lists each fault not survived and why, and each outage's figures. At the end the state is audited: every episode id
ever leased has exactly one recorded result (or its job is still open and will run on resume), no
episode is counted twice, every finding and token record ever seen is still there, every agent has
token records and none more than the calls the simulator answered, rate limits were waited out,
the key appears in no file of the run nor in any policy sandbox's environment, the champion's
tallies match the episodes behind them, and the fleet made progress. Prints one JSON object; exits 1
when the audit fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pynng  # noqa: E402
from model_sim import (  # noqa: E402 (bench/)
    FAULT_KINDS,
    TEMPLATE_SOURCE,
    Fault,
    Faults,
    ModelSimulator,
    SearchConfig,
    Timing,
)
from replay import audit as replay_audit  # noqa: E402 (bench/)

from bus import messages as m  # noqa: E402
from bus.blackboard import Blackboard  # noqa: E402
from bus.records import (  # noqa: E402
    CandidateRecord,
    CellRecord,
    Champion,
    Confirmed,
    EpisodeRecord,
    Finding,
    JobRecord,
    LeaseRecord,
    Tallied,
    TokenRecord,
)
from bus.transport import ipc_url  # noqa: E402
from enpire import config as cfg  # noqa: E402
from enpire import leaderboard, queueing  # noqa: E402
from enpire.sandbox import CHILD_SCRIPT  # noqa: E402

KEY_ENV = "ENPIRE_SOAK_OPENAI_KEY"
FAST = Timing(overhead_s=0.05, input_tok_s=200_000.0, output_tok_s=5_000.0)
CLIENT = {"request_timeout_s": 5.0, "max_failures": 3, "pause_s": 10.0}  # [agents] keys of the backend
RETRY_AFTER_S = 2.0
ADVERSARIAL = ROOT / "tests" / "adversarial"
HOSTILE = ("hook_bypass_setsid", "stale_frame_flood", "bus_connect", "huge_reason", "scratch_fill", "memfd_hoard",
           "ignore_sigxcpu", "raise_memoryerror_subclass", "complex_action", "fork", "kill_parent", "tamper_hook")
HOSTILE_SHARE = 0.12  # of the team's evaluate calls (the issue asks for at least 10% of evaluations)
CI_CAP_S = 10 * 60
KINDS = ["kill_cell", "stop_cell", "kill_daemon", "garbage", *(f"model_{k}" for k in FAULT_KINDS), "model_outage"]

CONFIG = """
[fleet]
budget_minutes = 600
baseline = "{baseline}"  # the policy the simulated team starts from (the Push-T template), as in bench/mru_mtu.py
stop_at_target = false
target = 1.0  # never "done": the agent keeps searching and idle cells keep confirming
map_size_mb = 1
progress_s = 5.0
[cells]
count = {cells}
task = "pusht"
[agents]
count = {agents}
backend = "openai"
model = "sim-model"
base_url = "{base_url}"
api_key_env = "{key_env}"
request_timeout_s = {request_timeout_s}
max_failures = {max_failures}
pause_s = {pause_s}
[sandbox]
memory_mb = 512  # memfd hoarding (600 MB) must hit the limit
[scheduler]
promote_seeds = 30
lease_s = {lease_s}
heartbeat_s = 0.5
[tasks.pusht]
horizon = 100  # about half the episodes succeed: the champion stays below the target, the agents keep working
heldout_seeds = {{ start = 1000000, count = 1000000 }}
"""


class Fleet:
    """The daemon process under test."""

    def __init__(self, state: Path, config: Path, key: str):
        self.state, self.config = state, config
        self.env = {**os.environ, KEY_ENV: key}  # the model key exists only here, as a user would export it
        self.output = state.parent / "daemon.out"  # scanned for the key at the end
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "enpire.fleet", "--config", str(self.config), "--state-dir", str(self.state),
                 "--quiet"], cwd=ROOT, env=self.env, stdout=out, stderr=out)
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

    def answers_after(self, t: float) -> list[tuple[str, float]]:
        """(agent, time) of the model answers the ledger recorded after time t (among its last 50 records)."""
        board = self.board()
        if board is None:
            return []
        try:
            count = board.count("tokens")
            tail = board.items("tokens", TokenRecord, start=f"{max(0, count - 50):012d}")
            return [(r.agent, r.t) for _, r in tail if r.t > t]
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


def _wait(predicate, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def _model_fault(fleet: Fleet, faults: Faults, armed: list[Fault], outages: list[dict], timeout: float = 120.0) -> str:
    """Wait for the armed faults to fire and for their agent to get an answer onto the ledger again.

    An outage (`max_failures` faults in a row to one agent, which then pauses for `pause_s`) is survived
    when, besides, the fleet recorded episodes between the last fault and the agent's next answer: one
    agent's outage must not stop the robots (nor, through the pacing, its teammates). Each outage's
    figures go to `outages`. Returns "" or why the fault was not survived."""
    if not _wait(lambda: all(f.fired_at for f in armed), timeout):
        left = faults.disarm()
        return f"{len(left)} of {len(armed)} not fired in {timeout:.0f} s"  # no model request: the agents are stuck
    agent, last = armed[-1].fired_on, max(f.fired_at for f in armed)
    during = fleet.counter("episodes")
    if not _wait(lambda: any(a == agent for a, _ in fleet.answers_after(last)), timeout):
        return f"{agent} not answered within {timeout:.0f} s of the last fault"
    if len(armed) == 1:
        return ""
    answers = fleet.answers_after(last)
    back = min(t for a, t in answers if a == agent)
    outage = {"agent": agent, "silent_s": round(back - last, 1), "episodes": fleet.counter("episodes") - during,
              "teammate_answers": sum(a != agent and t < back for a, t in answers)}
    outages.append(outage)
    return "" if outage["episodes"] > 0 else f"no episode recorded while {agent} was paused ({outage})"


def _retry_after_honoured(sim: ModelSimulator, fired: list[Fault], retry_after_s: float) -> bool:
    """After a 429 the same agent's next request came no sooner than retry-after said."""
    requests = [(c.agent, c.t) for c in sim.calls] + [(f.fired_on, f.fired_at) for f in fired]
    for f in fired:
        if f.kind == "rate_limit":
            later = [t for agent, t in requests if agent == f.fired_on and t > f.fired_at]
            if later and min(later) - f.fired_at < retry_after_s - 0.05:
                return False
    return True


def _children(pid: int) -> list[int]:
    """Child processes, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def _holds(pid: int, secret: bytes) -> bool:
    try:
        return secret in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _files_with(paths, secret: bytes) -> list[str]:
    return [str(p) for p in paths if p.is_file() and secret in p.read_bytes()]


def hostile_policies() -> tuple[tuple[str, dict[str, str]], ...]:
    helper = (ADVERSARIAL / "hook_bypass.py").read_text()
    return tuple((name, {"policy.py": (ADVERSARIAL / f"{name}.py").read_text(), "hook_bypass.py": helper})
                 for name in HOSTILE)


def sandbox_processes() -> list[int]:
    """Live processes running the policy sandbox's child script (a policy or anything it forked)."""
    marker, found = str(CHILD_SCRIPT).encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def hostile_summary(state: Path, commits: set[str]) -> dict:
    board = Blackboard(state / "blackboard.lmdb", readonly=True)
    try:
        jobs = [j for j in board.values("jobs", JobRecord) if j.kind == "agent"]
        episodes = [e for e in board.values("episodes", EpisodeRecord) if e.kind == "agent"]
    finally:
        board.close()
    hostile_jobs = sum(j.policy.commit in commits for j in jobs)
    bad = [e for e in episodes if e.policy.commit in commits]
    return {
        "commits": len(commits), "evaluations": hostile_jobs, "evaluations_share": round(hostile_jobs / max(1, len(jobs)), 3),
        "episodes": len(bad), "episodes_share": round(len(bad) / max(1, len(episodes)), 3),
        "successes": sum(e.verdict.success for e in bad),
        "reasons": dict(Counter(e.verdict.reason.split(":")[0].split(" (")[0] for e in bad).most_common(12)),
    }


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
            elif job is not None and job.cancelled:
                continue  # its job was cancelled (the champion changed, or its confirmation stopped)
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
        tokens = board.values("tokens", TokenRecord)
        tokens_ok = len(tokens) >= seen_tokens
        champion = board.get("champion", "pusht", Champion)
        champion_ok, champion_detail = True, "no champion"
        marks = dict(board.items("tallied", Tallied))
        if champion is not None:
            # its confirmation: the jobs the judge marked counted, in all its reigns (a policy champion again
            # goes on with its tally, table "confirmed"); a finished job with no mark yet (the stop came
            # between "done" and its count) is counted when the fleet next starts
            reign = {j.job_id for j in jobs.values() if j.purpose is m.Purpose.CONFIRM and j.done and not j.cancelled
                     and j.policy == champion.policy}
            counted = {i for i in reign if i in marks and marks[i].counted}
            confirm = [e for e in episodes.values() if e.job_id in counted and queueing.counted(e)]
            tally = board.get("confirmed", leaderboard.key("pusht", champion.policy), Confirmed)
            # its judging on held-out seeds (after a rollback: its whole held-out record, confirmation included)
            judged = [e for e in episodes.values() if e.kind != "agent" and e.policy == champion.policy
                      and queueing.counted(e)]
            champion_ok = (champion.n == len(confirm) and champion.successes == sum(e.verdict.success for e in confirm)
                           and champion.judged_n <= len(judged)
                           and (tally is None or (tally.successes, tally.n) == (champion.successes, champion.n)))
            champion_detail = (f"confirmed {champion.successes}/{champion.n} vs episodes "
                               f"{sum(e.verdict.success for e in confirm)}/{len(confirm)}; judged "
                               f"{champion.judged_successes}/{champion.judged_n}; "
                               f"{len(reign - marks.keys())} finished jobs to count at the next start")
        # the leaderboard: each candidate's tally is the recorded episodes of its evaluations the judge counted
        counted_evals = {i for i, j in jobs.items() if j.purpose is m.Purpose.EVAL and i in marks}
        measured = Counter()
        for e in episodes.values():
            if e.job_id in counted_evals and queueing.counted(e):
                measured[e.policy.ref, "n"] += 1
                measured[e.policy.ref, "successes"] += e.verdict.success
        candidates = board.values("candidates", CandidateRecord)
        off = [c.policy.ref for c in candidates
               if (c.n, c.successes) != (measured[c.policy.ref, "n"], measured[c.policy.ref, "successes"])]
        return {
            "leaderboard_consistent": not off and sum(c.n for c in candidates) == sum(
                v for (_, what), v in measured.items() if what == "n"),
            "leaderboard": f"{len(candidates)} candidates, {sum(c.n for c in candidates)} episodes counted; "
                           f"{len(off)} off their recorded episodes {off[:3]}",
            "episodes_recorded": len(episodes), "episodes_leased": len(leased), "episodes_open": open_,
            "episodes_lost": len(lost), "lost_ids": lost[:10], "duplicates": duplicates,
            "findings": len(finding_keys), "findings_intact": findings_ok, "tokens_intact": tokens_ok,
            "token_records": dict(sorted(Counter(r.agent for r in tokens).items())),
            "champion_consistent": champion_ok, "champion": champion_detail,
            "blackboard_file_mb": round((state / "blackboard.lmdb" / "data.mdb").stat().st_size / 2**20, 2),
            "blackboard_grown": (state / "logs" / "fleet.jsonl").read_text().count('"blackboard_grown"'),
        }
    finally:
        board.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--ci", action="store_true", help="CI mode: 1 minute, then on until every fault kind ran once (at most 10 minutes)")
    p.add_argument("--cells", type=int, default=3)
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", type=Path)
    args = p.parse_args(argv)
    minutes = 1.0 if args.ci else args.minutes
    rng = random.Random(args.seed)
    tmp = None
    if args.state_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.state_dir = Path(tmp.name) / "state"
    lease_s = 4.0
    sim = ModelSimulator(FAST, SearchConfig(population=4, n_seeds=4, validation_seeds=8, target=0.5,
                                            hostile=hostile_policies(), hostile_share=HOSTILE_SHARE))
    sandboxes_before = set(sandbox_processes())
    sim.faults = faults = Faults(hold_s=CLIENT["request_timeout_s"] + 2.0, retry_after_s=RETRY_AFTER_S)
    key = "sk-soak-" + secrets.token_hex(16)  # fake, new every run: found anywhere in the run's files = a leak
    config = args.state_dir.parent / "soak.toml"
    baseline = args.state_dir.parent / "baseline"
    baseline.mkdir(parents=True, exist_ok=True)
    (baseline / "policy.py").write_text(TEMPLATE_SOURCE)
    config.write_text(CONFIG.format(cells=args.cells, agents=args.agents, lease_s=lease_s, base_url=sim.start(),
                                    key_env=KEY_ENV, baseline=baseline, **CLIENT))
    fleet = Fleet(args.state_dir, config, key)
    first = fleet.counter("episodes")  # a state dir resumed holds some already
    fleet.start()
    injected, survived = Counter(), Counter()
    failed: list[dict] = []  # the faults not survived: kind, seconds into the run, why
    outages: list[dict] = []  # per model outage: the agent, how long it was silent, what the fleet did meanwhile
    fired: list[Fault] = []
    bag: list[str] = []
    rss = {"daemon_mb": 0.0, "cell_mb": 0.0}
    sandboxes = [0, 0]  # policy processes seen, of which holding the key
    seen_findings = seen_tokens = 0
    started = time.time()
    deadline = started + minutes * 60
    _wait(lambda: fleet.proc.poll() is not None or fleet.counter("episodes") > first, 120)
    if fleet.counter("episodes") <= first:
        fleet.proc.kill()  # e.g. a state dir the daemon refuses: nothing to soak
        sim.stop()
        print(f"soak: the fleet recorded no episode (daemon exit code {fleet.proc.wait()}); see {fleet.output}",
              file=sys.stderr)
        return 2
    # CI mode: at least a minute, and on until every kind of fault was injected once. A fault may wait
    # minutes for its proof of survival, so a slow machine needs the room: none starts after ten minutes.
    cap = started + CI_CAP_S if args.ci else deadline
    while time.time() < deadline or (args.ci and time.time() < cap and set(KINDS) - set(injected)):
        time.sleep(rng.uniform(3.0, 8.0) if not args.ci else rng.uniform(2.0, 4.0))
        rss["daemon_mb"] = max(rss["daemon_mb"], _rss_mb(fleet.proc.pid))
        for pid in fleet.cell_pids():
            rss["cell_mb"] = max(rss["cell_mb"], _rss_mb(pid))
            policies = _children(pid)  # agent-written code in its sandbox: it must never see the key
            sandboxes[0] += len(policies)
            sandboxes[1] += sum(_holds(child, key.encode()) for child in policies)
        board = fleet.board()
        seen_findings, seen_tokens = max(seen_findings, board.count("findings")), max(seen_tokens, board.count("tokens"))
        board.close()
        before = fleet.counter("episodes")
        if not bag:  # every kind once per round, in random order
            bag = rng.sample(KINDS, len(KINDS))
        kind = bag.pop()
        t_fault = time.time()
        pids = fleet.cell_pids()
        if kind in ("kill_cell", "stop_cell") and not pids:
            kind = "garbage"
        armed: list[Fault] = []
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
        elif kind == "garbage":
            _garbage(ipc_url(args.state_dir, "bus"), rng)
        elif kind == "model_outage":  # one agent's backend fails until it pauses
            # Its first failure meets whichever agent asks next, the rest that agent's retries: an agent picked
            # beforehand may be waiting on its evaluations for minutes and never meet the outage.
            armed = [faults.arm(rng.choice(FAULT_KINDS))]
            armed += [faults.arm(rng.choice(FAULT_KINDS), after=armed[0]) for _ in range(CLIENT["max_failures"] - 1)]
        else:
            armed = [faults.arm(kind.removeprefix("model_"))]
        injected[kind] += 1
        why = _model_fault(fleet, faults, armed, outages) if armed else ""
        fired += [f for f in armed if f.fired_at]
        if not why and not _wait_progress(fleet, before, 90):
            why = "no episode recorded within 90 s"
        if why:
            failed.append({"kind": kind, "at_s": round(t_fault - started, 1), "why": why})
        else:
            survived[kind] += 1
    # Stop gracefully and audit.
    fleet.proc.send_signal(signal.SIGTERM)
    try:
        code = fleet.proc.wait(30)
    except subprocess.TimeoutExpired:
        fleet.proc.kill()
        code = "killed after 30 s"
    sim.stop()
    time.sleep(2.0)  # cells exit with the daemon; their jails with them
    survivors = sorted(set(sandbox_processes()) - sandboxes_before)
    hostile_commits = {c for a in sim.policy.agents.values() for c in a.hostile_ids}
    result = {
        "minutes": minutes, "cells": args.cells, "agents": args.agents, "daemon_starts": fleet.starts,
        "fault_kinds": KINDS, "faults_injected": dict(injected), "faults_survived": dict(survived),
        "faults_not_survived": failed, "outages": outages,
        "final_exit_code": code, "max_rss": {k: round(v, 1) for k, v in rss.items()},
        **audit(args.state_dir, seen_findings, seen_tokens),
        "hostile": hostile_summary(args.state_dir, hostile_commits),
        "sandbox_survivors": survivors,
        "replay": replay_audit(args.state_dir, cfg.load(config)),
    }
    log = (args.state_dir / "logs" / "fleet.jsonl").read_text()
    served = Counter(c.agent for c in sim.calls)
    recorded = result["token_records"]
    result["model"] = {
        "backend": "openai", "timing": asdict(FAST), "client": CLIENT, "retry_after_s": RETRY_AFTER_S,
        "calls_answered": dict(sorted(served.items())), "errors_met": dict(Counter(f.kind for f in fired)),
        # answered but never recorded: a reply in flight when the daemon was killed
        "unrecorded_answers": sum(served.values()) - sum(recorded.values()),
        "retries_logged": log.count('"llm_retry"'), "pauses_logged": log.count('"backend_paused"'),
        "retry_after_honoured": _retry_after_honoured(sim, fired, RETRY_AFTER_S),
        "key_redactions_logged": log.count("[redacted]"),
        "files_with_key": _files_with([*sorted(args.state_dir.rglob("*")), fleet.output], key.encode()),
        "policy_sandboxes_seen": sandboxes[0], "policy_sandboxes_with_key": sandboxes[1],
    }
    result["ledger_ok"] = (set(recorded) == {f"agent-{i}" for i in range(args.agents)}
                           and all(n <= served[a] for a, n in recorded.items()))
    result["progress"] = result["episodes_recorded"] > 0 and result["champion"] != "no champion"
    result["ok"] = (result["episodes_lost"] == 0 and result["duplicates"] == 0 and result["findings_intact"]
                    and result["tokens_intact"] and result["ledger_ok"] and result["champion_consistent"]
                    and result["leaderboard_consistent"]
                    and result["progress"] and injected == survived and result["model"]["retry_after_honoured"]
                    and not result["model"]["files_with_key"] and not sandboxes[1]
                    and result["replay"]["ok"] and not survivors and result["hostile"]["successes"] == 0
                    and result["hostile"]["evaluations_share"] >= 0.1)
    print(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
