"""`python -m enpire.status --state-dir DIR`: the fleet at a glance, while it runs or after.

Reads the blackboard only (read-only), so it is safe beside a running daemon. With `--follow` it then
subscribes to the running daemon's events on the bus and prints one line per change as it happens (cells'
states, champion, findings, held-out pool, and the daemon's progress line), until the daemon stops.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import msgspec
import trio

from bus.blackboard import Blackboard, BlackboardError
from bus.events import events_url
from bus.messages import CellStateChanged, ChampionChanged, FindingPosted, HeldoutUsage, Message, Progress
from bus.records import (
    CellRecord,
    Champion,
    CLIRunRecord,
    DaemonRecord,
    HeldoutRecord,
    JobRecord,
    TimelineRecord,
    TokenRecord,
    TrainerRecord,
)
from bus.transport import Subscriber
from enpire import command, ledger, statelock, summary
from enpire.metrics import cell_window_s, until, utilization

SILENT_S = 10.0  # the daemon's heartbeat comes every second: this long without one, it has stopped


def collect(state_dir: Path, now: float | None = None) -> dict:
    board = Blackboard(state_dir / "blackboard.lmdb", readonly=True)
    try:
        return _collect(board, now or time.time(), statelock.held(state_dir))
    finally:
        board.close()


def _collect(board: Blackboard, now: float, held: bool = True) -> dict:
    """`held`: a daemon holds the state dir's lock (a record saying "running" without one: it was killed)."""
    daemon = board.get("meta", "daemon", DaemonRecord)
    alive = daemon is not None and daemon.state == "running" and held and now - daemon.last_seen < 60
    segments: dict[str, list] = {}
    for rec in board.values("timeline", TimelineRecord):
        segments.setdefault(rec.cell_id, []).extend(rec.segments)
    records = {c.cell_id: c for c in board.values("cells", CellRecord)}
    # The run's figures, as report.json has them: its final judging is not the run's. (Segments are in each
    # cell's clock, the end in the daemon's: a remote cell's clock skew moves its cut by that much.)
    if daemon is not None and daemon.ended:
        segments = {cid: until(segs, daemon.ended) for cid, segs in segments.items()}
        records = {cid: msgspec.structs.replace(c, last_seen=min(c.last_seen, daemon.ended)) for cid, c in records.items()}
    ended = daemon is not None and bool(daemon.ended)
    per_cell = {cid: utilization(segments.get(cid, []), cell_window_s(
        c.joined, c.last_seen, alive and not ended and c.state != "offline", now)) for cid, c in records.items()}
    fleet = summary.cells(per_cell)
    cells = {cid: {"state": records[cid].state if alive else "offline", "host": records[cid].host,
                   "pid": records[cid].pid, **u} for cid, u in fleet["cells"].items()}
    trainers = {  # beside the cells: where training runs and how fast its last job went
        t.trainer_id: {"state": t.state if alive else "offline", "host": t.host, "pid": t.pid, "device": t.device,
                       "gpu": t.gpu, "processes": t.processes, "job": t.job_id, "jobs_done": t.jobs_done,
                       "samples_per_s": round(t.samples_per_s, 1)}
        for t in board.values("trainers", TrainerRecord)
    }
    jobs = [j for j in board.values("jobs", JobRecord) if not j.done]
    champions = {task: summary.champion(c) for task, c in board.items("champion", Champion)}
    records = board.values("tokens", TokenRecord)
    team = ledger.totals(records)
    running_s = ((daemon.ended or (now if alive else daemon.last_seen)) - daemon.started) if daemon else 0.0
    return {
        "daemon": {
            "state": (daemon.state if alive or daemon.state != "running"
                      else "not responding" if held else "stopped: killed (no daemon holds the state dir)")
            if daemon else "never ran",
            "pid": daemon.pid if daemon else None,
            "running_s": round(running_s, 1),
            "time_left_s": round(max(0.0, daemon.budget_s - running_s), 1) if alive and daemon.budget_s else None,
            "target": daemon.target if daemon else None,
        },
        "episodes": board.counter("episodes"),
        "episodes_requeued": board.counter("episodes_requeued"),
        "cells": cells,
        "mru": fleet["mru"],
        "trainers": trainers,
        "training_requeued": board.counter("training_requeued"),
        "jobs_queued": len(jobs),
        "jobs": [{"job": j.job_id, "agent": j.agent, "kind": j.kind, "episodes": len(j.seeds)} for j in jobs[:20]],
        "champions": champions,
        "tokens": {agent: t.total for agent, t in sorted(ledger.per_agent(records).items())},
        "tokens_total": team.total,
        "tokens_cached_input": team.cached_input_tokens,
        "tokens_per_min": round(ledger.mtu(records, running_s), 1) if records and running_s > 0 else 0.0,
        "token_ledger": ledger.summary(records, board.values("cli_runs", CLIRunRecord)),  # per agent: input, cached, cache writes, output, reasoning, cost
        "findings": board.count("findings"),
        # every judging draws fresh held-out seeds: how much of each task's pool is spent
        "heldout": summary.heldout_pools(board.values("heldout", HeldoutRecord)),
    }


