"""The agent tool registry: one definition per tool, validated arguments, errors as results, paged files,
edits, any teammate's commit, jobs that return at once, waiting without a model, training through the
trainer into a candidate the cells run, and episodes with images for Push-T and Meta-World."""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from actors.runtime import Actor, ActorSystem
from bus.blackboard import Blackboard
from bus.messages import EpisodeSummary, EvalRequest, EvalResult, Failure, PolicySpec, Verdict
from bus.records import EpisodeRecord, Finding
from enpire import config as cfg
from enpire.agents import pusht_policy
from enpire.agents.registry import REGISTRY, Args, Image, SessionSettings, Tool, ToolResult, open_session
from enpire.agents.tools import LEARNED_POLICY, Tools
from enpire.episodes import write_trajectory
from enpire.tasks import card
from enpire.workspace import Workspace

TEMPLATE = Path(pusht_policy.__file__).read_text()


class GatedScheduler(Actor):
    """Answers evaluations once `release` is set; refuses those of a policy named 'refuse'."""

    name = "scheduler"
    concurrent_handlers = True

    def __init__(self, release: trio.Event, seen: list):
        super().__init__()
        self.release, self.seen = release, seen

    async def handle(self, msg):
        self.seen.append(msg)
        if isinstance(msg, EvalRequest):
            if msg.policy.params.get("refuse"):
                return Failure(error="queue full")
            await self.release.wait()
            eps = [EpisodeSummary(f"{msg.job_id}:{i}", s, i % 2 == 0, i % 2 == 0, 0.9, "success" if i % 2 == 0 else
                                  "timeout", 100) for i, s in enumerate(msg.seeds)]
            return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=eps)


async def _call(session, name, **args) -> ToolResult:
    return await REGISTRY.call(session, name, args)


def test_every_tool_is_defined_once_with_an_object_schema():
    names = [t.name for t in REGISTRY]
    assert len(names) == len(set(names)) >= 24
    for needed in ("read_file", "list_files", "edit", "write_file", "commit", "evaluate", "wait", "job", "episode",
                   "promote", "leaderboard", "digest", "findings", "post_finding", "train", "training_status",
                   "commit_checkpoint", "log", "diff", "show_commit", "search_notes", "read_note", "task_card"):
        tool = REGISTRY.get(needed)
        assert isinstance(tool, Tool) and issubclass(tool.args, Args) and tool.description
        schema = tool.schema()
        assert schema["type"] == "object" and "$ref" not in json.dumps(schema)
    assert REGISTRY.get("read_file").schema()["required"] == ["path"]


async def test_bad_calls_become_error_results(tmp_path):
    board, ws = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    tools = Tools("agent-0", "pusht", ws, None, board)
    async with open_session(tools, SessionSettings(), card("pusht"), range(10)) as s:
        for name, args, words in [("nope", {}, "unknown tool 'nope'"),
                                  ("evaluate", {"n_seeds": "many"}, "bad arguments for evaluate"),
                                  ("read_file", {"path": "policy.py", "colour": 1}, "unknown field `colour`"),
                                  ("read_file", {"path": "missing.py"}, "no file 'missing.py'"),
                                  ("evaluate", {}, "your branch has no policy yet"),
                                  ("write_file", {"path": "verifier.py", "content": "x"}, "protected path"),
                                  ("show_commit", {"commit": "deadbeef00"}, "no commit 'deadbeef00'"),
                                  ("job", {"job": "x"}, "no job 'x'"),
                                  ("search_notes", {"query": "block"}, "no notes folder"),
                                  ("train", {"recipe": "bc", "options": {f"k{i}": "1" for i in range(21)}},
                                   "bad arguments for train"),  # options reach a command line: bounded
                                  ("train", {"recipe": "bc", "options": {"lr": "1" * 201}}, "length <= 200")]:
            r = await REGISTRY.call(s, name, args)
            assert r.is_error and words in r.text, (name, r.text)


