"""Paced turns: on a pooled fleet an agent thinks again once some results are in and the fleet's queue is
short (teammates about to ask counted), instead of leaving robots idle while it waits for its slowest call."""

from __future__ import annotations

import json
import time

import pytest
import trio

from actors.runtime import Actor, ActorSystem
from bus.blackboard import Blackboard
from bus.messages import EpisodeSummary, EvalResult
from bus.records import QueueRecord
from enpire.agents.llm import LLMAgent, LLMSettings, _episodes
from enpire.agents.model import ModelError, ModelReply, ToolCall, Usage
from enpire.agents.pacing import MARK_S, Hold, Pacer, Room, Wait
from enpire.agents.tools import Tools
from enpire.tasks import card
from enpire.workspace import Workspace

FINDING = {"hypothesis": "h", "change": "c", "evidence": "e", "outcome": "note"}


class SlowScheduler(Actor):
    """Answers a one-episode evaluation at once, longer ones once the test releases them."""

    name = "scheduler"
    concurrent_handlers = True

    def __init__(self, release: trio.Event):
        super().__init__()
        self.release = release

    async def handle(self, msg):
        if len(msg.seeds) > 1:
            await self.release.wait()
        eps = [EpisodeSummary(f"{msg.job_id}:{i}", s, True, True, 1.0, "success", 50) for i, s in enumerate(msg.seeds)]
        return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=eps)


class ScriptedModel:
    """Turn 1 posts a finding and runs a short and a long evaluation; later turns only post findings."""

    model, secrets = "scripted", ()

    def __init__(self):
        self.prompts = []

    async def complete(self, prompt, tools, max_output_tokens):
        self.prompts.append(prompt)
        calls = [ToolCall(f"f{len(self.prompts)}", "post_finding", json.dumps(FINDING))]
        if len(self.prompts) == 1:
            calls += [ToolCall("e1", "evaluate", json.dumps({"n_seeds": 1})),
                      ToolCall("e3", "evaluate", json.dumps({"n_seeds": 3}))]
        return ModelReply("", calls, Usage(100, 0, 0, 10), "tool_use")

    async def probe(self):
        return None


class FailingModel:
    """A provider that is down: every call fails, once `gate` (if given) is set."""

    model, secrets = "down", ()

    def __init__(self, gate: trio.Event | None = None):
        self.calls, self.gate = 0, gate

    async def probe(self):
        return None

    async def complete(self, prompt, tools, max_output_tokens):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        raise ModelError("APIConnectionError: connection refused")


async def _run(tmp_path, queue: QueueRecord, steps, room: Room | None = None):
    board, workspace = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    workspace.commit("main", {"policy.py": "class Policy: pass\n"}, "baseline")
    board.put("meta", "queue", queue)
    model, release = ScriptedModel(), trio.Event()
    agent = LLMAgent(model, LLMSettings(pace_per_cell=6.0), card=card("pusht"), tuning_seeds=range(100), rng_seed=0)
    async with trio.open_nursery() as nursery:
        scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: SlowScheduler(release))
        nursery.start_soon(agent.run, Tools("agent-0", "pusht", workspace, scheduler, board, room=room or Room()))
        await steps(board, model, release)
        nursery.cancel_scope.cancel()
    return model


async def _until(condition, timeout=5.0):
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_a_paced_agent_thinks_while_its_evaluation_runs_and_reads_the_result_later(tmp_path):
    async def steps(board, model, release):
        await _until(lambda: len(model.prompts) >= 2)  # turn 2 began with the long evaluation still running
        brief = model.prompts[1].briefing
        assert '"successes":1' in brief and '"successes":3' not in brief and "still running: 1" in brief
        release.set()
        # The late result stays in the journal until a request shows it.
        await _until(lambda: any('"successes":3' in p.briefing for p in model.prompts))

    await _run(tmp_path, QueueRecord(0, 1, time.time()), steps)


async def test_a_paced_agent_waits_while_the_fleet_queue_is_long(tmp_path):
    async def steps(board, model, release):
        await trio.sleep(0.6)
        assert not model.prompts  # 10 episodes wait for 1 cell: another idea would only queue
        board.put("meta", "queue", QueueRecord(2, 1, time.time()))
        await _until(lambda: len(model.prompts) >= 1)
        release.set()

    await _run(tmp_path, QueueRecord(10, 1, time.time()), steps)


