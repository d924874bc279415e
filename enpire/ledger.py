"""The token ledger: pure functions over the `TokenRecord`s on the blackboard's "tokens" table.

Convention (every backend normalises to it): `input_tokens` counts all prompt tokens, cached ones
included; `cached_input_tokens` is the cached part of them. A call's tokens are input + output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bus.records import TokenRecord
from enpire.metrics import mean_token_utilization


@dataclass(frozen=True)
class TokenTotals:
    calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        """What MTU and budgets count: input (cached included) + output."""
        return self.input_tokens + self.output_tokens

    def add(self, r: TokenRecord) -> TokenTotals:
        return TokenTotals(self.calls + 1, self.input_tokens + r.input_tokens,
                           self.cached_input_tokens + r.cached_input_tokens, self.output_tokens + r.output_tokens)


def totals(records: Iterable[TokenRecord], until: float | None = None) -> TokenTotals:
    """Team totals, optionally only of calls made at or before `until` (daemon wall clock)."""
    acc = TokenTotals()
    for r in records:
        if until is None or r.t <= until:
            acc = acc.add(r)
    return acc


def per_agent(records: Iterable[TokenRecord]) -> dict[str, TokenTotals]:
    out: dict[str, TokenTotals] = {}
    for r in records:
        out[r.agent] = out.get(r.agent, TokenTotals()).add(r)
    return out


def mtu(records: Iterable[TokenRecord], wall_s: float) -> float:
    """Mean Token Utilization of the team: tokens per minute over a run of `wall_s` seconds."""
    return mean_token_utilization(totals(records).total, wall_s)


def tokens_to_success(records: Iterable[TokenRecord], success_t: float | None) -> int | None:
    """Tokens the team spent until the target was met (None when it was not)."""
    return None if success_t is None else totals(records, until=success_t).total


def time_to_success(start_t: float, success_t: float | None) -> float | None:
    """Seconds from the run's start until the target was met (None when it was not)."""
    return None if success_t is None else max(0.0, success_t - start_t)


def budget_left(records: Iterable[TokenRecord], agent: str, budget: int) -> int | None:
    """Tokens `agent` may still use (never below 0); None when the budget is 0 (no limit)."""
    if budget <= 0:
        return None
    used = totals(r for r in records if r.agent == agent).total
    return max(0, budget - used)


def over_budget(records: Iterable[TokenRecord], agent: str, budget: int) -> bool:
    return budget_left(records, agent, budget) == 0