async def test_text_no_path_or_git_argument_can_hold_is_refused_at_the_edge(tmp_path):
    """A NUL or a lone surrogate in any string argument (a model can send both: JSON escapes them), or a
    parameter that is NaN or infinite, is an error result naming where it is, not an exception that
    restarts the agent or a candidate nobody can name; the next call works."""
    board, ws = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    ws.commit("main", {"policy.py": TEMPLATE}, "template")
    tools = Tools("agent-0", "pusht", ws, None, board)
    nul, lone = "a\x00b", "\ud800"
    calls = [("read_file", {"path": nul}, "`$.path`"), ("read_file", {"path": "policy.py", "commit": nul}, "`$.commit`"),
             ("write_file", {"path": lone, "content": "x"}, "`$.path`"),
             ("write_file", {"path": "p.py", "content": lone}, "`$.content`"),
             ("write_file", {"path": "p.py", "content": "x", "message": nul}, "`$.message`"),
             ("commit", {"files": {nul: "x"}, "message": "m"}, "`$.files key`"),
             ("commit", {"files": {"p.py": "x"}, "message": lone}, "`$.message`"),
             ("log", {"branch": nul}, "`$.branch`"), ("diff", {"paths": ["ok.py", nul]}, "`$.paths[1]`"),
             ("evaluate", {"commit": nul}, "`$.commit`"), ("episode", {"episode": lone}, "`$.episode`"),
             ("post_finding", {"hypothesis": "h", "change": "c", "evidence": "e", "outcome": lone}, "surrogates"),
             ("read_file", '{"path": "a\\u0000b"}', "`$.path`"),  # JSON text, as the API backends pass it
             ("evaluate", {"params": {"gain": float("nan")}}, "`$.params.gain`"),  # the MCP side decodes NaN
             ("promote", {"params": {"gain": float("-inf")}}, "`$.params.gain`")]
    async with open_session(tools, SessionSettings(), card("pusht"), range(10)) as s:
        for name, args, words in calls:
            r = await REGISTRY.call(s, name, args)
            assert r.is_error and "bad arguments" in r.text and words in r.text, (name, r.text)
        assert not (await _call(s, "read_file", path="policy.py", max_lines=3)).is_error
    assert ws.head("agent/agent-0") is None  # nothing of it was committed


async def test_read_file_pages_through_the_template_and_edit_changes_one_line(tmp_path):
    board, ws = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    ws.commit("main", {"policy.py": TEMPLATE}, "template")
    assert len(TEMPLATE) > 12_000
    tools = Tools("agent-0", "pusht", ws, None, board)
    async with open_session(tools, SessionSettings(tool_output_chars=6000), card("pusht"), range(10)) as s:
        lines, start, pages = [], 1, 0
        while True:
            r = await _call(s, "read_file", path="policy.py", start_line=start, max_lines=400)
            assert not r.is_error and len(r.text) <= 6000
            header, *rows = r.text.split("\n")
            lines += [row.split("| ", 1)[1] if "| " in row else "" for row in rows]
            pages += 1
            m = re.search(r"next page: start_line=(\d+)", header)
            if not m:
                assert header.endswith("(end of file)")
                break
            start = int(m.group(1))
        assert pages >= 3 and lines == TEMPLATE.splitlines()  # whole file, every line once, in order

        target = next(line for line in TEMPLATE.splitlines() if line.strip().startswith("def act("))
        r = await _call(s, "edit", path="policy.py", old=target, new=target + "  # edited", message="one line")
        assert not r.is_error, r.text
        commit = json.loads(r.text.split("\n", 1)[0])["commit"]
        changed = [row for row in r.text.split("\n") if row.startswith(("+", "-")) and not row.startswith(("+++", "---"))]
        assert changed == [f"-{target}", f"+{target}  # edited"]
        new = ws.read_file(commit, "policy.py").decode()
        assert new == TEMPLATE.replace(target, target + "  # edited")
        # the same by a unified diff
        before = new.splitlines(keepends=True)
        patch = "".join(difflib.unified_diff(before, ['"""Edited by a diff.\n', *before[1:]], "a/policy.py",
                                             "b/policy.py"))
        r = await _call(s, "edit", path="policy.py", diff=patch)
        assert not r.is_error, r.text
        assert ws.read_file(ws.head("agent/agent-0"), "policy.py").decode().splitlines()[0] == '"""Edited by a diff.'
        r = await _call(s, "edit", path="policy.py", old="    ", new="\t")
        assert r.is_error and "occurs" in r.text  # ambiguous: refused, nothing committed
        log = await _call(s, "log")
        assert log.text.count("\n") == 4  # header + 2 edits + template + workspace creation - 1


