"""Build an agent's backend from the configuration: the built-in researcher or a model through its SDK."""

from __future__ import annotations

from enpire import config as cfg
from enpire import ledger
from enpire.agents.builtin import BuiltinResearcher, SearchSettings
from enpire.agents.llm import LLMAgent, LLMSettings
from enpire.agents.session import session_settings
from enpire.tasks import card


def make_client(config: cfg.Config, index: int):
    """The model client of agent `index`; a missing key fails here with one line (LLMConfigError)."""
    a = config.agents
    common = dict(base_url=a.base_url or None, timeout_s=a.request_timeout_s, user=f"agent-{index}")
    if a.backend == "anthropic":
        from enpire.agents.anthropic_backend import AnthropicClient

        return AnthropicClient(a.model, api_key_env=a.api_key_env or "ANTHROPIC_API_KEY", **common)
    from enpire.agents.openai_backend import OpenAIClient, OpenAIResponsesClient

    kind = OpenAIResponsesClient if a.backend == "openai_responses" else OpenAIClient
    return kind(a.model, api_key_env=a.api_key_env or "OPENAI_API_KEY", **common)


def make_backend(config: cfg.Config, index: int):
    """The backend of agent number `index`. Model clients are built here, so a missing key or a bad
    setting fails at start with one line (LLMConfigError), not later inside the fleet."""
    a = config.agents
    task = config.task()
    if a.backend in ("claude-code", "codex", "command"):  # CLI coding agents: enpire/agents/cli_backend.py
        from enpire.agents.cli_backend import make_cli_backend

        return make_cli_backend(config, index)
    if a.backend == "builtin":
        settings = SearchSettings(population=a.population, seeds_per_candidate=a.seeds_per_candidate,
                                  target=config.fleet.target, horizon=task.horizon, learn=a.learn,
                                  plateau_generations=a.plateau_generations,
                                  learn_min_successes=a.learn_min_successes)
        return BuiltinResearcher(settings, index, task.tuning_seeds.seeds(), task.driver, task.observation)
    price = a.prices.get(a.model)
    settings = LLMSettings(
        token_budget=a.token_budget, wall_budget_s=a.wall_budget_minutes * 60, max_turns_window=a.max_turns_window,
        context_chars=a.context_chars, max_output_tokens=a.max_output_tokens,
        max_output_ceiling=max(a.max_output_tokens, a.max_output_ceiling), max_failures=a.max_failures,
        pause_s=a.pause_s, target=config.fleet.target,
        pace_per_cell=a.pace_per_cell if config.scheduler.pooled else 0.0,  # unpooled: each owns its robot
        price=ledger.Price(price.input, price.output, price.cached_input, price.cache_write) if price else None,
        tools=session_settings(config),
    )
    return LLMAgent(make_client(config, index), settings, card=card(config.cells.task, config),
                    tuning_seeds=task.tuning_seeds.seeds(), rng_seed=index)


async def probe(config: cfg.Config) -> None:
    """Check once at start that the configured model exists and the key works (LLMConfigError if not)."""
    if config.agents.backend in ("anthropic", "openai", "openai_responses") and config.agents.count:
        await make_client(config, 0).probe()  # CLI agents were checked when built (node, CLI, jail, key)
