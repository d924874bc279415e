"""`python -m enpire.report --state-dir DIR`: plots and a short markdown summary of a fleet run.

Writes into DIR/report/: success.png (held-out success of each champion with its Wilson 95% band,
agents' tuning evaluations as dots), cells.png (each cell's state timeline), tokens.png (team tokens
over time), and summary.md. Reads the blackboard only, so it works while the daemon runs.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

from bus.blackboard import Blackboard  # noqa: E402
from bus.records import Champion, EpisodeRecord, Finding, Meta, TimelineRecord, TokenRecord  # noqa: E402
from enpire.metrics import regimes_used, summarize, utilization, wilson_interval  # noqa: E402
from enpire.status import collect  # noqa: E402

REGIME_NAMES = {"tune": "heuristic tuning (CEM)", "bc": "behaviour cloning", "rl": "offline-to-online RL (TD3+BC)"}
STATE_COLORS = {"running": "#2e7d32", "resetting": "#f9a825", "verifying": "#1565c0", "idle": "#bdbdbd",
                "faulted": "#c62828", "offline": "#424242"}


def success_series(episodes: list[EpisodeRecord]) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per champion candidate: (time, rate, low, high) after each of its held-out confirmation episodes."""
    series: dict[str, list] = defaultdict(list)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in sorted((e for e in episodes if e.kind == "background" and not e.flagged), key=lambda e: e.finished):
        t = tally[e.policy.ref]
        t[0] += e.verdict.success
        t[1] += 1
        lo, hi = wilson_interval(t[0], t[1])
        series[e.policy.ref].append((e.finished, t[0] / t[1], lo, hi))
    return series


def plot_success(episodes: list[EpisodeRecord], t0: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    jobs: dict[str, list[EpisodeRecord]] = defaultdict(list)
    for e in episodes:
        if e.kind == "agent" and not e.flagged:
            jobs[e.job_id].append(e)
    if jobs:
        xs = [(max(e.finished for e in eps) - t0) / 60 for eps in jobs.values()]
        ys = [sum(e.verdict.success for e in eps) / len(eps) for eps in jobs.values()]
        ax.scatter(xs, ys, s=6, alpha=0.3, color="gray", label="agent evaluations (tuning seeds)")
    for ref, points in success_series(episodes).items():
        t = [(p[0] - t0) / 60 for p in points]
        ax.plot(t, [p[1] for p in points], label=f"champion {ref} (held-out)")
        ax.fill_between(t, [p[2] for p in points], [p[3] for p in points], alpha=0.2)
    ax.set_xlabel("minutes")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Success over time, Wilson 95% band")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cells(timelines: dict[str, list], t0: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * max(1, len(timelines))))
    for row, (_cell, segments) in enumerate(sorted(timelines.items())):
        for state, color in STATE_COLORS.items():
            bars = [((s.start - t0) / 60, (s.end - s.start) / 60) for s in segments if s.state == state]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), color=color, label=state if row == 0 else None)
    ax.set_yticks(range(len(timelines)), sorted(timelines))
    ax.set_xlabel("minutes")
    ax.set_title("Cell states over time (MRU counts only running)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, ncol=len(labels), loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tokens(tokens: list[TokenRecord], t0: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    by_agent: dict[str, list[TokenRecord]] = defaultdict(list)
    for r in sorted(tokens, key=lambda r: r.t):
        by_agent[r.agent].append(r)
    total, xs, ys = 0, [], []
    for r in sorted(tokens, key=lambda r: r.t):
        total += r.input_tokens + r.output_tokens
        xs.append((r.t - t0) / 60)
        ys.append(total)
    if xs:
        ax.plot(xs, ys, label="team (input + output)")
    else:
        ax.text(0.5, 0.5, "no model tokens: built-in agents only", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("minutes")
    ax.set_ylabel("tokens")
    ax.set_title("Tokens over time")
    if xs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(state_dir: Path) -> Path:
    out = state_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    board = Blackboard(state_dir / "blackboard.lmdb", readonly=True)
    try:
        meta = board.get("meta", "meta", Meta)
        episodes = board.values("episodes", EpisodeRecord)
        timelines: dict[str, list] = defaultdict(list)
        for rec in board.values("timeline", TimelineRecord):
            timelines[rec.cell_id].extend(rec.segments)
        tokens = board.values("tokens", TokenRecord)
        champions = board.values("champion", Champion)
        regimes = regimes_used(board.values("findings", Finding))
    finally:
        board.close()
    starts = [s.start for segs in timelines.values() for s in segs] + [e.finished for e in episodes]
    t0 = min(starts) if starts else (meta.created if meta else 0.0)
    plot_success(episodes, t0, out / "success.png")
    plot_cells(timelines, t0, out / "cells.png")
    plot_tokens(tokens, t0, out / "tokens.png")
    status = collect(state_dir)
    lines = ["# enpire fleet report", "", f"- episodes: {len(episodes)} "
             f"({sum(e.kind == 'agent' for e in episodes)} agent, {sum(e.kind == 'heldout' for e in episodes)} "
             f"judging, {sum(e.kind == 'background' for e in episodes)} confirmation)",
             f"- MRU: {status['mru']:.1%}", f"- findings: {status['findings']}",
             f"- tokens: {sum(status['tokens'].values())}"]
    for c in champions:
        confirm = [e for e in episodes if e.kind == "background" and e.policy == c.policy and not e.flagged]
        s = summarize(((e.verdict.success, e.success_at_k) for e in confirm), k=max([e.attempts for e in confirm] or [1]))
        lines.append(f"- champion `{c.policy.ref}` ({c.task}, by {c.agent}): held-out {s}; "
                     f"judged {c.judged_successes}/{c.judged_n} at promotion")
    for agent, used in sorted(regimes.items()):
        lines.append(f"- {agent} improved the policy by: {', '.join(REGIME_NAMES.get(r, r) for r in used)}")
    for cell, segs in sorted(timelines.items()):
        wall = max(s.end for s in segs) - min(s.start for s in segs) if segs else 0.0
        lines.append(f"- {cell}: MRU over its reported time {utilization(segs, wall).mru:.1%}")
    lines += ["", "![success](success.png)", "", "![cells](cells.png)", "", "![tokens](tokens.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None, prog: str = "python -m enpire.report") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    args = p.parse_args(argv)
    if not (args.state_dir / "blackboard.lmdb").exists():
        print(f"{prog}: {args.state_dir}: no fleet state here", file=sys.stderr)
        return 2
    out = write(args.state_dir)
    print(f"wrote {out}/summary.md, success.png, cells.png, tokens.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
