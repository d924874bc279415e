"""The summarizer actor: condenses the team's findings into a digest of bounded size.

Agents read the digest instead of every peer's findings, so the context an agent sends per turn stays
the same size however large the team grows. The built-in summarizer is deterministic: outcome counts,
the improvement regimes each agent chose, the best findings ranked by the success they reached, and the
most recent ones, each cut to one line.
"""

from __future__ import annotations

import time
from collections import Counter

import trio

from actors.runtime import Actor
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import ChampionChanged, FindingPosted
from bus.records import Champion, Digest, Finding
from enpire.metrics import regimes_used


def _line(f: Finding, width: int = 160) -> str:
    text = f"[{f.agent} {f.outcome} {f.score:.0%}] {f.change} :: {f.evidence}"
    return text if len(text) <= width else text[: width - 1] + "…"


def write_digest(findings: list[Finding], champion: Champion | None, top: int = 5, recent: int = 3) -> Digest:
    """Pure: the digest of a list of findings (bounded: top + recent lines whatever the count)."""
    outcomes = Counter(f.outcome for f in findings)
    best = sorted((f for f in findings if f.outcome != "note"), key=lambda f: (-f.score, -f.t))[:top]
    lines = [f"{len(findings)} findings: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))]
    regimes = regimes_used(findings)
    if regimes:
        lines.append("regimes: " + "; ".join(f"{agent} {' > '.join(r)}" for agent, r in sorted(regimes.items())))
    if champion is not None:
        lines.append(f"champion {champion.policy.ref} by {champion.agent}: judged {champion.judged_rate:.0%} on "
                     f"{champion.judged_n}")
    lines.append("best:")
    lines += ["  " + _line(f) for f in best]
    lines.append("recent:")
    lines += ["  " + _line(f) for f in findings[-recent:]]
    return Digest(t=time.time(), text="\n".join(lines), findings=len(findings), best=best[0].finding_id if best else "")


class Summarizer(Actor):
    """Writes a new digest when a finding is posted or the champion changes (events, never a poll)."""

    name = "summarizer"

    def __init__(self, board: Blackboard, task: str, events: EventHub, quiet_s: float = 0.5):
        super().__init__()
        self.board = board
        self.task = task
        self.events = events
        self.quiet_s = quiet_s  # a burst of findings makes one digest

    async def main(self) -> None:
        with self.events.subscribe(FindingPosted, ChampionChanged) as changes:
            written = -1
            while True:
                digest = await trio.to_thread.run_sync(self._digest, written)
                if digest is not None:
                    written = digest.findings
                await changes.receive()
                await trio.sleep(self.quiet_s)
                while changes.pending():
                    await changes.receive()

    def _digest(self, written: int) -> Digest | None:
        """In a worker thread: read the findings, write the digest if there are new ones."""
        if self.board.count("findings") == written:
            return None
        digest = write_digest(self.board.values("findings", Finding), self.board.get("champion", self.task, Champion))
        self.board.append("digests", digest)
        return digest
