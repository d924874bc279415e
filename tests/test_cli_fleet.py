"""Claude Code and Codex drive a real fleet through its MCP server, as the paper runs them.

A daemon with 2 simulated Push-T cells runs one CLI agent (`[agents] backend = "claude-code" | "codex"`)
whose model is a scripted loopback server playing a competent agent: with the CLI's own tools it writes a
policy from scratch, checks it locally on tuning seeds and commits it; with the fleet's MCP tools it
evaluates it on the cells, waits, inspects a failed episode (an image comes back), edits, commits and
promotes. Then the fleet's records must show the candidate on real cells, judged on held-out seeds, and
the token ledger must equal the usage the server reported, call for call.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.blackboard import Blackboard
from bus.records import EpisodeRecord, HeldoutRecord, TokenRecord
from enpire import config as cfg
from enpire.heldout import order
from enpire.workspace import Workspace
from tests.cli_harness import KINDS, MAIN_TOOL, MODEL, PROVIDER, require, shell, write
from tests.scripted_models import Reply, ScriptedModel, Steps

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
[fleet]
budget_minutes = {budget}
baseline = "{baseline}"
target = 1.0  # never met: the run lasts its budget
min_heldout = 30
progress_s = 2.0
[cells]
count = {cells}
task = "pusht"
[agents]
count = {agents}
backend = "{kind}"
model = "{model}"
base_url = "{url}"
api_key_env = "ENPIRE_TEST_MODEL_KEY"
max_turns = {max_turns}
turn_minutes = {turn_minutes}
[scheduler]
promote_seeds = 30
heartbeat_s = 0.5
"""

POLICY = '''import numpy as np


class Policy:
    """Walk the pusher towards the block, a bounded step at a time."""

    def __init__(self, params):
        self.step = float(params.get("step", 40.0))

    def reset(self):
        pass

    def act(self, obs):
        agent, block = np.asarray(obs[0:2], dtype=float), np.asarray(obs[2:4], dtype=float)
        return np.clip(agent + np.clip(block - agent, -self.step, self.step), 0.0, 512.0)
'''