async def test_a_teammates_commit_is_readable_by_id(tmp_path):
    board, ws = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    mate = Tools("agent-1", "pusht", ws, None, board)
    me = Tools("agent-0", "pusht", ws, None, board)
    async with open_session(mate, SessionSettings(), card("pusht"), range(10)) as s1, \
            open_session(me, SessionSettings(), card("pusht"), range(10)) as s0:
        r = await _call(s1, "write_file", path="policy.py", content="class Policy:\n    secret_gain = 7\n",
                        message="teammate's idea")
        commit = json.loads(r.text)["commit"]
        shown = await _call(s0, "show_commit", commit=commit[:8])
        assert not shown.is_error and "teammate's idea" in shown.text and "+    secret_gain = 7" in shown.text
        read = await _call(s0, "read_file", path="policy.py", commit=commit[:10])
        assert "secret_gain = 7" in read.text
        log = await _call(s0, "log", branch="agent-1")
        assert "teammate's idea" in log.text
        diff = await _call(s0, "diff", commit=commit)
        assert "+class Policy:" in diff.text


@contextlib.asynccontextmanager
async def _gated_session(tmp_path, release: trio.Event, seen: list, **kw):
    """(session, nursery) on a fresh workspace with a policy written; its evaluations wait for `release`."""
    board, ws = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    async with trio.open_nursery() as nursery:
        sched = await ActorSystem(nursery).spawn("scheduler", lambda: GatedScheduler(release, seen))
        tools = Tools("agent-0", "pusht", ws, sched, board)
        async with open_session(tools, SessionSettings(), card("pusht"), range(1000), **kw) as s:
            await _call(s, "write_file", path="policy.py", content="class Policy: pass\n")
            yield s, nursery
        nursery.cancel_scope.cancel()


async def test_evaluate_returns_a_job_at_once_and_wait_sleeps_until_results(tmp_path):
    release, seen = trio.Event(), []
    async with _gated_session(tmp_path, release, seen, rng_seed=3) as (s, nursery):
        t0 = time.monotonic()
        r = await _call(s, "evaluate", n_seeds=4)
        assert not r.is_error and time.monotonic() - t0 < 5.0  # the evaluation waits for the release below
        job = json.loads(r.text.split("\n")[0])
        assert job["state"] == "running"
        waited = await _call(s, "wait", jobs=[job["job"]], timeout_s=0.2)
        assert waited.text.startswith("timed out") and '"state":"running"' in waited.text
        nursery.start_soon(_later, release)
        waited = await _call(s, "wait", jobs=[job["job"]], timeout_s=30)
        assert waited.text.startswith("all waited-for jobs finished")  # well before its 30 s timeout
        assert '"successes":2,"n":4' in waited.text and s.jobs.unseen() == []  # seen through wait
        # an evaluation the scheduler refuses is a failed job, never a finished experiment
        r = await _call(s, "evaluate", params={"refuse": 1.0}, n_seeds=2)
        failed = s.jobs.get(json.loads(r.text.split("\n")[0])["job"])
        await s.jobs.wait([failed.job_id], 5)
        assert failed.state == "failed" and "queue full" in failed.error and not failed.experiment
        # a finding names its job: the measured score is attached
        r = await _call(s, "post_finding", hypothesis="h", change="c", evidence="e", outcome="note",
                        job=job["job"])
        assert json.loads(r.text)["score"] == 0.5 and s.tools.board.values("findings", Finding)[-1].score == 0.5
        detail = await _call(s, "job", job=job["job"])
        assert detail.text.count("episode ") == 4
    evals = [m for m in seen if isinstance(m, EvalRequest)]
    assert all(0 <= seed < 1000 for m in evals for seed in m.seeds)  # the harness picked tuning seeds


