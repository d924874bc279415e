"""What the fleet tells every `[fleet] progress_s`: one Progress event (log line, TensorBoard sink), and a
warning while no cell is connected (such a fleet does no work however long its budget)."""

from __future__ import annotations

from bus.messages import Progress
from enpire.metrics import mean_token_utilization


def progress(now: float, started: float, deadline: float, episodes: int, champion, mru: float, tokens: int,
             agent_tokens: dict[str, int] | None = None) -> Progress:
    """`champion`: anything with policy, successes and n (the champion record or its change event), or None."""
    confirmed_n = champion.n if champion is not None else 0
    return Progress(
        t=now, episodes=episodes, champion=champion.policy.ref if champion is not None else "",
        champion_success=round(champion.successes / confirmed_n, 4) if confirmed_n else 0.0,
        champion_n=confirmed_n, mru=round(mru, 4), tokens=tokens, agent_tokens=dict(agent_tokens or {}),
        tokens_per_min=round(mean_token_utilization(tokens, now - started), 1),
        time_left_s=round(max(0.0, deadline - now), 1),
    )


def log_fields(p: Progress, started: float) -> dict:
    return {"elapsed_s": round(p.t - started, 1), "time_left_s": p.time_left_s, "episodes": p.episodes,
            "champion": p.champion, "confirmed": f"{round(p.champion_success * p.champion_n)}/{p.champion_n}",
            "mru": p.mru, "tokens": p.tokens, "tokens_per_min": p.tokens_per_min, "agent_tokens": p.agent_tokens}


class NoCellWatch:
    """Says when to warn that no cell is connected: after `grace_s` without one, then every `every_s`."""

    def __init__(self, started: float, grace_s: float = 30.0, every_s: float = 60.0) -> None:
        self.since: float | None = started  # no cell has joined yet
        self.grace_s, self.every_s = grace_s, every_s
        self._next = started + grace_s

    def check(self, now: float, live_cells: int) -> float | None:
        """Seconds without a connected cell when a warning is due now, else None."""
        if live_cells:
            self.since = None
            return None
        if self.since is None:
            self.since, self._next = now, now + self.grace_s
        if now < self._next:
            return None
        self._next = now + self.every_s
        return now - self.since
