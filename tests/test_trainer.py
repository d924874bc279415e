"""The trainer actor: failures end as clear results and never take the fleet down; results are idempotent."""

import hashlib

import numpy as np
import pytest
import trio

from actors.runtime import ActorSystem
from actors.trainer import Trainer
from bus.blackboard import Blackboard
from bus.messages import PolicySpec, TrainRequest, TrainResult
from bus.records import EpisodeRecord
from enpire import config as cfg
from enpire.agents.pusht_policy import INITIAL_PARAMS
from enpire.agents.pusht_policy import Policy as Scripted
from enpire.agents.tools import LEARNED_POLICY, ToolError, Tools
from enpire.episodes import read_trajectory
from enpire.fleet import open_state_dir, start_core
from enpire.learning import mlp_policy
from enpire.learning.dataset import ARTIFACTS, record_scripted
from enpire.workspace import Workspace


async def test_unknown_recipe_and_failing_recipe_end_with_clear_errors(tmp_path):
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery)
        trainer = await system.spawn("trainer", lambda: Trainer(board, tmp_path))
        r = await trainer.ask(TrainRequest(job_id="j1", agent="a", task="pusht", recipe="magic"))
        assert isinstance(r, TrainResult) and not r.ok and "unknown recipe 'magic'" in r.error
        # no episodes recorded: the recipe process fails, the result says why in one line
        r = await trainer.ask(TrainRequest(job_id="j2", agent="a", task="pusht", recipe="bc", time_budget_s=60),
                              timeout=120)
        assert not r.ok and r.error.startswith("recipe failed") and "\n" not in r.error
        again = await trainer.ask(TrainRequest(job_id="j2", agent="a", task="pusht", recipe="bc"))
        assert again == r  # answered from the record, not run twice
        nursery.cancel_scope.cancel()


async def test_a_trained_checkpoint_runs_in_the_cells_as_the_trained_model(tmp_path):
    """Train BC through the trainer, commit the checkpoint as a policy version, evaluate it through a real
    cell (sandbox process), and find the trained model's own actions in the recorded episodes."""
    state = tmp_path / "state"
    assert record_scripted(state, lambda: Scripted(INITIAL_PARAMS), range(3))["successes"] == 3
    # a generous act timeout: on a loaded machine a missed deadline holds the last action, which is not the model's
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"cells.count": 1, "agents.count": 0, "scheduler.background": False,
                                   "sandbox.act_timeout_s": 1.0})
    board, meta = open_state_dir(state)
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, state, board, meta)
        tools = Tools("a", "pusht", core.workspace, core.judge, board, trainer=core.trainer,
                      artifacts=state / ARTIFACTS)
        with trio.fail_after(180):
            trained = await tools.train("bc", time_budget_s=60,
                                        options={"hidden": "32", "layers": "3", "max_epochs": "5"})
            assert trained.ok, trained.error
            assert trained.metrics["episodes"] == 3
            commit = await tools.commit_checkpoint(trained.artifact, "bc on 3 episodes")
            files = await tools.read_files(commit)
            assert files["policy.py"] == LEARNED_POLICY.read_text()
            assert files["weights.npz"] == (state / ARTIFACTS / f"{trained.artifact}.npz").read_bytes()
            result = await tools.evaluate(PolicySpec(commit), [11, 12])
        core.stopping.set()
        nursery.cancel_scope.cancel()
    episodes = [e for e in board.values("episodes", EpisodeRecord) if e.job_id == result.job_id]
    board.close()
    assert len(episodes) == 2 and not any(e.verdict.reason.startswith(("policy", "safety")) for e in episodes)

    model = mlp_policy.Policy({}, weights=mlp_policy.load_weights(str(state / ARTIFACTS / f"{trained.artifact}.npz")))
    heuristic = Scripted(INITIAL_PARAMS)
    differs = 0
    for e in episodes:
        arrays = read_trajectory(state / e.trajectory_file)
        obs, actions = arrays["observations"].astype(np.float64), arrays["actions"]
        assert len(actions) == e.steps > 10
        model.reset()
        heuristic.reset()
        for o, a in zip(obs, actions, strict=False):
            mine = model.act(o)
            # actions and observations were stored as float32 (rounding ~3e-5 px at this scale)
            np.testing.assert_allclose(mine, a, rtol=0, atol=1e-3)
            differs += bool(np.max(np.abs(heuristic.act(o) - a)) > 1.0)
    assert differs > 10  # the cell ran the trained model, not the policy it was trained on


async def test_commit_checkpoint_refuses_unknown_or_altered_checkpoints(tmp_path):
    artifacts = tmp_path / ARTIFACTS
    artifacts.mkdir()
    tools = Tools("a", "pusht", Workspace(tmp_path / "ws"), None, None, artifacts=artifacts)  # type: ignore[arg-type]
    data = b"PK\x03\x04 weights"
    good = hashlib.sha256(data).hexdigest()[:32]
    (artifacts / f"{good}.npz").write_bytes(data)
    commit = await tools.commit_checkpoint(good, "bc")
    assert tools.workspace.head("learned/a") == commit and tools.workspace.head("agent/a") is None
    with pytest.raises(ToolError, match="not a checkpoint hash"):
        await tools.commit_checkpoint("../../etc/passwd", "bc")
    with pytest.raises(ToolError, match="no checkpoint"):
        await tools.commit_checkpoint("0" * 32, "bc")
    (artifacts / f"{good}.npz").write_bytes(data + b"!")
    with pytest.raises(ToolError, match="does not match its content hash"):
        await tools.commit_checkpoint(good, "bc")