async def test_an_agent_has_at_most_max_running_jobs_in_flight(tmp_path):
    """A model that loops on evaluate gets an error result past the limit, not a fleet queue it fills."""
    release, seen = trio.Event(), []
    async with _gated_session(tmp_path, release, seen) as (s, _nursery):
        results = [await _call(s, "evaluate", n_seeds=1) for _ in range(s.jobs.max_running + 3)]
        refused = [r for r in results if r.is_error]
        assert len(refused) == 3 and "still running (at most 64)" in refused[0].text
        release.set()
        with trio.fail_after(10):
            while any(j.state == "running" for j in s.jobs.jobs.values()):
                await trio.sleep(0.05)
        again = await _call(s, "evaluate", n_seeds=1)  # room again
        assert not again.is_error
        await s.jobs.wait([json.loads(again.text.split("\n")[0])["job"]], 10)
    assert sum(isinstance(m, EvalRequest) for m in seen) == s.jobs.max_running + 1


async def _later(event: trio.Event) -> None:
    await trio.sleep(0.3)
    event.set()


def _record(board: Blackboard, state: Path, episode_id: str, task: str, obs: np.ndarray, act: np.ndarray,
            reason: str) -> None:
    rel = Path("episodes") / f"{episode_id}.npz"
    write_trajectory(state / rel, obs.astype(np.float32), act.astype(np.float32), np.zeros(len(act), np.float32))
    board.put("episodes", episode_id, EpisodeRecord(
        episode_id=episode_id, job_id="j", kind="agent", task=task, seed=1, policy=PolicySpec(commit="c" * 40),
        cell_id="cell-0", verdict=Verdict(False, 0.3, reason, "test"), success_at_k=False, attempts=1,
        steps=len(act), reset_s=0, run_s=0, verify_s=0, finished=time.time(), trajectory_file=str(rel)))


def _png_size(image: Image) -> tuple[int, int]:
    assert image.media_type == "image/png" and image.data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(image.data[16:20], "big"), int.from_bytes(image.data[20:24], "big")


@pytest.mark.parametrize("task", ["pusht", "drawer-open-v3"])
async def test_episode_shows_poses_trajectory_and_an_image(task, tmp_path):
    if task != "pusht":
        pytest.importorskip("metaworld")
    from hw import make_driver

    driver = make_driver(task)
    obs = [driver.reset(5)]
    acts = []
    for t in range(30):
        a = np.array([200.0 + 3 * t, 300.0]) if task == "pusht" else np.array([0.5, 0.0, -0.2, 1.0])
        acts.append(a)
        obs.append(driver.act(a))
    driver.disconnect()
    board = Blackboard(tmp_path / "bb")
    _record(board, tmp_path, "e1", task, np.array(obs), np.array(acts), "policy_error: ZeroDivisionError (at policy.py:9 in act)")
    _record(board, tmp_path, "held", task, np.array(obs), np.array(acts), "timeout")
    board.put("episodes", "held", EpisodeRecord(**{**msgspec_to_dict(board.get("episodes", "held", EpisodeRecord)),
                                                   "kind": "heldout"}))
    tools = Tools("agent-0", task, Workspace(tmp_path / "ws"), None, board, state_dir=tmp_path)
    async with open_session(tools, SessionSettings(), card(task), range(10)) as s:
        r = await _call(s, "episode", episode="e1", frames=3, rows=5)
        assert not r.is_error, r.text
        assert "policy.py:9 in act" in r.text and "start: " in r.text and "final: " in r.text
        assert len(re.findall(r"^  \d+: \[", r.text, re.M)) == 5
        assert len(r.images) == 1
        width, height = _png_size(r.images[0])
        assert width > 2 * height  # a strip of three frames side by side
        first = "agent_x=" if task == "pusht" else "hand_pos="
        assert first in r.text.split("start: ")[1]
        held = await _call(s, "episode", episode="held")
        assert held.is_error and "held-out" in held.text


