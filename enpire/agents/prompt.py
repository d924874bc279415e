"""What a model agent is told: the fixed system text, the task card, and the briefing rebuilt every call.

The order is chosen for prompt caching: system (and the tool list) and the task card never change, the
turns only grow at the end, and the briefing (digest, leaderboard, champion, new results, budget) comes
last, so every request starts with the previous one up to where the previous briefing was.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from bus.records import CandidateRecord, QueueRecord
from enpire import leaderboard
from enpire.agents.jobs import Job
from enpire.agents.model import Prompt, Turn, truncate
from enpire.agents.tool_fleet import job_text
from enpire.agents.tool_team import team_state

POLICY_PROTOCOL = """\
A policy is the file policy.py in the workspace (other files of the commit sit beside it), defining
    class Policy:
        def __init__(self, params: dict[str, float]): ...
        def reset(self) -> None: ...          # called at the start of every episode
        def act(self, obs) -> action: ...     # called every control step; must answer within the deadline
        def on_failure(self, info) -> None: ...  # pass@k: told why the previous attempt failed
It runs in a sandbox that sees only observations; every action is checked for shape, finiteness, bounds and
per-step change, and a violation ends the episode. The task card says what obs and action mean."""

SYSTEM = (
    "You are a member of a team of agents improving a robot manipulation policy in a closed loop "
    "(reset, run, verify, record, refine). You act only through the tools.\n\n"
    f"## Policy protocol\n{POLICY_PROTOCOL}\n\n"
    "## How to work\n"
    "- Read the code (read_file pages through long files), change it with edit (exact text or a unified diff) "
    "or write_file on your branch; each change is a commit whose id is the policy reference.\n"
    "- evaluate returns a job id at once and runs on tuning seeds the harness picks; results arrive in your "
    "next briefing, or call wait to sleep until they are in (no tokens are spent while waiting). Calls of one "
    "reply that touch your branch run in the order you write them, so edit then evaluate works in one reply.\n"
    "- Study failures with job and episode (poses, trajectory, error with line numbers, frames as an image).\n"
    "- train learns from the fleet's recorded episodes (bc, or rl = TD3+BC); commit_checkpoint makes the "
    "checkpoint a candidate to evaluate.\n"
    "- After every experiment post_finding (hypothesis, change, evidence, outcome; name the job). The team "
    "digest tells you what peers tried: do not repeat a change they already tested; show_commit and "
    "read_file read any teammate's commit by id.\n"
    "- promote a candidate only when its evaluations beat the champion; promotion is judged on held-out seeds "
    "you never see. The verifier alone decides success.\n"
    "- Every call costs tokens from a fixed budget: be brief."
)


def card_message(card_text: str) -> str:
    return f"{card_text}\n\nThe briefing at the end of each message of mine says what changed since your last turn."


def briefing(session, *, budget_line: str, journal: Sequence[str], results: Sequence[Job], running: int,
             leaders: int) -> str:
    tools, s = session.tools, session.settings
    parts = [team_state(session)]
    if leaders:  # measured by the fleet, not reported by agents: build on these instead of repeating them
        records = tools.board.values("candidates", CandidateRecord, prefix=f"{tools.task}/")
        parts += ["## Team's best candidates (tuning seeds, all agents)",
                  leaderboard.board_text(records, s.horizon, leaders)]
    queue = tools.queue_depth() or tools.board.get("meta", "queue", QueueRecord)
    if queue is not None:  # capacity, so a request can be sized to what the robots can run soon
        parts.append(f"## Fleet\n{queue.cells} cells, {queue.waiting} episodes queued")
    parts.append(f"## Your budget\n{budget_line}")
    if journal:
        parts.append("## Your earlier actions (oldest first)\n" + "\n".join(journal))
    if results:
        parts.append("## New results\n" + "\n".join(job_text(j) for j in results))
    parts.append(f"## Your jobs still running: {running}")
    return "\n\n".join([*parts, "Decide the next step and act through the tools."])


def build_prompt(system: str, card: str, turns: Sequence[Turn], brief: str) -> Prompt:
    return Prompt(system, card_message(card), list(turns), brief)


def journal_line(turn: Turn) -> str:
    """One line that stands for a turn that left the window."""
    if turn.reply.stop == "refusal":
        return truncate("refused: " + " ".join((turn.reply.refusal or turn.reply.text).split()), 200)
    if not turn.reply.calls:
        return truncate("said: " + " ".join(turn.reply.text.split()), 160)
    parts = []
    for call, out in zip(turn.reply.calls, turn.outputs, strict=False):
        result = " ".join(out.content.split())
        parts.append(f"{call.name}{' ERROR' if out.is_error else ''} -> {truncate(result, 100)}")
    return truncate("; ".join(parts), 240)


class Window:
    """The model's own turns, verbatim, bounded by count and characters; a turn that leaves becomes one
    journal line. Past a bound the oldest half leaves at once, not one turn per call: the prompt's prefix
    (what providers cache) then changes once every many turns instead of every turn."""

    def __init__(self, max_turns: int, max_chars: int, journal_lines: int) -> None:
        self.max_turns, self.max_chars = max_turns, max_chars
        self.turns: deque[Turn] = deque()
        self.journal: deque[str] = deque(maxlen=journal_lines)

    def add(self, turn: Turn) -> None:
        self.turns.append(turn)
        if len(self.turns) > self.max_turns or self.chars() > self.max_chars:
            keep = max(1, len(self.turns) // 2)
            while len(self.turns) > 1 and (len(self.turns) > keep or self.chars() > self.max_chars // 2):
                self.drop(1)

    def drop(self, n: int) -> None:
        for _ in range(min(n, len(self.turns))):
            self.journal.append(journal_line(self.turns.popleft()))

    def chars(self) -> int:
        return sum(len(t.reply.text) + len(t.nudge) + sum(len(c.arguments) + len(c.name) for c in t.reply.calls)
                   + sum(len(o.content) for o in t.outputs) for t in self.turns)