async def test_teammates_about_to_ask_count_as_queued(tmp_path):
    async def steps(board, model, release):
        await trio.sleep(0.6)
        assert not model.prompts  # 2 queued + 5 held by agent-1 >= 6 per cell
        room.holds["agent-1"] = Hold(5, time.time() - 1)  # its hold ran out
        await _until(lambda: len(model.prompts) >= 1)
        assert room.holds["agent-0"].episodes >= 4  # now it holds its own
        release.set()

    room = Room(holds={"agent-1": Hold(5, time.time() + 60)})
    await _run(tmp_path, QueueRecord(2, 1, time.time()), steps, room)


def test_episodes_a_turn_asks_for():
    calls = [ToolCall("a", "evaluate", '{"n_seeds": 4}'), ToolCall("b", "evaluate", "{}"),
             ToolCall("c", "evaluate", "not json"), ToolCall("d", "promote", "{}")]
    assert _episodes(calls) == 4 + 10


async def test_a_result_stays_unseen_until_an_answered_request_showed_it(tmp_path):
    """The result of turn 1's evaluation is in the briefing of the next request; that request fails (a
    non-retryable error, so the agent pauses), and the result is shown again in the request after the pause."""
    class Flaky:
        model, secrets = "scripted", ()

        def __init__(self):
            self.prompts = []

        async def probe(self):
            return None

        async def complete(self, prompt, tools, max_output_tokens):
            self.prompts.append(prompt)
            if len(self.prompts) == 2:
                raise ModelError("refused as it is", retryable=False, bad_request=True)
            calls = [ToolCall("e1", "evaluate", json.dumps({"n_seeds": 1}))] if len(self.prompts) == 1 else []
            return ModelReply("", calls, Usage(100, 0, 0, 10), "tool_use" if calls else "end")

    board, workspace = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    workspace.commit("main", {"policy.py": "class Policy: pass\n"}, "baseline")
    model, release = Flaky(), trio.Event()
    release.set()
    agent = LLMAgent(model, LLMSettings(pause_s=0.05), card=card("pusht"), tuning_seeds=range(100), rng_seed=0)
    async with trio.open_nursery() as nursery:
        scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: SlowScheduler(release))
        nursery.start_soon(agent.run, Tools("agent-0", "pusht", workspace, scheduler, board))
        await _until(lambda: len(model.prompts) >= 4)
        nursery.cancel_scope.cancel()
    shown = ['"successes":1' in p.briefing for p in model.prompts[:4]]
    assert shown == [False, True, True, False]  # failed request: shown again; answered request: seen


async def test_an_agent_paused_by_an_outage_does_not_hold_up_its_teammates(tmp_path):
    """agent-0's model is down: it holds room for its next turn when admitted, fails, and pauses. While it is
    paused it asks for nothing, so its hold must go: agent-1 still thinks (the fleet keeps working)."""
    board, workspace = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    workspace.commit("main", {"policy.py": "class Policy: pass\n"}, "baseline")
    board.put("meta", "queue", QueueRecord(0, 1, time.time()))
    down, up, release, room = FailingModel(), ScriptedModel(), trio.Event(), Room()
    paced = LLMSettings(pace_per_cell=6.0, max_failures=2, backoff_initial_s=0.01, pause_s=60.0)
    async with trio.open_nursery() as nursery:
        scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: SlowScheduler(release))
        agent = LLMAgent(down, paced, card=card("pusht"), tuning_seeds=range(100), rng_seed=0)
        nursery.start_soon(agent.run, Tools("agent-0", "pusht", workspace, scheduler, board, room=room))
        await _until(lambda: down.calls >= 2)  # failed twice in a row: paused for a minute
        await trio.sleep(0.2)
        teammate = LLMAgent(up, paced, card=card("pusht"), tuning_seeds=range(100), rng_seed=1)
        nursery.start_soon(teammate.run, Tools("agent-1", "pusht", workspace, scheduler, board, room=room))
        await _until(lambda: len(up.prompts) >= 1)  # was blocked for 120 s by the paused agent's hold
        assert down.calls == 2  # still paused
        release.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("failures_to_pause", [1, 3], ids=["paused", "backing_off"])