def render(status: dict) -> str:
    d = status["daemon"]
    left = f", {d['time_left_s']:.0f}s left" if d.get("time_left_s") is not None else ""
    lines = [f"daemon: {d['state']} (pid {d['pid']}), running {d['running_s']:.0f}s{left}; "
             f"episodes {status['episodes']} (requeued {status['episodes_requeued']}); MRU {status['mru']:.1%}"]
    for cid, c in sorted(status["cells"].items()):
        lines.append(f"  {summary.cell_line(cid, c)}; {c['state']} on {c['host']}:{c['pid']}")
    for tid, t in sorted(status.get("trainers", {}).items()):
        where = f"{t['device']}" + (f" ({t['gpu']})" if t["gpu"] else "") + (f" x{t['processes']}" if t["processes"] > 1 else "")
        lines.append(f"  trainer {tid:<10} {t['state']:<9} {where}  job {t['job'] or '-'}  "
                     f"{t['samples_per_s']:.0f} samples/s  {t['host']}:{t['pid']}")
    running = d["state"] == "running"
    lines.append(f"jobs {'queued' if running else 'left unfinished'}: {status['jobs_queued']}")
    for j in status["jobs"]:
        lines.append(f"  {j['job']} ({j['kind']}, {j['agent']}): {j['episodes']} episodes")
    lines += [summary.champion_line(task, c) for task, c in status["champions"].items()]
    if not status["champions"]:
        lines.append("champion: none yet")
    if status["tokens_total"]:
        lines.append(f"tokens: {status['tokens_total']:,} ({status['tokens_cached_input']:,} cached input), "
                     f"{status['tokens_per_min']:,.0f}/min")
    for agent, n in status["tokens"].items():
        own = status["token_ledger"]["agents"].get(agent, {})  # a CLI agent's own figures, beside the ledger's
        cost = f", ${own['cli_cost_usd']:.4f}" if own.get("cli_cost_usd") is not None else ""
        said = f" (its CLI counted {own['cli_tokens']:,}{cost} in {own['cli_runs']} runs)" if own.get("cli_runs") else ""
        lines.append(f"  {agent}: {n:,} tokens{said}")
    lines.append(f"findings: {status['findings']}")
    lines += [summary.heldout_line(task, h) for task, h in status.get("heldout", {}).items()]
    return "\n".join(lines)


def event_line(event: Message) -> str | None:
    """One line for a change worth a reader's eye; None for the rest (queue depth and single model calls
    change many times a second: the progress line sums them up)."""
    at = time.strftime("%H:%M:%S", time.localtime(getattr(event, "t", time.time())))
    match event:
        case Progress():
            return (f"{at} progress: {event.episodes} episodes, MRU {event.mru:.1%}, champion {event.champion or '-'} "
                    f"{event.champion_success:.1%} (n={event.champion_n}), {event.tokens:,} tokens "
                    f"({event.tokens_per_min:,.0f}/min), {event.time_left_s:.0f} s left")
        case CellStateChanged():
            return f"{at} cell {event.cell_id}: {event.state}"
        case ChampionChanged():
            confirmed = f"confirmation {event.successes}/{event.n}" + (f" ({event.decision})" if event.decision else "")
            return (f"{at} champion[{event.task}]: {event.policy.ref} by {event.agent}; judged "
                    f"{event.judged_successes}/{event.judged_n}, {confirmed}")
        case FindingPosted():
            return f"{at} finding {event.finding_id} by {event.agent}"
        case HeldoutUsage():
            return f"{at} held-out seeds of {event.task}: {event.used} of {event.total} used" + (" (running low)" if event.low else "")
    return None


async def follow(url: str, seconds: float = math.inf, out=sys.stdout) -> str:
    """Print the daemon's changes as they come, for `seconds` at most; why it stopped following."""
    with Subscriber(url) as events:
        try:
            await events.wait_joined(timeout=SILENT_S)
        except TimeoutError:
            return "no daemon publishes here (not running, or older than --follow)"
        with trio.move_on_after(seconds):
            while True:
                with trio.move_on_after(SILENT_S):
                    line = event_line((await events.receive()).body)
                    if line:
                        print(line, file=out, flush=True)
                if trio.current_time() - events.last_heard > SILENT_S:
                    return f"the daemon went silent ({SILENT_S:.0f} s without its heartbeat)"
        return f"followed for {seconds:.0f} s"


def main(argv: list[str] | None = None, prog: str = "python -m enpire.status") -> int:
    p = command.Parser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--follow", action="store_true", help="then print the running daemon's changes as they happen")
    p.add_argument("--seconds", type=float, default=math.inf, help="with --follow: stop after this long")
    args = p.parse_args(argv)
    if not args.seconds > 0:  # NaN too
        print(f"{prog}: --seconds {args.seconds}: must be a positive number of seconds", file=sys.stderr)
        return 2
    if args.seconds != math.inf and not args.follow:
        print(f"{prog}: --seconds is for --follow (how long to follow); without it status prints once", file=sys.stderr)
        return 2
    if not (args.state_dir / "blackboard.lmdb").exists():
        print(f"{prog}: {args.state_dir}: no fleet state here", file=sys.stderr)
        return 2
    try:
        status = collect(args.state_dir)
    except BlackboardError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else render(status), flush=True)
    if args.follow:
        try:
            why = trio.run(follow, events_url(args.state_dir), args.seconds)
        except KeyboardInterrupt:
            return 0
        print(f"{prog}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(command.run(main))
