"""The built-in researcher against a scripted scheduler: it writes a policy, searches, shares results."""

import trio

from actors.runtime import Actor, ActorSystem
from bus.blackboard import Blackboard
from bus.messages import EpisodeSummary, EvalRequest, EvalResult, PromoteRequest, PromoteResult
from bus.records import Finding
from enpire.agents.builtin import BuiltinResearcher, SearchSettings
from enpire.agents.tools import Tools
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
