"""The built-in researcher against a scripted scheduler and trainer: it writes a policy, searches,
shares results, and moves from tuning to learning when the evidence says so."""

import hashlib
from pathlib import Path

import pytest
import trio

from actors.runtime import Actor, ActorSystem
from actors.summarizer import write_digest
from bus.blackboard import Blackboard
from bus.messages import (
    EpisodeSummary,
    EvalRequest,
    EvalResult,
    PolicySpec,
    PromoteRequest,
    PromoteResult,
    TrainResult,
    Verdict,
)
from bus.records import EpisodeRecord, Finding
from enpire.agents.builtin import BuiltinResearcher, Evidence, SearchSettings, choose_regime
from enpire.agents.tools import LEARNED_POLICY, Tools
from enpire.workspace import Workspace


class ScriptedScheduler(Actor):
    """Answers evaluations with a success rate that grows with one parameter; counts what it ran."""

    name = "scheduler"
    concurrent_handlers = True
    evaluated: list = []

    async def handle(self, msg):
        if isinstance(msg, EvalRequest):
            if len(msg.seeds) == 3:  # search evaluations (validation runs use more seeds)
                ScriptedScheduler.evaluated.append((msg.agent, tuple(sorted(msg.policy.params.items()))))
            p = min(1.0, msg.policy.params["push_gain"] / 2)
            eps = [EpisodeSummary(f"{msg.job_id}:{i}", s, i < round(p * len(msg.seeds)), False, p, "x", 100)
                   for i, s in enumerate(msg.seeds)]
            return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=eps)
        if isinstance(msg, PromoteRequest):
            return PromoteResult(job_id=msg.job_id, policy=msg.policy, promoted=False, successes=0, n=0,
                                 champion_successes=0, champion_n=0, detail="scripted")


async def _one_generation(agent: str, seed: int, board, workspace, scheduler):
    tools = Tools(agent, "pusht", workspace, scheduler, board)
    researcher = BuiltinResearcher(SearchSettings(population=6, seeds_per_candidate=3), seed, range(0, 1000))
    with trio.move_on_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(researcher.run, tools)
            while not any(f.agent == agent and f.hypothesis.startswith("generation 1")
                          for f in board.values("findings", Finding)):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    return tools


async def test_builtin_writes_a_policy_and_teammates_do_not_rerun_tested_candidates(tmp_path):
    ScriptedScheduler.evaluated = []
    board = Blackboard(tmp_path / "bb")
    workspace = Workspace(tmp_path / "ws")
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery)
        scheduler = await system.spawn("scheduler", ScriptedScheduler)
        tools = await _one_generation("agent-0", 0, board, workspace, scheduler)
        files = await tools.read_files()
        assert "class Policy" in files["policy.py"]  # it started from nothing and wrote the policy
        first = [e for e in ScriptedScheduler.evaluated if e[0] == "agent-0"]
        # A teammate with the same search seed proposes the same candidates: none is run again.
        await _one_generation("agent-1", 0, board, workspace, scheduler)
        assert len(first) >= 6
        findings = board.values("findings", Finding)
        gen1 = next(f for f in findings if f.agent == "agent-1" and f.hypothesis.startswith("generation 1"))
        assert "0 run, 6 reused from teammates' results" in gen1.evidence
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- the regime rule

RULES = SearchSettings(plateau_generations=5, learn_min_successes=100, data_growth=2.0)


@pytest.mark.parametrize(("evidence", "regime", "rule"), [
    (Evidence(9, 500, learnable=False), "tune", "no_recipe"),
    (Evidence(4, 500), "tune", "improving"),
    (Evidence(5, 99), "tune", "few_successes"),
    (Evidence(5, 100), "bc", "plateau"),
    (Evidence(5, 150, {"bc": 100}, bc_beat_best=True), "tune", "tried"),
    (Evidence(5, 150, {"bc": 100}, bc_beat_best=False), "rl", "bc_stalled"),
    (Evidence(5, 150, {"bc": 100, "rl": 100}, bc_beat_best=False), "tune", "tried"),
    (Evidence(5, 200, {"bc": 100, "rl": 100}, bc_beat_best=False), "bc", "plateau"),  # the store doubled
    (Evidence(5, 100, {"bc": 0}, bc_beat_best=None), "bc", "plateau"),  # a failed run retries with data
    # from pixels: the imitation regime is the visuomotor CNN, and there is no RL to fall back on
    (Evidence(5, 100, imitation="visuomotor", rl=False), "visuomotor", "plateau"),
    (Evidence(5, 150, {"visuomotor": 100}, bc_beat_best=False, imitation="visuomotor", rl=False), "tune", "tried"),
    (Evidence(5, 200, {"visuomotor": 100}, bc_beat_best=False, imitation="visuomotor", rl=False), "visuomotor",
     "plateau"),
])
def test_regime_rule(evidence, regime, rule):
    choice = choose_regime(evidence, RULES)
    assert (choice.regime, choice.rule) == (regime, rule), choice
    assert str(evidence.successes) in choice.evidence or rule in ("no_recipe", "improving")