def msgspec_to_dict(record) -> dict:
    import msgspec

    return msgspec.structs.asdict(record)


async def test_train_then_commit_checkpoint_makes_a_candidate_the_cells_run(tmp_path):
    """train (BC) through the trainer actor, wait, commit_checkpoint by job, evaluate it through a real cell,
    and inspect one of its recorded episodes with a frame strip."""
    from enpire.agents.pusht_policy import INITIAL_PARAMS
    from enpire.agents.pusht_policy import Policy as Scripted
    from enpire.fleet import open_state_dir, start_core
    from enpire.learning.dataset import record_scripted

    state = tmp_path / "state"
    assert record_scripted(state, lambda: Scripted(INITIAL_PARAMS), range(3))["successes"] == 3
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"cells.count": 1, "agents.count": 0, "scheduler.background": False})
    board, meta = open_state_dir(state)
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, state, board, meta)
        from enpire.agents.session import agent_tools

        tools = agent_tools(config, 0, core.workspace, core.judge, board, trainer=core.trainer, state_dir=state,
                            events=core.events)
        async with open_session(tools, SessionSettings(), card("pusht", config), range(0, 1000)) as s:
            with trio.fail_after(240):
                r = await _call(s, "train", recipe="bc", time_budget_s=60,
                                options={"hidden": "32", "layers": "3", "max_epochs": "5"})
                assert not r.is_error and "3 recorded successful episodes" in r.text, r.text
                job = json.loads(r.text.split("\n")[0])["job"]
                await _call(s, "wait", jobs=[job], timeout_s=200)
                status = await _call(s, "training_status")
                assert '"ok":true' in status.text, status.text
                r = await _call(s, "commit_checkpoint", job=job, message="bc")
                commit = json.loads(r.text)["commit"]
                assert core.workspace.read_file(commit, "policy.py").decode() == LEARNED_POLICY.read_text()
                r = await _call(s, "evaluate", commit=commit, n_seeds=2)
                evaluation = json.loads(r.text.split("\n")[0])["job"]
                waited = await _call(s, "wait", jobs=[evaluation], timeout_s=200)
                assert '"state":"done"' in waited.text and '"n":2' in waited.text, waited.text
                result = s.jobs.get(evaluation).result
                assert result.policy.commit == commit
                episode = await _call(s, "episode", episode=result.episodes[0].episode_id, frames=2)
                assert not episode.is_error and len(episode.images) == 1, episode.text
        nursery.cancel_scope.cancel()


async def test_episode_replay_shows_the_policys_stderr_and_the_failing_line(tmp_path):
    """The policy's own print output and its exception with file and line number, from a sandbox replay of the
    recorded observations."""
    board, ws = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    broken = ("class Policy:\n    def __init__(self, params):\n        self.t = 0\n\n    def act(self, obs):\n"
              "        self.t += 1\n        print('step', self.t, 'x', round(float(obs[0])))\n"
              "        return [256.0, 256.0] if self.t < 3 else [1 / 0]\n")
    commit = ws.commit("agent/agent-0", {"policy.py": broken}, "broken")
    obs = np.tile(np.array([100.0, 200.0, 256.0, 256.0, 0.5]), (6, 1))
    _record(board, tmp_path, "e1", "pusht", obs, np.full((5, 2), 256.0), "policy_error: ZeroDivisionError")
    record = board.get("episodes", "e1", EpisodeRecord)
    board.put("episodes", "e1", EpisodeRecord(**{**msgspec_to_dict(record), "policy": PolicySpec(commit=commit)}))
    tools = Tools("agent-0", "pusht", ws, None, board, state_dir=tmp_path)
    async with open_session(tools, SessionSettings(), card("pusht"), range(10)) as s:
        r = await _call(s, "episode", episode="e1", replay=True, frames=0)
    assert not r.is_error and not r.images, r.text
    assert "replay error: policy_error: ZeroDivisionError: division by zero (at policy.py:8 in act)" in r.text
    assert "step 1 x 100\nstep 2 x 100\nstep 3 x 100" in r.text
