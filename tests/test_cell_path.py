"""The cell path for real (fleet core + a cell process + sandbox): pass@k and verdicts that name faults."""

from pathlib import Path

import pytest
import trio

from bus.messages import EvalRequest, EvalResult, PolicySpec
from enpire import config as cfg
from enpire.agents import pusht_policy
from enpire.fleet import open_state_dir, start_core

HEURISTIC = Path(pusht_policy.__file__).read_text()

# Sits still on its first attempt; once told of the failure it runs the heuristic (kept in lib.py).
RETRYING = """
import numpy as np
from lib import Policy as Heuristic


class Policy:
    def __init__(self, params):
        self.inner = Heuristic(params)
        self.failures = []

    def reset(self):
        self.inner.reset()

    def on_failure(self, info):
        self.failures.append(info)

    def act(self, obs):
        if not self.failures:
            return np.asarray(obs[:2], dtype=float)  # stay where we are
        return self.inner.act(obs)
"""

WILD = """
import numpy as np


class Policy:
    def __init__(self, params):
        self.t = 0

    def act(self, obs):
        self.t += 1
        return np.array([256.0, 256.0]) if self.t < 3 else np.array([900.0, 256.0])
"""


async def _evaluate(tmp_path, files, attempts=1, seeds=(11, 12)):
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **{"cells.count": 1, "agents.count": 0, "scheduler.background": False})
    board, meta = open_state_dir(tmp_path / "state")
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, tmp_path / "state", board, meta)
        commit = core.workspace.commit("agent/test", files, "test policy")
        with trio.fail_after(120):
            result = await core.judge.ask(
                EvalRequest(job_id="j", agent="t", task="pusht", policy=PolicySpec(commit, {}),
                            seeds=list(seeds), attempts=attempts), timeout=120)
        core.stopping.set()
        nursery.cancel_scope.cancel()
    board.close()
    assert isinstance(result, EvalResult), result
    return result


async def test_pass_at_k_continues_from_the_failed_state(tmp_path):
    result = await _evaluate(tmp_path, {"policy.py": RETRYING, "lib.py": HEURISTIC}, attempts=2)
    for e in result.episodes:
        assert not e.success  # pass@1: the first attempt sat still
        assert e.success_at_k  # pass@2: told of the failure, it solved the task from where it stood
        assert e.steps > 300  # both attempts ran in one rollout


async def test_wild_action_ends_the_episode_as_a_safety_violation(tmp_path):
    result = await _evaluate(tmp_path, {"policy.py": WILD}, seeds=(5,))
    (e,) = result.episodes
    assert not e.success and e.reason.startswith("safety_violation") and "bounds" in e.reason


ADVERSARIAL = Path(__file__).parent / "adversarial"


async def test_hostile_policies_do_not_stop_a_real_cell(tmp_path):
    """Several hostile policies in a row on one cell process; each verdict names what happened, none
    succeeds, and the same cell then runs the heuristic to success."""
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **{"cells.count": 1, "agents.count": 0, "scheduler.background": False})
    board, meta = open_state_dir(tmp_path / "state")
    expected = {
        "patch_verifier": "sandbox_denied", "kill_parent": "sandbox_denied", "loop_act": "policy_timeout",
        "fork": "sandbox_denied", "raises": "policy_error", "nan_action": "safety_violation",
        "exit_process": "policy_crashed",
    }
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, tmp_path / "state", board, meta)
        for name, reason in expected.items():
            commit = core.workspace.commit(f"agent/{name}", {"policy.py": (ADVERSARIAL / f"{name}.py").read_text()},
                                           name)
            with trio.fail_after(120):
                result = await core.judge.ask(EvalRequest(job_id=name, agent="t", task="pusht",
                                                              policy=PolicySpec(commit, {}), seeds=[3]), timeout=120)
            (e,) = result.episodes
            assert not e.success and reason in e.reason, (name, e.reason)
        commit = core.workspace.commit("agent/good", {"policy.py": HEURISTIC}, "good")
        result = await core.judge.ask(EvalRequest(job_id="good", agent="t", task="pusht",
                                                      policy=PolicySpec(commit, {}), seeds=[3, 4]), timeout=120)
        assert result.successes == 2
        core.stopping.set()
        nursery.cancel_scope.cancel()
    board.close()


ZERO_ARM = """
import numpy as np


class Policy:
    def __init__(self, params):
        pass

    def act(self, obs):
        return np.zeros(4)
"""


@pytest.mark.metaworld
async def test_meta_world_task_runs_from_the_config(tmp_path):
    pytest.importorskip("metaworld")
    text = """
[cells]
count = 1
task = "drawer"
[agents]
count = 0
[scheduler]
background = false
[tasks.drawer]
driver = "drawer-open-v3"
horizon = 60
[tasks.drawer.limits]
max_delta = 2.0
"""
    config = cfg.decode(text, "mw.toml")
    board, meta = open_state_dir(tmp_path / "state")
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, tmp_path / "state", board, meta)
        commit = core.workspace.commit("agent/t", {"policy.py": ZERO_ARM}, "still arm")
        with trio.fail_after(180):
            result = await core.judge.ask(EvalRequest(job_id="mw", agent="t", task="drawer",
                                                          policy=PolicySpec(commit, {}), seeds=[1, 2]), timeout=180)
        core.stopping.set()
        nursery.cancel_scope.cancel()
    board.close()
    assert isinstance(result, EvalResult) and len(result.episodes) == 2
    for e in result.episodes:
        assert not e.success and e.steps == 60 and e.reason.startswith("not solved")


# Counts the episodes its process has run and steps out of bounds at that step: the step a violation
# names is how many episodes the same sandbox process served.
COUNTING = """
import numpy as np

EPISODES = 0


class Policy:
    def __init__(self, params):
        self.t = 0

    def reset(self):
        global EPISODES
        EPISODES += 1
        self.t = 0

    def act(self, obs):
        self.t += 1
        return np.array([900.0, 256.0]) if self.t > EPISODES else np.asarray(obs[:2], dtype=float)
"""


async def test_policy_sandbox_survives_idle_time_between_episodes(tmp_path):
    """bwrap's --die-with-parent fires when the thread that started the jail ends, and trio ends its idle
    worker threads after 10 s: the cell's sandbox must outlive a quiet spell of the cell (16 s here) and
    serve the next episode of the same policy in the same process."""
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **{"cells.count": 1, "agents.count": 0, "scheduler.background": False})
    board, meta = open_state_dir(tmp_path / "state")
    steps = []
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, tmp_path / "state", board, meta)
        commit = core.workspace.commit("agent/count", {"policy.py": COUNTING}, "counting")
        for job, pause in (("first", 0.0), ("after-idle", 16.0)):
            await trio.sleep(pause)
            with trio.fail_after(120):
                result = await core.judge.ask(EvalRequest(job_id=job, agent="t", task="pusht",
                                                          policy=PolicySpec(commit, {}), seeds=[3]), timeout=120)
            (e,) = result.episodes
            assert e.reason.startswith("safety_violation"), e.reason
            steps.append(e.steps)
        core.stopping.set()
        nursery.cancel_scope.cancel()
    board.close()
    assert steps == [1, 2], steps  # [1, 1]: the sandbox died while the cell was idle and was started anew
