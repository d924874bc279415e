"""Agent tools on what the team knows: leaderboard, digest, findings, notes, and the task card."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import trio
from msgspec import Meta

from bus.messages import EvalResult
from bus.records import CandidateRecord, Finding
from enpire import leaderboard as board_lib
from enpire.agents.model import scrub
from enpire.agents.toolkit import Args, Tool, ToolError
from enpire.agents.tools import fingerprint


def _json(value) -> str:
    return msgspec.json.encode(value).decode()


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


class LeaderboardArgs(Args):
    limit: Annotated[int, Meta(ge=1, le=30)] = 10


async def leaderboard(session, a: LeaderboardArgs) -> str:
    tools = session.tools
    records = tools.board.values("candidates", CandidateRecord, prefix=f"{tools.task}/")
    return board_lib.board_text(records, session.settings.horizon, a.limit) or "no candidates measured yet"


class NoArgs(Args):
    pass


# The judge's state of the champion's confirmation, as the team state names it (`judging.confirmation`).
CONFIRMATION = {"": " (likely to meet the target: it runs ahead of experiments)",
                "unlikely": " (unlikely to meet the target: the search goes on; beat it)",
                "met": " (target met)", "not_met": " (stopped short of the target; beat it)"}


def team_state(session) -> str:
    """Digest (or, in the ablation, every finding) and the champion."""
    tools, s = session.tools, session.settings
    if s.digest:
        d = tools.digest()
        parts = ["## Team digest", _cut(d.text, s.digest_chars) if d else "(no findings yet)"]
    else:  # ablation: every finding of the team, one line each; the context grows with the team and the run
        lines = [f"[{f.agent} {f.outcome} {f.score:.0%}] {f.hypothesis} | {f.change} | {f.evidence}"
                 for f in tools.board.values("findings", Finding)]
        parts = ["## Team findings", "\n".join(lines) or "(no findings yet)"]
    champion = tools.champion()
    if champion is not None:
        parts.append(f"## Champion\ncommit {champion.policy.commit} params {_cut(_json(champion.policy.params), 800)}: "
                     f"judged {champion.judged_successes}/{champion.judged_n} held-out, confirmed "
                     f"{champion.successes}/{champion.n}{CONFIRMATION.get(tools.confirmation(), '')}")
    return "\n".join(parts)


async def digest(session, a: NoArgs) -> str:
    return team_state(session)


class FindingsArgs(Args):
    limit: Annotated[int, Meta(ge=1, le=50)] = 10
    agent: Annotated[str, Meta(description="only this teammate's findings; empty = everyone")] = ""


async def findings(session, a: FindingsArgs) -> str:
    limit = min(a.limit, session.settings.max_findings)
    board = session.tools.board
    with board.read() as r:
        count = r.count("findings")
        back = limit + 5 if not a.agent else 500  # appended keys are sequence numbers: read the tail only
        rows = [f for _, f in r.items("findings", Finding, start=f"{max(0, count - back):012d}")]
    rows = [f for f in rows if not a.agent or f.agent == a.agent][-limit:]
    return "\n".join(f"[{f.agent} {f.outcome} {f.score:.0%}] {_cut(f.hypothesis, 200)} | {_cut(f.change, 200)} | "
                     f"{_cut(f.evidence, 200)}" for f in rows) or "no findings"


class PostFindingArgs(Args):
    hypothesis: Annotated[str, Meta(min_length=1, max_length=1000)]
    change: Annotated[str, Meta(min_length=1, max_length=1000)]
    evidence: Annotated[str, Meta(min_length=1, max_length=2000)]
    outcome: Literal["improved", "no_change", "worse", "inconclusive", "note"]
    job: Annotated[str, Meta(description="the evaluation job this finding is about: its measured success "
                                         "rate is attached as the score")] = ""


async def post_finding(session, a: PostFindingArgs) -> str:
    score = 0.0
    if a.job:
        j = session.jobs.get(a.job)
        if not isinstance(j.result, EvalResult) or not j.result.episodes:
            raise ToolError(f"job {a.job} has no measured result yet ({j.state}); post after it finished")
        score = j.result.successes / len(j.result.episodes)
    clean = [scrub(t, session.secrets) for t in (a.hypothesis, a.change, a.evidence)]
    f = await session.tools.post_finding(*clean, a.outcome, fingerprint=fingerprint(["llm", a.change]), score=score)
    return _json({"finding": f.finding_id, "score": round(score, 4)})


# ----------------------------------------------------------------------------- notes


def _note_files(root: Path, max_files: int = 500) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".md", ".txt", ".rst") and p.is_file())[:max_files]


def search_notes_in(root: Path, query: str, limit: int = 5, snippet_chars: int = 400, max_bytes: int = 1_000_000) -> list[str]:
    """Paragraphs of *.md / *.txt / *.rst files under `root` ranked by how many query words they contain."""
    words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1]
    if not words or not root.is_dir():
        return []
    scored: list[tuple[float, str]] = []
    for path in _note_files(root):
        try:
            text = path.read_bytes()[:max_bytes].decode("utf-8", errors="replace")
        except OSError:
            continue
        for para in re.split(r"\n\s*\n", text):
            low = para.lower()
            distinct = sum(w in low for w in words)
            if distinct:
                hits = sum(low.count(w) for w in words)
                scored.append((distinct * 10 + hits, f"{path.relative_to(root)}: {_cut(para.strip(), snippet_chars)}"))
    scored.sort(key=lambda s: -s[0])
    return [s for _, s in scored[:limit]]


class SearchNotesArgs(Args):
    query: Annotated[str, Meta(min_length=1, max_length=200)]
    limit: Annotated[int, Meta(ge=1, le=10)] = 5


def _notes_root(session) -> Path:
    if not session.settings.notes_dir:
        raise ToolError("no notes folder is configured ([agents] notes_dir)")
    return Path(session.settings.notes_dir)


async def search_notes(session, a: SearchNotesArgs) -> str:
    hits = await trio.to_thread.run_sync(search_notes_in, _notes_root(session), a.query, a.limit)
    return "\n---\n".join(hits) or "no matches"


class ReadNoteArgs(Args):
    path: Annotated[str, Meta(min_length=1, description="a path search_notes showed")]
    start_line: Annotated[int, Meta(ge=1)] = 1
    max_lines: Annotated[int, Meta(ge=1, le=400)] = 150


async def read_note(session, a: ReadNoteArgs) -> str:
    root = _notes_root(session).resolve()
    path = (root / a.path).resolve()
    if not path.is_relative_to(root) or path.suffix.lower() not in (".md", ".txt", ".rst") or not path.is_file():
        raise ToolError(f"no note {a.path!r} under the notes folder")
    lines = (await trio.to_thread.run_sync(path.read_bytes)).decode("utf-8", errors="replace").splitlines()
    end = min(len(lines), a.start_line - 1 + a.max_lines)
    more = f"; next page: start_line={end + 1}" if end < len(lines) else " (end)"
    return f"{a.path}: lines {a.start_line}-{end} of {len(lines)}{more}\n" + "\n".join(lines[a.start_line - 1:end])


async def task_card(session, a: NoArgs) -> str:
    return session.card.render()


TOOLS = [
    Tool("leaderboard", "The team's best candidates measured on tuning seeds (all agents), and what still runs.",
         LeaderboardArgs, leaderboard),
    Tool("digest", "The team digest (condensed findings of all agents) and the champion.", NoArgs, digest),
    Tool("findings", "The latest raw findings of the team (or of one teammate), newest last.", FindingsArgs, findings),
    Tool("post_finding", "Share what you learned (hypothesis, change, evidence, outcome); name the evaluation "
         "job to attach its measured score.", PostFindingArgs, post_finding),
    Tool("search_notes", "Keyword search over the research notes; returns snippets with their paths.",
         SearchNotesArgs, search_notes),
    Tool("read_note", "Read a note file by path, one page at a time.", ReadNoteArgs, read_note),
    Tool("task_card", "The task: observation layout with units, action meaning and limits, goal, horizon, control "
         "rate, deadline, success rule, on_failure keys, allowed imports.", NoArgs, task_card),
]
