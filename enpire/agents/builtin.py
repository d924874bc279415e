"""The built-in researcher: an offline, deterministic agent backend (the embedded default).

It starts with no policy, writes a parametric heuristic policy for the task, and improves it with the
cross-entropy method over the policy's parameters, using fleet evaluations on tuning seeds. Each
generation it reads the digest, analyses how episodes failed, posts a finding, and proposes its best
candidate for promotion, which the scheduler judges on held-out seeds it never sees here.

Everything it does goes through `Tools`, the same surface model-driven backends use.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trio

from bus.messages import EvalResult, PolicySpec
from enpire.agents.tools import Tools, failure_summary, fingerprint

# The policy the researcher writes for each task: a module with PARAM_SPACE, INITIAL_PARAMS and Policy.
TEMPLATES = {
    "pusht": "enpire.agents.pusht_policy",
    "drawer-open-v3": "enpire.agents.metaworld_drawer_policy",
    "peg-insert-side-v3": "enpire.agents.metaworld_peg_policy",
}


@dataclass
class SearchSettings:
    population: int = 12
    elites: int = 3
    seeds_per_candidate: int = 6
    validation_seeds: int = 30
    init_std: float = 0.15
    min_std: float = 0.02
    smoothing: float = 0.3  # share of the old mean kept at each update
    target: float = 0.9
    horizon: int = 300
    step_weight: float = 0.3  # faster solutions score higher, so search keeps improving once all succeed


def _score(result: EvalResult, horizon: int, step_weight: float) -> float:
    """Success counts most; progress gives a gradient before anything succeeds; speed breaks the tie after."""
    n = max(1, len(result.episodes))
    success = sum(e.success for e in result.episodes) / n
    progress = sum(e.score for e in result.episodes) / n
    steps = sum(min(e.steps, horizon) for e in result.episodes) / n
    return success + 0.5 * progress - step_weight * steps / horizon


class BuiltinResearcher:
    def __init__(self, settings: SearchSettings, rng_seed: int, tuning_seeds: range, driver: str = "pusht"):
        if driver not in TEMPLATES:
            raise ValueError(f"the built-in researcher has no policy template for driver {driver!r}")
        self.settings = settings
        self.rng = np.random.default_rng(rng_seed)
        self.tuning = tuning_seeds
        self.template = importlib.import_module(TEMPLATES[driver])
        self.names = sorted(self.template.PARAM_SPACE)
        self.low = np.array([self.template.PARAM_SPACE[k][0] for k in self.names], dtype=float)
        self.high = np.array([self.template.PARAM_SPACE[k][1] for k in self.names], dtype=float)
        self.generation = 0

    # parameters live in [0, 1]^d for the search; the policy gets them in its own units
    def _params(self, x: np.ndarray) -> dict[str, float]:
        values = self.low + np.clip(x, 0.0, 1.0) * (self.high - self.low)
        return {k: round(float(v), 5) for k, v in zip(self.names, values, strict=True)}

    def _unit(self, params: dict[str, float]) -> np.ndarray:
        v = np.array([params[k] for k in self.names], dtype=float)
        return np.clip((v - self.low) / (self.high - self.low), 0.0, 1.0)

    def _seeds(self, n: int) -> list[int]:
        return [int(s) for s in self.rng.choice(len(self.tuning), size=n, replace=False) + self.tuning.start]

    async def run(self, tools: Tools) -> None:
        s = self.settings
        commit = await self._write_policy(tools)
        # Resuming (after a restart): start the search from the champion rather than from scratch.
        champion = tools.champion()
        start = {**self.template.INITIAL_PARAMS, **(champion.policy.params if champion else {})}
        mean = self._unit(start)
        std = np.full_like(mean, s.init_std)
        best_validated = -1.0
        promoting = False

        async def promote(spec: PolicySpec, validated: float) -> None:
            nonlocal promoting
            try:
                result = await tools.promote(spec)
                tools.post_finding(
                    hypothesis=f"candidate {spec.ref} (validation {validated:.0%}) beats the champion on held-out seeds",
                    change=f"promotion request for {spec.ref}",
                    evidence=result.detail,
                    outcome="improved" if result.promoted else "no_change",
                    fingerprint=fingerprint(["promote", spec.params]),
                    score=result.successes / max(1, result.n),
                )
            finally:
                promoting = False

        async with trio.open_nursery() as nursery:
            while True:
                if self._goal_met(tools):
                    await trio.sleep(1.0)  # done unless confirmation on further held-out seeds disagrees
                    continue
                self.generation += 1
                seeds = self._seeds(s.seeds_per_candidate)  # common seeds: candidates compared fairly
                xs = [mean] + [np.clip(mean + std * self.rng.standard_normal(mean.shape), 0, 1)
                               for _ in range(s.population - 1)]
                specs = [PolicySpec(commit=commit, params=self._params(x)) for x in xs]
                # A candidate any teammate already evaluated is not run again: its recorded score counts.
                fps = [fingerprint([self.source_hash, sp.params]) for sp in specs]
                known = [tools.tested(fp) for fp in fps]
                fresh = [i for i, k in enumerate(known) if k is None]
                evaluated = await _gather([lambda sp=specs[i], seeds=seeds: tools.evaluate(sp, seeds) for i in fresh])
                results: list[EvalResult | None] = [None] * len(specs)
                scores = np.array([k.score if k is not None else 0.0 for k in known])
                for i, result in zip(fresh, evaluated, strict=True):
                    results[i] = result
                    scores[i] = _score(result, s.horizon, s.step_weight)
                    tools.record_tested(fps[i], result, float(scores[i]))
                order = np.argsort(-scores, kind="stable")
                elite = np.array([xs[i] for i in order[: s.elites]])
                new_mean = (1 - s.smoothing) * elite.mean(axis=0) + s.smoothing * mean
                # Failure analysis steers exploration: a stalled search widens, a converging one narrows.
                best = results[order[0]] or await tools.evaluate(specs[order[0]], seeds)
                stalled = scores[order[0]] <= scores[0] + 1e-9
                spread = elite.std(axis=0) * (1.5 if stalled else 1.0)
                std = np.maximum(spread, s.min_std)
                moved = sorted(zip(self.names, new_mean - mean, strict=True), key=lambda kv: -abs(kv[1]))[:3]
                tools.post_finding(
                    hypothesis=f"generation {self.generation}: moving the search mean toward the elites improves success",
                    change="mean shift " + ", ".join(f"{k} {d:+.3f}" for k, d in moved),
                    evidence=f"best {failure_summary(best)}; {len(fresh)} run, {len(specs) - len(fresh)} reused "
                    "from teammates' results",
                    outcome="improved" if not stalled else "no_change",
                    fingerprint=fingerprint(specs[order[0]].params),
                    score=best.successes / max(1, len(best.episodes)),
                )
                mean = new_mean

                # Validate the best candidate on fresh tuning seeds before spending held-out episodes on it.
                best_rate = best.successes / max(1, len(best.episodes))
                champion = tools.champion()
                bar = champion.judged_successes / champion.judged_n if champion and champion.judged_n else 0.0
                if not promoting and best_rate > 0 and best_rate >= bar:
                    spec = specs[order[0]]
                    check = await tools.evaluate(spec, self._seeds(s.validation_seeds))
                    validated = check.successes / max(1, len(check.episodes))
                    if validated > max(bar, best_validated - 0.05) and validated > 0:
                        best_validated = max(best_validated, validated)
                        promoting = True
                        nursery.start_soon(promote, spec, validated)

    def _goal_met(self, tools: Tools) -> bool:
        champion = tools.champion()
        if champion is None or champion.judged_n == 0:
            return False
        if champion.n >= 50 and champion.successes / champion.n < self.settings.target:
            return False  # confirmation says it is not there yet: keep searching
        return champion.judged_successes / champion.judged_n >= self.settings.target + 0.03

    async def _write_policy(self, tools: Tools) -> str:
        """Start from nothing: write the heuristic policy into the agent's branch (once)."""
        source = Path(self.template.__file__).read_text()
        self.source_hash = hashlib.sha1(source.encode()).hexdigest()  # same code = same idea, whoever wrote it
        head = tools.workspace.head(tools.branch)
        if head is not None and (await tools.read_files(head)).get("policy.py") == source:
            return head  # written before a restart: keep the same commit
        commit = await tools.commit({"policy.py": source}, "heuristic policy: approach behind the block, push, turn")
        tools.post_finding(
            hypothesis="a phased heuristic (reach behind the block, push toward the goal, turn at the bar ends) "
            "can solve the task once its parameters are tuned",
            change=f"wrote policy.py ({len(self.names)} parameters) at {commit[:10]}",
            evidence="no policy existed",
            outcome="note",
        )
        return commit


async def _gather(thunks):
    """Run async callables concurrently and return their results in order."""
    results = [None] * len(thunks)

    async def one(i, fn):
        results[i] = await fn()

    async with trio.open_nursery() as nursery:
        for i, fn in enumerate(thunks):
            nursery.start_soon(one, i, fn)
    return results

