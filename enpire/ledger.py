"""The token ledger: pure functions over the `TokenRecord`s on the blackboard's "tokens" table.

Convention (every backend normalises to it): `input_tokens` counts all prompt tokens, cached reads and
cache writes included; `cached_input_tokens` and `cache_write_tokens` are parts of them. `output_tokens`
counts every generated token, `reasoning_tokens` the part spent on hidden reasoning. A call's tokens are
input + output (`call_tokens`, the one place this sum is made). Cost comes from a price table per model
(currency per million tokens); a model without a price costs 0 and is named in `unpriced`.

A CLI coding agent also states figures of its own at the end of each headless run (Claude Code: its cost
from its own price table, `total_cost_usd`, and its tokens; Codex: its tokens); each run's share is a
`CLIRunRecord` on the "cli_runs" table, and the summaries show per agent `cli_cost_usd` beside the
ledger's price-based `cost` and `cli_tokens` beside the ledger's `tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bus.records import CLIRunRecord, TokenRecord
from enpire.metrics import mean_token_utilization


def call_tokens(input_tokens: int, output_tokens: int) -> int:
    """What MTU and budgets count for one call: input (cached included) + output (reasoning included)."""
    return input_tokens + output_tokens


def anthropic_input(input_tokens: int, cache_read_tokens: int, cache_write_tokens: int) -> int:
    """The ledger's input of an Anthropic usage block (API, relay and Claude Code alike): Anthropic's
    `input_tokens` excludes cache reads and cache writes, the ledger's counts all input."""
    return input_tokens + cache_read_tokens + cache_write_tokens


@dataclass(frozen=True)
class Price:
    """Currency per million tokens; `cached_input` and `cache_write` default to `input` when negative."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float = -1.0
    cache_write: float = -1.0


def cost(price: Price | None, input_tokens: int, cached_input_tokens: int, cache_write_tokens: int,
         output_tokens: int) -> float:
    """The price of one call: uncached input, cached reads, cache writes and output at their own rates."""
    if price is None:
        return 0.0
    cached = price.input if price.cached_input < 0 else price.cached_input
    write = price.input if price.cache_write < 0 else price.cache_write
    plain = max(0, input_tokens - cached_input_tokens - cache_write_tokens)
    return (plain * price.input + cached_input_tokens * cached + cache_write_tokens * write
            + output_tokens * price.output) / 1e6


@dataclass(frozen=True)
class TokenTotals:
    calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0

    @property
    def total(self) -> int:
        return call_tokens(self.input_tokens, self.output_tokens)

    def add(self, r: TokenRecord) -> TokenTotals:
        return TokenTotals(self.calls + 1, self.input_tokens + r.input_tokens,
                           self.cached_input_tokens + r.cached_input_tokens, self.output_tokens + r.output_tokens,
                           self.cache_write_tokens + r.cache_write_tokens, self.reasoning_tokens + r.reasoning_tokens,
                           self.cost + r.cost)

    def as_dict(self) -> dict[str, float]:
        """The figures progress events, status and report.json show."""
        return {"calls": self.calls, "input_tokens": self.input_tokens, "cached_input_tokens": self.cached_input_tokens,
                "cache_write_tokens": self.cache_write_tokens, "output_tokens": self.output_tokens,
                "reasoning_tokens": self.reasoning_tokens, "tokens": self.total, "cost": round(self.cost, 6)}


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


def cli_costs(runs: Iterable[CLIRunRecord]) -> dict[str, dict]:
    """Per agent: its CLI runs, the tokens its CLI counted in them (beside the ledger's own `tokens`, a check)
    and the sum of the costs its CLI reported (None when it reported none)."""
    out: dict[str, dict] = {}
    for r in runs:
        acc = out.setdefault(r.agent, {"cli_runs": 0, "cli_tokens": 0, "cli_cost_usd": None})
        acc["cli_runs"] += 1
        acc["cli_tokens"] += call_tokens(r.input_tokens, r.output_tokens)
        if r.cost_usd is not None:
            acc["cli_cost_usd"] = round((acc["cli_cost_usd"] or 0.0) + r.cost_usd, 6)
    return out


def summary(records: Iterable[TokenRecord], runs: Iterable[CLIRunRecord] = ()) -> dict:
    """Team and per-agent totals as plain values: what progress events, `enpire.status` and report.json show.
    With the CLI agents' `runs`, each of their agents also shows its runs and the cost its CLI reported."""
    records = list(records)
    agents = {a: t.as_dict() for a, t in per_agent(records).items()}
    team = totals(records).as_dict()
    cli = cli_costs(runs)
    for agent, figures in cli.items():
        agents.setdefault(agent, TokenTotals().as_dict()).update(figures)
    if cli:
        costs = [f["cli_cost_usd"] for f in cli.values() if f["cli_cost_usd"] is not None]
        team.update(cli_runs=sum(f["cli_runs"] for f in cli.values()), cli_tokens=sum(f["cli_tokens"] for f in cli.values()),
                    cli_cost_usd=round(sum(costs), 6) if costs else None)
    return {"team": team, "agents": dict(sorted(agents.items()))}


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