def start_fleet(tmp_path: Path, kind: str, url: str, *, cells=2, agents=1, max_turns=1, turn_minutes=4.0,
                budget_minutes=6.0, baseline="", extra_env=None) -> subprocess.Popen:
    config = tmp_path / "fleet.toml"
    config.write_text(CONFIG.format(kind=kind, model=MODEL[kind], url=url, cells=cells, agents=agents,
                                    max_turns=max_turns, turn_minutes=turn_minutes, budget=budget_minutes,
                                    baseline=baseline))
    env = {**os.environ, "ENPIRE_TEST_MODEL_KEY": "sk-model-key-of-the-test", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "enpire.fleet", "--config", str(config), "--state-dir",
                             str(tmp_path / "state"), "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_fleet(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=120)


def _field(text: str, name: str) -> str:
    m = re.search(rf'"{name}":"([^"]+)"', text)
    assert m, f"no {name} in {text[:500]}"
    return m.group(1)


def competent(kind: str, worktree: str) -> Steps:
    """The script of a competent agent (each step sees the results of the previous one)."""
    seen: dict[str, str] = {}

    def evaluate(ex):
        return Reply(text="Now on the fleet's cells.", calls=((ex.tool("evaluate"), {"n_seeds": 6}),))

    def wait_eval(ex):
        seen["eval"] = _field(ex.results[-1], "job")
        return Reply(calls=((ex.tool("wait"), {"jobs": [seen["eval"]], "timeout_s": 300}),))

    def job(ex):
        return Reply(calls=((ex.tool("job"), {"job": seen["eval"]}),))

    def episode(ex):
        failed = [line.split()[1].rstrip(":") for line in ex.results[-1].splitlines()
                  if line.startswith("episode ") and " success " not in line]
        seen["episode"] = failed[0] if failed else re.findall(r"episode (\S+):", ex.results[-1])[0]
        return Reply(text="Looking at a failed episode.",
                     calls=((ex.tool("episode"), {"episode": seen["episode"], "frames": 3}),))

    def edit(ex):
        seen["images"] = str(ex.images)
        if kind == "claude-code":
            return Reply(calls=(("Edit", {"file_path": f"{worktree}/policy.py", "old_string": '"step", 40.0',
                                          "new_string": '"step", 30.0'}),))
        return Reply(calls=shell(kind, "sed -i 's/\"step\", 40.0/\"step\", 30.0/' policy.py"))

    def promote(ex):
        return Reply(calls=((ex.tool("promote"), {}),))

    def wait_promote(ex):
        seen["promote"] = _field(ex.results[-1], "job")
        return Reply(calls=((ex.tool("wait"), {"jobs": [seen["promote"]], "timeout_s": 600}),))

    def done(ex):
        seen["verdict"] = ex.results[-1]
        return Reply(text="Promotion judged; done for this turn.")

    steps = Steps([
        lambda ex: Reply(text="Writing a policy from scratch.", calls=write(kind, f"{worktree}/policy.py", POLICY)),
        lambda ex: Reply(calls=shell(kind, "python -m enpire.agents.local_check --episodes 2 && "
                                           "git add policy.py && git commit -qm 'pusher: walk to the block'")),
        evaluate, wait_eval, job, episode, edit,
        lambda ex: Reply(calls=shell(kind, "git commit -qam 'smaller steps'")),
        promote, wait_promote, done,
    ], main_tool=MAIN_TOOL[kind])
    steps.seen_values = seen
    return steps


@pytest.mark.parametrize("kind", KINDS)
def test_a_cli_agent_improves_a_policy_on_the_fleet(tmp_path, kind):
    require(kind)
    worktree = str(tmp_path / "state" / "cli" / "agent-0" / "worktree")
    steps = competent(kind, worktree)
    with ScriptedModel(PROVIDER[kind], steps) as model:
        proc = start_fleet(tmp_path, kind, model.url)
        try:
            deadline = time.time() + 420
            while "verdict" not in steps.seen_values and time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)
            time.sleep(2.0)  # the CLI's last call and the turn's end
        finally:
            out, err = stop_fleet(proc) if proc.poll() is None else proc.communicate()
    seen = steps.seen_values
    assert not model.errors, model.errors
    assert "verdict" in seen, f"the script stopped at step {steps.taken}\n{err[-3000:]}"
    assert '"promoted":' in seen["verdict"] and '"n":30' in seen["verdict"]  # judged on 30 held-out seeds
    assert seen["images"] == "1"  # the episode tool's frames reached the model as an image
    local = [e for e in steps.seen if '"success_rate"' in "\n".join(e.results)]
    assert local, "the local check on tuning seeds did not run"
    board = Blackboard(tmp_path / "state" / "blackboard.lmdb", readonly=True)
    try:
        episodes = board.values("episodes", EpisodeRecord)
        tokens = board.values("tokens", TokenRecord)
        pool = board.get("heldout", "pusht", HeldoutRecord)
    finally:
        board.close()
    agent_eps = [e for e in episodes if e.job_id == seen["eval"]]
    assert len(agent_eps) == 6 and {e.cell_id for e in agent_eps} <= {"cell-0", "cell-1"}
    assert all(e.steps > 10 and "violation" not in e.verdict.reason for e in agent_eps)  # the policy ran
    assert all(e.kind == "agent" and e.seed < 100_000 for e in agent_eps)  # tuning seeds
    # Both candidates came from the agent's worktree through the daemon: commits on its workspace branch.
    ws = Workspace(tmp_path / "state" / "workspace")
    head = ws.head("agent/agent-0")
    assert '"step", 30.0' in ws.read(head)["policy.py"] and "smaller steps" in ws.log("agent/agent-0")[0]
    assert '"step", 40.0' in ws.read(agent_eps[0].policy.commit)["policy.py"]
    judged = [e for e in episodes if e.kind == "heldout" and e.policy.commit == head]
    assert len(judged) == 30 and all(e.seed >= 1_000_000 for e in judged)  # held-out seeds
    # ... drawn in the fleet's secret order (its key is on the blackboard), not the range's first seeds
    assert {e.seed for e in judged} <= set(order(pool, cfg.Config().task("pusht").heldout_seeds, range(pool.used)))
    assert sorted(e.seed for e in judged) != list(range(1_000_000, 1_000_030))
    # The ledger equals what the server reported, call for call.
    mine = [t for t in tokens if t.agent == "agent-0"]
    assert len(mine) == len(model.log)
    for record, logged in zip(mine, model.log, strict=True):
        u = logged.usage
        assert (record.input_tokens, record.cached_input_tokens, record.cache_write_tokens, record.output_tokens,
                record.reasoning_tokens) == (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens,
                                             u.output_tokens, u.reasoning_tokens)
    transcript = (tmp_path / "state" / "cli" / "agent-0" / "logs" / "turn-00000.jsonl").read_text()
    assert json.loads(transcript.splitlines()[0])  # the CLI's own JSON lines are kept for the user
    # report.json's token section: the ledger's figures and, beside them, the cost the CLI itself reported.
    report = json.loads((tmp_path / "state" / "report.json").read_text())["tokens"]["agents"]["agent-0"]
    assert report["calls"] == len(model.log) and report["cli_runs"] == 1
    assert report["cli_tokens"] == report["tokens"]  # the CLI's own count equals the relay's ledger
    if kind == "claude-code":
        figure = [json.loads(line) for line in transcript.splitlines() if '"type":"result"' in line][-1]
        assert report["cli_cost_usd"] == round(figure["total_cost_usd"], 6) > 0
    else:
        assert report["cli_cost_usd"] is None  # Codex reports no cost