def test_regime_rule_can_be_switched_off():
    off = SearchSettings(learn=False)
    assert choose_regime(Evidence(50, 10_000), off).regime == "tune"


class LearningScheduler(Actor):
    """Tuned candidates all succeed half the time (a plateau); learned ones (no parameters) at `learned_rate`."""

    name = "scheduler"
    concurrent_handlers = True
    learned_rate = 1.0
    promoted: list = []

    async def handle(self, msg):
        if isinstance(msg, EvalRequest):
            rate = LearningScheduler.learned_rate if not msg.policy.params else 0.5
            eps = [EpisodeSummary(f"{msg.job_id}:{i}", s, i < round(rate * len(msg.seeds)), False, rate, "x", 100)
                   for i, s in enumerate(msg.seeds)]
            return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=eps)
        if isinstance(msg, PromoteRequest):
            LearningScheduler.promoted.append(msg.policy)
            return PromoteResult(job_id=msg.job_id, policy=msg.policy, promoted=False, successes=0, n=0,
                                 champion_successes=0, champion_n=0, detail="scripted")


class ScriptedTrainer(Actor):
    """Writes a checkpoint by content hash, as the trainer does, and remembers what it was asked."""

    name = "trainer"
    concurrent_handlers = True
    requests: list = []
    artifacts: Path = Path()
    fail = ""

    async def handle(self, msg):
        ScriptedTrainer.requests.append(msg)
        if ScriptedTrainer.fail:
            return TrainResult(job_id=msg.job_id, ok=False, error=ScriptedTrainer.fail)
        data = b"PK\x03\x04\xff" + msg.job_id.encode()  # binary, like an npz
        artifact = hashlib.sha256(data).hexdigest()[:32]
        ScriptedTrainer.artifacts.mkdir(parents=True, exist_ok=True)
        (ScriptedTrainer.artifacts / f"{artifact}.npz").write_bytes(data)
        return TrainResult(job_id=msg.job_id, ok=True, artifact=artifact,
                           metrics={"episodes": 120.0, "transitions": 9000.0, "wall_s": 3.0})


async def _run_until_learning(tmp_path, done, linger_s: float = 0.0, observation: str = "state"):
    """The researcher on a plateau (every tuned candidate succeeds half the time) with 120 recorded successes,
    until `done()`, then `linger_s` longer."""
    board = Blackboard(tmp_path / "bb")
    verdict = Verdict(True, 1.0, "success", "pusht_state")
    for i in range(130):  # 120 successes the recipe may use; held-out ones never count
        kind = "agent" if i < 120 else "heldout"
        board.put("episodes", f"e{i}", EpisodeRecord(f"e{i}", "j", kind, "pusht", i, PolicySpec("c"), "cell-0",
                                                      verdict, True, 1, 50, 0.1, 1.0, 0.01, 1.0, f"episodes/e{i}.npz"))
    workspace = Workspace(tmp_path / "ws")
    settings = SearchSettings(population=4, elites=2, seeds_per_candidate=2, validation_seeds=4,
                              plateau_generations=3, learn_min_successes=100)
    researcher = BuiltinResearcher(settings, 0, range(0, 1000), "pusht", observation)
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery)
        scheduler = await system.spawn("scheduler", LearningScheduler)
        trainer = await system.spawn("trainer", ScriptedTrainer)
        tools = Tools("agent-0", "pusht", workspace, scheduler, board, trainer=trainer, artifacts=tmp_path / "artifacts")
        with trio.fail_after(30):
            nursery.start_soon(researcher.run, tools)
            while not done():
                await trio.sleep(0.01)
            await trio.sleep(linger_s)
        nursery.cancel_scope.cancel()
    return board, workspace, researcher


@pytest.mark.parametrize("bc_good", [True, False], ids=["bc_promoted", "bc_stalls_then_rl"])
async def test_researcher_moves_from_tuning_to_learning_on_a_plateau(tmp_path, bc_good):
    LearningScheduler.learned_rate, LearningScheduler.promoted = (1.0 if bc_good else 0.25), []
    ScriptedTrainer.requests, ScriptedTrainer.artifacts, ScriptedTrainer.fail = [], tmp_path / "artifacts", ""
    board, workspace, researcher = await _run_until_learning(
        tmp_path, lambda: any(not p.params for p in LearningScheduler.promoted) if bc_good
        else any(r.recipe == "rl" for r in ScriptedTrainer.requests))
    bc = ScriptedTrainer.requests[0]
    assert bc.recipe == "bc" and researcher.trained_on["bc"] == 120  # only the agents' episodes count
    bc_artifact = researcher.bc_artifact
    findings = board.values("findings", Finding)
    chosen = next(f for f in findings if f.regime == "bc" and f.outcome == "note")
    assert "plateaued (3 generations" in chosen.evidence and "120 successes" in chosen.evidence
    trained = next(f for f in findings if f.regime == "bc" and f.outcome != "note")
    assert trained.outcome == ("improved" if bc_good else "no_change")
    assert "validation 100% on 4 tuning seeds vs best validated 50%" in trained.evidence or not bc_good
    if bc_good:
        learned = next(p for p in LearningScheduler.promoted if not p.params)
        files = workspace.read(learned.commit)
        assert files["policy.py"] == LEARNED_POLICY.read_text()  # the trained model's policy file, weights beside it
        assert files["weights.npz"] == (tmp_path / "artifacts" / f"{bc_artifact}.npz").read_bytes()
        assert "regimes: agent-0 tune > bc" in write_digest(findings, None).text
    else:
        assert not any(not p.params for p in LearningScheduler.promoted)  # a worse model is not proposed
        rl = next(r for r in ScriptedTrainer.requests if r.recipe == "rl")
        assert rl.options["init_artifact"] == bc_artifact  # RL starts from the BC checkpoint
        assert any(f.regime == "rl" and "did not beat" in f.evidence for f in findings)


