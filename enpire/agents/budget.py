"""When a model agent stops or holds: its token and wall-time budgets, and the team's goal already met."""

from __future__ import annotations

from bus.records import Finding
from enpire.agents.tools import Tools


def exhausted(token_budget: int, wall_budget_s: float, used: int, elapsed: float) -> str:
    """Why the agent must stop ("" while it may go on); a budget of 0 is no limit."""
    if token_budget and used >= token_budget:
        return f"token budget exhausted ({used} of {token_budget} tokens)"
    if wall_budget_s and elapsed >= wall_budget_s:
        return f"wall-time budget exhausted ({elapsed:.0f} of {wall_budget_s:.0f} s)"
    return ""


def line(token_budget: int, wall_budget_s: float, used: int, elapsed: float) -> str:
    """The budget line of the briefing."""
    tokens = f"{used} tokens used of {token_budget}" if token_budget else f"{used} tokens used (no limit)"
    wall = f"{elapsed:.0f} s of {wall_budget_s:.0f} s" if wall_budget_s else f"{elapsed:.0f} s (no limit)"
    return f"{tokens}; {wall}"


def team_goal_met(tools: Tools, target: float, *, margin: float = 0.0, confirm_after: int = 20) -> bool:
    """The champion already meets the target (plus `margin`) on its judging and on what confirmation has
    seen so far, once it has seen `confirm_after` episodes. A confirmation that stopped "not_met", or that
    the judge finds unlikely to say "met" (it then runs on idle cells only, if at all), says it does not,
    however its point estimate looks: the team works on. A target of 0 or less is no goal."""
    c = tools.champion()
    if (target <= 0 or c is None or c.decision == "not_met" or tools.confirmation() in ("not_met", "unlikely")
            or c.judged_n == 0 or c.judged_rate < target + margin):
        return False
    return c.n < confirm_after or c.successes / c.n >= target


async def stop(tools: Tools, log, reason: str, used: int, elapsed: float) -> None:
    """Log why the agent stops and tell the team once (even across restarts)."""
    log.warning("budget_exhausted", reason=reason, tokens=used, elapsed_s=round(elapsed, 1))
    mine = [f for f in tools.board.values("findings", Finding) if f.agent == tools.agent]
    if not any(f.hypothesis.startswith("budget exhausted") for f in mine[-3:]):
        await tools.post_finding(hypothesis="budget exhausted: this agent stops", change="none",
                           evidence=f"{reason}; {len(mine)} findings posted before", outcome="note")
