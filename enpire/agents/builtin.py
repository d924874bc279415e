"""The built-in researcher: an offline, deterministic agent backend (the embedded default).

It improves the task's policy in three regimes and chooses between them from evidence (`choose_regime`,
a pure function of what it has measured):

- tune: it writes a parametric heuristic policy for the task and tunes its parameters by the
  cross-entropy method on fleet evaluations (tuning seeds). It starts here, and tuning never stops:
  it keeps the cells busy and the episode store growing while a model trains.
- bc: behaviour cloning on the fleet's own recorded successes, through the trainer. Chosen when tuning
  has plateaued -- the best elite-mean score of a generation has not risen by `plateau_gain` for
  `plateau_generations` generations -- and the store holds at least `learn_min_successes` successful
  agent episodes of the task (held-out episodes are never training data); chosen again once the
  store has grown `data_growth` times since the last BC model.
- rl: TD3+BC, offline then briefly online, starting from the last BC checkpoint. Chosen on the same
  plateau when the last BC model did not beat the best validated candidate (BC stalled), again only
  once per `data_growth` of the store.

With pixel observations (Push-T from a camera) the tuned template is perception inside the policy
(`pusht_pixels_policy.py`: a pose estimate from the frame feeding the state controller), and the
imitation regime is "visuomotor" in place of "bc": a small CNN trained on the recorded frames of the
fleet's successes (`enpire.learning.visuomotor`), chosen by the same rule; there is no RL from pixels.

A trained checkpoint becomes a workspace commit (policy.py + weights.npz) and is judged like any
candidate: validated on fresh tuning seeds, then promoted through the scheduler's gate on held-out
seeds it never sees here. Every choice of regime is posted as a finding that names the regime and the
evidence, so the digest and the report can say which regimes the team used.

Everything it does goes through `Tools`, the same surface model-driven backends use.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
import trio

from bus.messages import EvalResult, PolicySpec
from enpire.agents import budget
from enpire.agents.model import LLMConfigError
from enpire.agents.tools import ToolError, Tools, failure_summary, fingerprint

# The policy the researcher writes for each task: a module with PARAM_SPACE, INITIAL_PARAMS and Policy.
TEMPLATES = {
    "pusht": "enpire.agents.pusht_policy",
    "drawer-open-v3": "enpire.agents.metaworld_drawer_policy",
    "peg-insert-side-v3": "enpire.agents.metaworld_peg_policy",
}
# With pixel observations (a camera frame, no object pose): perception inside the policy feeding the
# state template's controller.
PIXEL_TEMPLATES = {"pusht": "enpire.agents.pusht_pixels_policy"}
LEARNABLE = {"pusht"}  # tasks the learning library has features and a policy file for

Regime = Literal["tune", "bc", "rl", "visuomotor"]


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
    # regime choice (see choose_regime)
    learn: bool = True
    plateau_generations: int = 5
    plateau_gain: float = 0.02  # in score units: success + 0.5 progress - step_weight * steps / horizon
    learn_min_successes: int = 100
    data_growth: float = 2.0
    train_budget_s: float = 300.0
    rl_online_episodes: int = 20


# ----------------------------------------------------------------------------- the regime rule


@dataclass(frozen=True)
class Evidence:
    stalled: int  # generations since the best elite-mean tuning score last rose by plateau_gain
    successes: int  # successful agent episodes of the task in the store (what a recipe trains on)
    trained_on: dict[str, int] = field(default_factory=dict)  # recipe -> successes when it last trained
    bc_beat_best: bool | None = None  # did the last imitation model beat the best validated candidate
    learnable: bool = True  # a training recipe exists for this task and the fleet has a trainer
    imitation: Regime = "bc"  # the imitation recipe for this observation: "bc" (state) or "visuomotor" (pixels)
    rl: bool = True  # an RL recipe exists for this observation (none from pixels)


@dataclass(frozen=True)
class Choice:
    regime: Regime
    rule: str  # which clause decided: a finding is posted when this changes
    evidence: str


def choose_regime(e: Evidence, s: SearchSettings) -> Choice:
    """Which regime to start next; "tune" means: no learning job, keep tuning."""
    if not (e.learnable and s.learn):
        return Choice("tune", "no_recipe", "no training recipe (or trainer) for this task: tuning only")
    if e.stalled < s.plateau_generations:
        return Choice("tune", "improving", f"tuning improved within the last {s.plateau_generations} generations")
    plateau = f"tuning plateaued ({e.stalled} generations without a gain of {s.plateau_gain})"
    if e.successes < s.learn_min_successes:
        return Choice("tune", "few_successes",
                      f"{plateau}, but the store holds {e.successes} successes (< {s.learn_min_successes})")

    def data_grew(recipe: str) -> bool:
        return recipe not in e.trained_on or e.successes >= s.data_growth * max(1, e.trained_on[recipe])

    im = e.imitation
    if data_grew(im):
        since = f", {e.trained_on[im]} at the last {im} model" if im in e.trained_on else ""
        return Choice(im, "plateau", f"{plateau}; the store holds {e.successes} successes{since}")
    if e.rl and e.bc_beat_best is False and data_grew("rl"):
        return Choice("rl", "bc_stalled", f"{plateau}; the store holds {e.successes} successes; the {im} model "
                      f"trained on {e.trained_on[im]} did not beat the best validated candidate")
    return Choice("tune", "tried", f"{plateau}; learning already tried on this much data ({e.successes} successes): "
                  f"tuning gathers more")


def _score(result: EvalResult, horizon: int, step_weight: float) -> float:
    """Success counts most; progress gives a gradient before anything succeeds; speed breaks the tie after."""
    n = max(1, len(result.episodes))
    success = sum(e.success for e in result.episodes) / n
    progress = sum(e.score for e in result.episodes) / n
    steps = sum(min(e.steps, horizon) for e in result.episodes) / n
    return success + 0.5 * progress - step_weight * steps / horizon


def _rate(result: EvalResult) -> float:
    return result.successes / max(1, len(result.episodes))


# ----------------------------------------------------------------------------- the researcher


def template_for(driver: str, observation: str) -> str | None:
    """The module of the built-in researcher's policy template for a driver and observation, or None."""
    return (PIXEL_TEMPLATES if observation == "pixels" else TEMPLATES).get(driver)