async def test_from_pixels_the_researcher_tunes_perception_then_trains_a_visuomotor_policy(tmp_path):
    """Pixels: the first guess is the perception template with its controller beside it; on a plateau the
    imitation regime is the visuomotor CNN, and a model that does not beat tuning leads back to tuning
    (there is no RL from pixels)."""
    from enpire.agents import pusht_pixels_policy, pusht_policy

    LearningScheduler.learned_rate, LearningScheduler.promoted = 0.25, []
    ScriptedTrainer.requests, ScriptedTrainer.artifacts, ScriptedTrainer.fail = [], tmp_path / "artifacts", ""
    board, workspace, researcher = await _run_until_learning(
        tmp_path, lambda: bool(ScriptedTrainer.requests), linger_s=2.0, observation="pixels")
    files = workspace.read(workspace.head("agent/agent-0"))
    assert files["policy.py"] == Path(pusht_pixels_policy.__file__).read_text()
    assert files["pusht_policy.py"] == Path(pusht_policy.__file__).read_text()
    assert [r.recipe for r in ScriptedTrainer.requests] == ["visuomotor"] and researcher.trained_on["visuomotor"] == 120
    findings = board.values("findings", Finding)
    assert any(f.regime == "visuomotor" and f.outcome == "note" and "plateaued" in f.evidence for f in findings)
    assert any(f.regime == "visuomotor" and f.outcome == "no_change" for f in findings)  # 25% < tuned 50%
    assert not any(f.regime == "rl" for f in findings) and not researcher.learning


async def test_a_failed_training_job_is_a_finding_and_tuning_goes_on(tmp_path):
    LearningScheduler.learned_rate, LearningScheduler.promoted = 1.0, []
    ScriptedTrainer.requests, ScriptedTrainer.artifacts = [], tmp_path / "artifacts"
    ScriptedTrainer.fail = "recipe failed (exit 2): error: NaN loss: non-finite training loss at epoch 0 step 0"
    board, _, researcher = await _run_until_learning(tmp_path, lambda: bool(ScriptedTrainer.requests), linger_s=0.5)
    failed = [f for f in board.values("findings", Finding) if f.outcome == "inconclusive"]
    assert len(failed) == 1 and failed[0].regime == "bc" and "NaN loss" in failed[0].evidence
    assert not researcher.learning and researcher.generation > 5  # tuning carried on
    assert len(ScriptedTrainer.requests) == 1  # not retried until the store has grown
    assert not any(not p.params for p in LearningScheduler.promoted)


def test_policy_eval_judges_like_a_cell():
    """The offline evaluation tool: the fleet's action checks and verifier, one loop for every task."""
    from enpire.agents import pusht_policy
    from enpire.agents.policy_eval import evaluate, run_episode
    from enpire.safety import ActionLimits
    from hw import make_driver

    driver = make_driver("pusht")
    limits = ActionLimits(dim=2, low=0.0, high=512.0, max_delta=100.0)
    summary = evaluate(driver, pusht_policy, pusht_policy.INITIAL_PARAMS, [1000000, 1000001], limits)
    assert summary["episodes"] == 2 and summary["violations"] == 0 and summary["success_rate"] == 1.0

    class Jumpy:
        def reset(self):
            self.t = 0

        def act(self, obs):
            self.t += 1
            return [256.0, 256.0] if self.t < 3 else [256.0, 400.0]

    episode = run_episode(driver, Jumpy(), 1000000, limits)
    assert not episode["success"] and episode["steps"] == 3
    assert episode["violation"] == "safety_violation: step change 144 > 100"
    driver.disconnect()


async def test_a_refused_promotion_does_not_crash_the_built_in_agent():
    """After the run's end (or with the held-out pool spent) the judge refuses a promotion: the researcher
    carries on (before, the refusal raised out of its task and crashed the agent)."""
    from enpire.agents.tools import ToolError

    class Refusing:
        async def promote(self, spec):
            raise ToolError("promotion refused: the run has ended")

    researcher = BuiltinResearcher(SearchSettings(population=6, seeds_per_candidate=3), 0, range(0, 1000))
    researcher.promoting = True
    await researcher._promote(Refusing(), PolicySpec("c0ffee", {}), 1.0)
    assert researcher.promoting is False