async def test_a_teammate_already_waiting_for_room_thinks_once_a_failed_call_gives_it_back(tmp_path,
                                                                                        failures_to_pause):
    """agent-1 waits for room that agent-0's turn holds (for up to 120 s). agent-0's call fails: paused, or
    backing off before its next try, it asks the fleet for nothing, so agent-1 must think now, not when the
    hold lapses (a soak once saw a fleet record no episode for all of a 10 s pause)."""
    from bus.events import EventHub

    board, workspace, hub, room = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws"), EventHub(), Room()
    workspace.commit("main", {"policy.py": "class Policy: pass\n"}, "baseline")
    board.put("meta", "queue", QueueRecord(0, 1, time.time()))
    failing, up, release = FailingModel(gate=trio.Event()), ScriptedModel(), trio.Event()
    paced = LLMSettings(pace_per_cell=6.0, max_failures=failures_to_pause, backoff_initial_s=60.0,
                        backoff_max_s=60.0, pause_s=60.0)
    async with trio.open_nursery() as nursery:
        scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: SlowScheduler(release))
        agent = LLMAgent(failing, paced, card=card("pusht"), tuning_seeds=range(100), rng_seed=0)
        nursery.start_soon(agent.run, Tools("agent-0", "pusht", workspace, scheduler, board, events=hub, room=room))
        await _until(lambda: failing.calls == 1)  # admitted: its turn holds the room
        teammate = LLMAgent(up, paced, card=card("pusht"), tuning_seeds=range(100), rng_seed=1)
        nursery.start_soon(teammate.run, Tools("agent-1", "pusht", workspace, scheduler, board, events=hub, room=room))
        await _until(lambda: "agent-1" in room.waits)
        await trio.sleep(0.2)
        assert not up.prompts
        failing.gate.set()
        await _until(lambda: len(up.prompts) >= 1)
        assert failing.calls == 1  # agent-0 is still paused or backing off
        release.set()
        nursery.cancel_scope.cancel()


def test_room_goes_to_the_teammate_that_waited_longest(tmp_path):
    """First come, first served: an agent back from a pause (nothing of its own running, so no result
    wakes it) is not beaten to every opening by a teammate whose results arrive as room appears."""
    from types import SimpleNamespace

    now, room, queue = [1000.0], Room(), [QueueRecord(6, 1, 1000.0)]  # full: 6 per cell
    agent = {name: SimpleNamespace(agent=name, room=room, queue_depth=lambda: queue[0]) for name in ("agent-0", "agent-1")}
    first, later = Pacer(6.0, lambda: now[0]), Pacer(6.0, lambda: now[0])
    assert not first.admit(agent["agent-1"], 4)
    now[0] += 1.0
    assert not later.admit(agent["agent-0"], 4)
    assert room.waits["agent-1"].since == 1000.0
    queue[0] = QueueRecord(2, 1, now[0])  # room for one turn
    assert not later.admit(agent["agent-0"], 4)  # agent-1 waited longer
    assert first.admit(agent["agent-1"], 4)
    assert "agent-1" not in room.waits and room.holds["agent-1"].episodes == 4
    assert not later.admit(agent["agent-0"], 4)  # 2 queued + agent-1's 4 held fill the room
    room.holds["agent-1"] = Hold(0, now[0])  # its answer came; its jobs are in the queue
    queue[0] = QueueRecord(1, 1, now[0])
    assert later.admit(agent["agent-0"], 4)
    assert "agent-0" not in room.waits

    # A mark that is not renewed lapses: a teammate that stopped waiting holds no one up for long.
    room.waits["agent-9"] = Wait(since=now[0] - 100, until=now[0] + MARK_S)
    assert not later.admit(agent["agent-0"], 4)
    assert later.lapse == now[0] + MARK_S  # it looks again then, even if nothing else happens
    now[0] += MARK_S + 0.1
    assert later.admit(agent["agent-0"], 4)