class BuiltinResearcher:
    def __init__(self, settings: SearchSettings, rng_seed: int, tuning_seeds: range, driver: str = "pusht",
                 observation: str = "state"):
        if (template := template_for(driver, observation)) is None:  # the fleet says it at start, in one line
            raise LLMConfigError(f"cells.task: the built-in agent (agents.backend 'builtin') has no policy template "
                                 f"for driver {driver!r} with {observation} observations; give it a model backend, "
                                 "or a starting policy ([fleet] baseline) and agents.count 0")
        self.settings = settings
        self.rng = np.random.default_rng(rng_seed)
        self.tuning = tuning_seeds
        self.driver = driver
        self.observation = observation
        self.template = importlib.import_module(template)
        self.names = sorted(self.template.PARAM_SPACE)
        self.low = np.array([self.template.PARAM_SPACE[k][0] for k in self.names], dtype=float)
        self.high = np.array([self.template.PARAM_SPACE[k][1] for k in self.names], dtype=float)
        self.generation = 0
        self.best_validated = -1.0  # best success rate of this agent's candidates on validation seeds
        self.promoting = False  # one promotion request at a time
        # evidence for the regime rule
        self.stalled = 0
        self.best_elite = -np.inf
        self.trained_on: dict[str, int] = {}
        self.bc_artifact = ""
        self.bc_beat_best: bool | None = None
        self.learning = False  # a training job (and its evaluation) is under way
        self.last_rule = ""

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
        learnable = self.driver in LEARNABLE and tools.trainer is not None and tools.artifacts is not None
        pixels = self.observation == "pixels"  # imitation from camera frames (a CNN); no RL recipe for them

        async with trio.open_nursery() as nursery:
            while True:
                # Done unless confirmation on further held-out seeds disagrees; the margin leaves room for
                # the confirmation's noise, which judges the champion only after 50 more episodes.
                if budget.team_goal_met(tools, s.target, margin=0.03, confirm_after=50):
                    await tools.champion_changed(timeout=60.0)
                    continue

                # ---- tune: one generation of the cross-entropy method on common tuning seeds
                self.generation += 1
                seeds = self._seeds(s.seeds_per_candidate)  # common seeds: candidates compared fairly
                xs = [mean] + [np.clip(mean + std * self.rng.standard_normal(mean.shape), 0, 1)
                               for _ in range(s.population - 1)]
                specs = [PolicySpec(commit=commit, params=self._params(x)) for x in xs]
                # A candidate any teammate already evaluated is not run again: its recorded score counts.
                fps = [fingerprint([self.source_hash, sp.params]) for sp in specs]
                known = [tools.tested(fp) for fp in fps]
                fresh = [i for i, k in enumerate(known) if k is None]
                # The first guess (the template at its initial parameters) is asked for alone, before its
                # siblings: the judge takes the first candidate evaluated as where the run started.
                head = fresh[:1] if self.generation == 1 and champion is None and fresh[:1] == [0] else []
                evaluated = [*await _gather([lambda sp=specs[i], seeds=seeds: tools.evaluate(sp, seeds) for i in head]),
                             *await _gather([lambda sp=specs[i], seeds=seeds: tools.evaluate(sp, seeds)
                                             for i in fresh[len(head):]])]
                results: list[EvalResult | None] = [None] * len(specs)
                scores = np.array([k.score if k is not None else 0.0 for k in known])
                for i, result in zip(fresh, evaluated, strict=True):
                    results[i] = result
                    scores[i] = _score(result, s.horizon, s.step_weight)
                    await tools.record_tested(fps[i], result, float(scores[i]))
                order = np.argsort(-scores, kind="stable")
                elite = np.array([xs[i] for i in order[: s.elites]])
                new_mean = (1 - s.smoothing) * elite.mean(axis=0) + s.smoothing * mean
                # Failure analysis steers exploration: a stalled search widens, a converging one narrows.
                best = results[order[0]] or await tools.evaluate(specs[order[0]], seeds)
                mean_is_best = scores[order[0]] <= scores[0] + 1e-9
                spread = elite.std(axis=0) * (1.5 if mean_is_best else 1.0)
                std = np.maximum(spread, s.min_std)
                moved = sorted(zip(self.names, new_mean - mean, strict=True), key=lambda kv: -abs(kv[1]))[:3]
                await tools.post_finding(
                    hypothesis=f"generation {self.generation}: moving the search mean toward the elites improves success",
                    change="mean shift " + ", ".join(f"{k} {d:+.3f}" for k, d in moved),
                    evidence=f"best {failure_summary(best)}; {len(fresh)} run, {len(specs) - len(fresh)} reused "
                    "from teammates' results",
                    outcome="no_change" if mean_is_best else "improved",
                    fingerprint=fingerprint(specs[order[0]].params),
                    score=best.successes / max(1, len(best.episodes)),
                )
                mean = new_mean
                # Plateau: the generation's elite mean (less noisy than its best) stopped rising.
                elite_score = float(scores[order[: s.elites]].mean())
                if elite_score >= self.best_elite + s.plateau_gain:
                    self.best_elite, self.stalled = elite_score, 0
                else:
                    self.stalled += 1

                # Validate the best candidate on fresh tuning seeds before spending held-out episodes on it.
                champion = tools.champion()
                bar = champion.judged_rate if champion else 0.0
                if not self.promoting and _rate(best) > 0 and _rate(best) >= bar:
                    check = await tools.evaluate(specs[order[0]], self._seeds(s.validation_seeds))
                    self._propose(tools, nursery, specs[order[0]], _rate(check), tolerance=0.05)

                # ---- choose: start a learning regime when the evidence says so (tuning carries on)
                if self.learning:
                    continue
                successes = await trio.to_thread.run_sync(tools.training_successes) if learnable else 0
                choice = choose_regime(Evidence(self.stalled, successes, dict(self.trained_on), self.bc_beat_best,
                                                learnable, "visuomotor" if pixels else "bc", not pixels), s)
                if choice.rule != self.last_rule and choice.rule != "improving":  # why it tunes on, or learns
                    await tools.post_finding(
                        hypothesis=f"regime {choice.regime}: the evidence favours it now",
                        change=f"regime {choice.regime} ({choice.rule})", evidence=choice.evidence,
                        outcome="note", regime=choice.regime,
                    )
                self.last_rule = choice.rule
                if choice.regime != "tune":
                    self.learning = True
                    self.trained_on[choice.regime] = successes
                    nursery.start_soon(self._learn, tools, nursery, choice.regime, successes)

    async def _learn(self, tools: Tools, nursery: trio.Nursery, recipe: Regime, successes: int) -> None:
        """Train `recipe` on the store, commit the checkpoint, validate it like any candidate, propose it."""
        s = self.settings
        try:
            options = {"seed": str(self.generation)}
            if recipe == "rl":
                options |= {"init_artifact": self.bc_artifact, "online_episodes": str(s.rl_online_episodes)}
            champion = tools.champion()
            if recipe == "visuomotor" and champion is not None:  # the expert that relabels the frames
                options["expert_params"] = json.dumps(champion.policy.params)
            hypothesis = f"{recipe} on the fleet's {successes} recorded successes beats the best tuned candidate"
            try:
                trained = await tools.train(recipe, time_budget_s=s.train_budget_s, options=options)
                if not trained.ok:
                    raise ToolError(trained.error or "training failed")
                m = trained.metrics
                commit = await tools.commit_checkpoint(
                    trained.artifact, f"{recipe} on {m.get('episodes', 0):.0f} recorded successes")
                spec = PolicySpec(commit=commit)
                check = await tools.evaluate(spec, self._seeds(s.validation_seeds))
            except ToolError as exc:  # a failed job is evidence too; the fleet and the tuning carry on
                await tools.post_finding(hypothesis=hypothesis, change=f"trained {recipe}: failed", evidence=str(exc),
                                   outcome="inconclusive", regime=recipe)
                return
            validated = _rate(check)
            beat = validated > self.best_validated
            if recipe in ("bc", "visuomotor"):
                self.bc_artifact, self.bc_beat_best = trained.artifact, beat
            await tools.post_finding(
                hypothesis=hypothesis,
                change=f"trained {recipe} ({m.get('episodes', 0):.0f} episodes, {m.get('transitions', 0):.0f} "
                f"transitions, {m.get('wall_s', 0):.0f} s), checkpoint {trained.artifact[:12]} at {commit[:10]}",
                evidence=f"validation {validated:.0%} on {len(check.episodes)} tuning seeds vs best validated "
                f"{max(self.best_validated, 0):.0%}; {failure_summary(check)}",
                outcome="improved" if beat else "no_change",
                fingerprint=fingerprint([recipe, trained.artifact]), score=validated, regime=recipe,
            )
            while self.promoting:  # the same gate as tuned candidates, one request at a time
                await trio.sleep(1.0)
            self._propose(tools, nursery, spec, validated, tolerance=0.0)
        finally:
            self.learning = False

    def _propose(self, tools: Tools, nursery: trio.Nursery, spec: PolicySpec, validated: float,
                 tolerance: float) -> None:
        """Ask the scheduler to judge a validated candidate on held-out seeds when it beats the champion's
        judged rate and (within `tolerance`) this agent's best validated candidate so far."""
        champion = tools.champion()
        bar = champion.judged_rate if champion else 0.0
        if self.promoting or validated <= 0 or validated <= max(bar, self.best_validated - tolerance):
            return
        self.best_validated = max(self.best_validated, validated)
        self.promoting = True
        nursery.start_soon(self._promote, tools, spec, validated)

    async def _promote(self, tools: Tools, spec: PolicySpec, validated: float) -> None:
        try:
            try:
                result = await tools.promote(spec)
            except ToolError:  # refused (the run has ended, the held-out pool is spent): the judge said why
                return
            await tools.post_finding(
                hypothesis=f"candidate {spec.ref} (validation {validated:.0%}) beats the champion on held-out seeds",
                change=f"promotion request for {spec.ref}",
                evidence=result.detail,
                outcome="improved" if result.promoted else "no_change",
                fingerprint=fingerprint(["promote", spec.commit, spec.params]),
                score=result.successes / max(1, result.n),
            )
        finally:
            self.promoting = False

    async def _write_policy(self, tools: Tools) -> str:
        """Start from nothing: write the heuristic policy into the agent's branch (once)."""
        source = Path(self.template.__file__).read_text()
        # Modules the template imports from beside it (e.g. the controller a perception policy feeds).
        files = {"policy.py": source, **{f"{name}.py": Path(importlib.import_module(f"enpire.agents.{name}").__file__)
                                        .read_text() for name in getattr(self.template, "COMPANIONS", ())}}
        self.source_hash = hashlib.sha1(msgspec.json.encode(files, order="sorted")).hexdigest()  # same code = same idea
        head = await trio.to_thread.run_sync(tools.workspace.head, tools.branch)
        current = await tools.read_files(head) if head is not None else {}  # (an await inside all() is an async generator)
        if head is not None and all(current.get(k) == v for k, v in files.items()):
            return head  # written before a restart: keep the same commit
        commit = await tools.commit(files, "heuristic policy: approach behind the block, push, turn")
        await tools.post_finding(
            hypothesis="a phased heuristic (reach behind the block, push toward the goal, turn at the bar ends) "
            "can solve the task once its parameters are tuned",
            change=f"wrote policy.py ({len(self.names)} parameters) at {commit[:10]}",
            evidence="no policy existed",
            outcome="note",
            regime="tune",
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
