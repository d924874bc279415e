"""Build an agent's backend from the configuration: the built-in researcher or a model through its SDK."""

from __future__ import annotations

from enpire import config as cfg
from enpire.agents.builtin import BuiltinResearcher, SearchSettings
from enpire.agents.llm import TASK_TEXTS, LLMAgent, LLMSettings


def make_backend(config: cfg.Config, index: int):
    """The backend of agent number `index`. Model clients are built here, so a missing key or a bad
    setting fails at start with one line (LLMConfigError), not later inside the fleet."""
    a = config.agents
    task = config.task()
    if a.backend == "builtin":
        settings = SearchSettings(population=a.population, seeds_per_candidate=a.seeds_per_candidate,
                                  target=config.fleet.target, horizon=task.horizon, learn=a.learn,
                                  plateau_generations=a.plateau_generations,
                                  learn_min_successes=a.learn_min_successes)
        return BuiltinResearcher(settings, index, task.tuning_seeds.seeds(), task.driver, task.observation)
    if a.backend == "anthropic":
        from enpire.agents.anthropic_backend import AnthropicClient

        client = AnthropicClient(a.model, api_key_env=a.api_key_env or "ANTHROPIC_API_KEY",
                                 base_url=a.base_url or None, timeout_s=a.request_timeout_s, user=f"agent-{index}")
    else:
        from enpire.agents.openai_backend import OpenAIClient

        client = OpenAIClient(a.model, api_key_env=a.api_key_env or "OPENAI_API_KEY",
                              base_url=a.base_url or None, timeout_s=a.request_timeout_s, user=f"agent-{index}")
    settings = LLMSettings(
        token_budget=a.token_budget, wall_budget_s=a.wall_budget_minutes * 60, max_turns_window=a.max_turns_window,
        max_output_tokens=a.max_output_tokens, max_failures=a.max_failures, pause_s=a.pause_s,
        notes_dir=a.notes_dir, target=config.fleet.target, digest=a.digest, horizon=task.horizon,
        pace_per_cell=a.pace_per_cell if config.scheduler.pooled else 0.0,  # unpooled: each owns its robot
    )
    return LLMAgent(client, settings, task_text=TASK_TEXTS.get(task.driver, config.cells.task),
                    tuning_seeds=task.tuning_seeds.seeds(), rng_seed=index)
