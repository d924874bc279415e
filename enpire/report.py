"""`enpire report --state-dir DIR`: figures and a markdown summary of a fleet run.

Writes into DIR/report/ only the figures there is data for (never an empty one):
- success.png: held-out success over wall-clock seconds: each judging of a candidate (Wilson 95% bar,
  n, promoted or rejected), the champion's confirmation with its Wilson band, the target line, and the
  final paired judging of the starting policy against the champion on the same seeds (report.json);
- success_robot_hours.png and success_tokens.png: the same against robot-hours spent running episodes
  and against the team's model tokens (the latter only when agents used tokens);
- cells.png: each cell's state over time, at the figure's resolution (each pixel column shows the state
  that filled most of it, so sub-second gaps cannot paint over running time), MRU per cell;
- tokens.png: the team's cumulative tokens per agent (only when there are any);
and summary.md. Reads the blackboard only, so it works while the daemon runs.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

from enpire import command

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

from bus.blackboard import Blackboard, BlackboardError  # noqa: E402
from bus.records import CandidateRecord, Champion, EpisodeRecord, Finding, Meta, TimelineRecord, TokenRecord  # noqa: E402
from enpire import config as cfg  # noqa: E402
from enpire import ledger, summary  # noqa: E402
from enpire.metrics import regimes_used, summarize, utilization, wilson_interval  # noqa: E402
from enpire.queueing import counted  # noqa: E402
from enpire.status import collect  # noqa: E402

REGIME_NAMES = {"tune": "heuristic tuning (CEM)", "bc": "behaviour cloning", "rl": "offline-to-online RL (TD3+BC)"}
STATE_COLORS = {"running": "#2e7d32", "resetting": "#f9a825", "verifying": "#1565c0", "idle": "#bdbdbd",
                "faulted": "#c62828", "offline": "#424242"}
BINS = 600  # pixel columns of a cell's row in cells.png


@dataclass(frozen=True)
class Point:
    """A held-out measurement: `successes` of `n` episodes, finished at wall time `t`."""

    t: float
    successes: int
    n: int
    policy: str
    outcome: str = ""  # judgings: "promoted", "rejected" or "" (not decided yet)

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    @property
    def wilson(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)


def _purpose(e: EpisodeRecord) -> str:
    p = getattr(e, "purpose", "")  # records written before job purposes existed have none
    return getattr(p, "value", p) or ""


def judgings(episodes: list[EpisodeRecord], candidates: dict[str, str]) -> list[Point]:
    """One point per held-out judging of a candidate (its job's episodes), marked by its outcome."""
    jobs: dict[str, list[EpisodeRecord]] = defaultdict(list)
    for e in episodes:
        if e.kind == "heldout" and counted(e) and _purpose(e) in ("", "promote"):
            jobs[e.job_id].append(e)
    decided = {ref: outcome for ref, outcome in candidates.items() if outcome in ("promoted", "rejected")}
    points = [Point(max(e.finished for e in eps), sum(e.verdict.success for e in eps), len(eps), eps[0].policy.ref,
                    decided.get(eps[0].policy.ref, "")) for eps in jobs.values()]  # "judging": still pending
    return sorted(points, key=lambda p: p.t)


SERIES = {"confirm": "confirmation", "baseline": "starting policy", "": "held-out"}  # background purposes


def confirmations(episodes: list[EpisodeRecord]) -> dict[str, list[Point]]:
    """Per policy and background purpose ("<ref>: confirmation", "<ref>: starting policy"), the running
    held-out tally after each episode: seeds never used to choose the policy."""
    series: dict[str, list[Point]] = defaultdict(list)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in sorted((e for e in episodes if e.kind == "background" and counted(e) and _purpose(e) in SERIES),
                    key=lambda e: e.finished):
        key = f"{e.policy.ref}: {SERIES[_purpose(e)]}"
        t = tally[key]
        t[0] += e.verdict.success
        t[1] += 1
        series[key].append(Point(e.finished, t[0], t[1], e.policy.ref))
    return dict(series)


def robot_hours(timelines: dict[str, list], times: np.ndarray) -> np.ndarray:
    """Hours all cells together had spent running episodes by each of `times` (wall clock)."""
    runs = [(s.start, s.end) for segs in timelines.values() for s in segs if s.state == "running"]
    if not runs:
        return np.zeros(len(times))
    start, end = np.array(runs).T
    t = np.asarray(times, dtype=float)[:, None]
    return np.clip(np.minimum(end, t) - start, 0.0, None).sum(axis=1) / 3600.0


def tokens_by(tokens: list[TokenRecord], times: np.ndarray) -> np.ndarray:
    """The team's input + output tokens up to each of `times`."""
    ordered = sorted(tokens, key=lambda r: r.t)
    t = np.array([r.t for r in ordered])
    cumulative = np.cumsum([ledger.call_tokens(r.input_tokens, r.output_tokens) for r in ordered])
    idx = np.searchsorted(t, np.asarray(times, dtype=float), side="right")
    return np.where(idx > 0, cumulative[np.maximum(idx - 1, 0)] if len(cumulative) else 0, 0)


def binned_states(segments: list, t0: float, t1: float, bins: int = BINS) -> list[tuple[float, float, str]]:
    """A cell's timeline at `bins` columns over [t0, t1]: each column takes the state that filled most of
    it; consecutive columns of one state merge into one bar (start, width, state)."""
    if t1 <= t0 or not segments:
        return []
    edges = np.linspace(t0, t1, bins + 1)
    states = list(STATE_COLORS)
    filled = np.zeros((len(states), bins))
    for s in segments:
        if s.end <= t0 or s.start >= t1 or s.state not in STATE_COLORS:
            continue
        overlap = np.clip(np.minimum(edges[1:], s.end) - np.maximum(edges[:-1], s.start), 0.0, None)
        filled[states.index(s.state)] += overlap
    winner = np.where(filled.sum(axis=0) > 0, filled.argmax(axis=0), -1)
    bars: list[tuple[float, float, str]] = []
    for i, w in enumerate(winner):
        if w < 0:
            continue
        if bars and bars[-1][2] == states[w] and abs(bars[-1][0] + bars[-1][1] - edges[i]) < 1e-9:
            bars[-1] = (bars[-1][0], bars[-1][1] + edges[i + 1] - edges[i], states[w])
        else:
            bars.append((edges[i], edges[i + 1] - edges[i], states[w]))
    return bars


def _final_points(final: dict | None) -> list[tuple[str, Point]]:
    if not final:
        return []
    out = []
    for label in ("start", "champion"):
        r = final.get(label)
        if r and r.get("n"):
            out.append((label, Point(0.0, r["successes"], r["n"], r.get("policy", ""))))
    return out


def plot_success(judged: list[Point], confirmed: dict[str, list[Point]], final: dict | None, target: float,
                 x_of, xlabel: str, title: str):
    """The held-out success figure against any x (`x_of` maps wall times to it); None without data."""
    finals = _final_points(final)
    if not judged and not confirmed and not finals:
        return None
    with_bars = bool(finals)  # the final pair beside every version of the figure
    fig, axes = plt.subplots(1, 2 if with_bars else 1, figsize=(10 if with_bars else 8, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if with_bars else None)
    ax = axes[0][0]
    for name, points in confirmed.items():
        x = x_of(np.array([p.t for p in points]))
        lo, hi = zip(*(p.wilson for p in points), strict=True)
        line, = ax.plot(x, [p.rate for p in points], lw=1.5, label=name)
        ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color(), lw=0)
        ax.annotate(f"n={points[-1].n}", (x[-1], points[-1].rate), fontsize=7, xytext=(3, -10),
                    textcoords="offset points", color=line.get_color())
    style = {"promoted": ("*", "#2e7d32", 13, "judging: promoted"), "rejected": ("x", "#c62828", 8, "judging: rejected"),
             "": ("o", "#616161", 6, "judging: pending")}
    for outcome, (marker, color, size, label) in style.items():
        points = [p for p in judged if p.outcome == outcome]
        if not points:
            continue
        x = x_of(np.array([p.t for p in points]))
        err = np.array([[p.rate - p.wilson[0] for p in points], [p.wilson[1] - p.rate for p in points]])
        ax.errorbar(x, [p.rate for p in points], yerr=err, fmt=marker, ms=size, color=color, capsize=2, lw=0.8,
                    label=label)
        for xi, p in zip(x, points, strict=True):
            ax.annotate(f"n={p.n}", (xi, p.rate), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if outcome == "promoted":
            for xi in x:
                ax.axvline(xi, color=color, lw=0.6, ls=":", alpha=0.7)
    ax.axhline(target, color="#c62828", ls="--", lw=1, label=f"target {target:.0%}")
    ax.set_xlim(left=0)  # from the start of the run (or of its robot time, of its tokens)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("success rate (held-out seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    if with_bars:
        bx = axes[0][1]
        names = [label for label, _ in finals]
        rates = [p.rate for _, p in finals]
        err = np.array([[p.rate - p.wilson[0] for _, p in finals], [p.wilson[1] - p.rate for _, p in finals]])
        bx.bar(names, rates, yerr=err, capsize=4, color=["#9e9e9e", "#2e7d32"][:len(finals)])
        for i, (_, p) in enumerate(finals):
            bx.annotate(f"{p.successes}/{p.n}", (i, p.rate), ha="center", fontsize=8, xytext=(0, 4),
                        textcoords="offset points")
        bx.axhline(target, color="#c62828", ls="--", lw=1)
        bx.set_ylim(0, 1.05)
        count = (final.get("seeds") or {}).get("count", "")
        bx.set_title(f"final judging\nsame {count} held-out seeds", fontsize=9)
    fig.tight_layout()
    return fig


def plot_cells(timelines: dict[str, list], t0: float, t1: float):
    if not timelines:
        return None
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.4 * len(timelines)))
    seen = set()
    names = sorted(timelines)
    for row, cell in enumerate(names):
        segs = timelines[cell]
        for start, width, state in binned_states(segs, t0, t1):
            ax.broken_barh([(start - t0, width)], (row - 0.4, 0.8), color=STATE_COLORS[state], lw=0,
                           label=state if state not in seen else None)
            seen.add(state)
        wall = max(s.end for s in segs) - min(s.start for s in segs)
        ax.annotate(f"MRU {utilization(segs, wall).mru:.0%}", (1.01, row), xycoords=("axes fraction", "data"),
                    fontsize=7, va="center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, t1 - t0)
    ax.set_xlabel("wall-clock time since start (s)")
    ax.set_title("Cell states (MRU counts only running)", fontsize=10, loc="left")
    ax.legend(fontsize=7, ncol=len(seen), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_tokens(tokens: list[TokenRecord], t0: float):
    if not tokens:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    by_agent: dict[str, list[TokenRecord]] = defaultdict(list)
    for r in sorted(tokens, key=lambda r: r.t):
        by_agent[r.agent].append(r)
    for agent, records in sorted(by_agent.items()):
        ax.step([r.t - t0 for r in records], np.cumsum([ledger.call_tokens(r.input_tokens, r.output_tokens)
                                                        for r in records]),
                where="post", lw=1, label=agent)
    ordered = sorted(tokens, key=lambda r: r.t)
    total = np.cumsum([ledger.call_tokens(r.input_tokens, r.output_tokens) for r in ordered])
    cached = sum(r.cached_input_tokens for r in ordered)
    ax.step([r.t - t0 for r in ordered], total, where="post", color="black", lw=1.5, label="team")
    span_min = max((ordered[-1].t - ordered[0].t) / 60, 1 / 60)
    ax.set_xlabel("wall-clock time since start (s)")
    ax.set_ylabel("tokens (input + output)")
    ax.set_title(f"Team tokens: {int(total[-1]):,} in {len(ordered)} model calls, {total[-1] / span_min:,.0f}/min; "
                 f"{cached:,} cached input", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path, written: list[str]) -> None:
    if fig is None:
        path.unlink(missing_ok=True)  # a figure of an earlier report that now has nothing to show
        return
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path.name)


def write(state_dir: Path, target: float | None = None) -> tuple[Path, list[str]]:
    """Write the figures there is data for and summary.md; returns the folder and the figure names."""
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
        candidates = {c.policy.ref: c.judged for c in board.values("candidates", CandidateRecord)}
        regimes = regimes_used(board.values("findings", Finding))
    finally:
        board.close()
    run = _run_summary(state_dir / "report.json")
    target = target if target is not None else run.get("target", cfg.Config().fleet.target)
    final = run.get("start_vs_champion")
    times = [s.start for segs in timelines.values() for s in segs] + [e.finished for e in episodes]
    t0 = min(times) if times else (meta.created if meta else 0.0)
    t1 = max([s.end for segs in timelines.values() for s in segs] + [e.finished for e in episodes] or [t0])
    judged, confirmed = judgings(episodes, candidates), confirmations(episodes)
    written: list[str] = []
    _save(plot_success(judged, confirmed, final, target, lambda t: t - t0, "wall-clock time since start (s)",
                       "Held-out success (Wilson 95%)"), out / "success.png", written)
    if any(s.state == "running" for segs in timelines.values() for s in segs):
        _save(plot_success(judged, confirmed, final, target, lambda t: robot_hours(timelines, t),
                           "robot-hours running episodes (all cells)", "Held-out success against robot time"),
              out / "success_robot_hours.png", written)
    else:
        _save(None, out / "success_robot_hours.png", written)
    _save(plot_success(judged, confirmed, final, target, lambda t: tokens_by(tokens, t),
                       "team tokens (input + output)", "Held-out success against tokens") if tokens else None,
          out / "success_tokens.png", written)
    _save(plot_cells(timelines, t0, t1), out / "cells.png", written)
    _save(plot_tokens(tokens, t0), out / "tokens.png", written)
    status = collect(state_dir)
    by = defaultdict(int)
    for e in episodes:
        by["final judging" if _purpose(e) == "final" else {"agent": "agent", "heldout": "judging"}.get(
            e.kind, "confirmation and starting policy")] += 1
    parts = ", ".join(f"{by[k]} {k}" for k in ("agent", "judging", "confirmation and starting policy", "final judging"))
    lines = ["# enpire fleet report", "", f"- episodes: {len(episodes)} ({parts})",
             f"- MRU: {status['mru']:.1%}", f"- findings: {status['findings']}",
             f"- tokens: {status['tokens_total']}", f"- target: {target:.0%} held-out success"]
    for c in champions:
        lines.append("- " + summary.champion_line(c.task, summary.champion(c)))
        confirm = [e for e in episodes if e.kind == "background" and e.policy == c.policy and counted(e)
                   and _purpose(e) in ("", "confirm")]
        if (k := max([e.attempts for e in confirm] or [1])) > 1:  # pass@k: each attempt continues the last
            s = summarize(((e.verdict.success, e.success_at_k) for e in confirm), k=k)
            lines.append(f"  - its confirmation episodes with up to {k} attempts: {s}")
    for label, p in _final_points(final):
        lo, hi = p.wilson
        lines.append(f"- final judging, {label} `{p.policy}`: {p.successes}/{p.n} = {p.rate:.1%} "
                     f"(Wilson 95% [{lo:.3f}, {hi:.3f}]), same seeds for both")
    promoted = [p for p in judged if p.outcome == "promoted"]
    lines.append(f"- judgings: {len(judged)} ({len(promoted)} promoted)")
    for agent, used in sorted(regimes.items()):
        lines.append(f"- {agent} searched with: {', '.join(REGIME_NAMES.get(r, r) for r in used)}")
    lines += ["- " + summary.cell_line(cid, c) for cid, c in sorted(status["cells"].items())]
    lines.append("")
    lines += [f"![{name[:-4]}]({name})\n" for name in written]
    (out / "summary.md").write_text("\n".join(lines))
    return out, written


class ReportError(ValueError):
    """The run's report.json cannot be used (one line, naming the file and what is wrong)."""


def _run_summary(path: Path) -> dict:
    """The fleet's report.json ({} when the run wrote none): its target and final judging are drawn."""
    if not path.exists():
        return {}
    try:
        run = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # unreadable, a directory, not UTF-8, not JSON
        raise ReportError(f"{path}: not a readable report ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(run, dict):
        raise ReportError(f"{path}: not a report (a JSON object), but a {type(run).__name__}")
    target = run.get("target")
    if target is not None and not (isinstance(target, int | float) and 0.0 <= target <= 1.0):
        raise ReportError(f"{path}: target {str(target)[:40]!r} is not a success rate between 0 and 1")
    if not isinstance(run.get("start_vs_champion"), dict | None):
        raise ReportError(f"{path}: start_vs_champion is not an object")
    return run


def main(argv: list[str] | None = None, prog: str = "python -m enpire.report") -> int:
    p = command.Parser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    p.add_argument("--target", type=float, help="success rate drawn as the target (default: the run's, from report.json)")
    args = p.parse_args(argv)
    if args.target is not None and not 0.0 <= args.target <= 1.0:  # also refuses nan
        p.error(f"--target {args.target}: a success rate, between 0 and 1")
    if not (args.state_dir / "blackboard.lmdb").exists():
        print(f"{prog}: {args.state_dir}: no fleet state here", file=sys.stderr)
        return 2
    try:
        out, written = write(args.state_dir, args.target)
    except (BlackboardError, ReportError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the report folder cannot be written
        print(f"{prog}: {e.filename or args.state_dir}: cannot write the report: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/summary.md" + "".join(f", {name}" for name in written))
    return 0


if __name__ == "__main__":
    sys.exit(command.run(main))
