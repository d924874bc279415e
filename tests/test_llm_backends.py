"""Model-driven agents through the official SDKs (Anthropic Messages, OpenAI Chat Completions, OpenAI Responses)
against scripted loopback servers in each API's wire format (tests/llm_servers.py), every request logged.

The agent runs on the real registry, Tools, Blackboard and Workspace with an in-process scheduler actor.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import msgspec
import pytest
import structlog
import trio
from llm_servers import (
    APIS,
    ScriptedAPI,
    canonical,
    expected_ledger,
    job_ids,
    not_found,
    output_cap,
    reply,
    shared_prefix,
)

from actors.runtime import Actor, ActorSystem
from actors.summarizer import write_digest
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import (
    EpisodeSummary,
    EvalRequest,
    EvalResult,
    Failure,
    PromoteRequest,
    PromoteResult,
    TokensUsed,
)
from bus.records import Finding, TokenRecord
from enpire import ledger
from enpire.agents.anthropic_backend import AnthropicClient
from enpire.agents.llm import LLMAgent, LLMSettings
from enpire.agents.model import scrub
from enpire.agents.openai_backend import OpenAIClient, OpenAIResponsesClient
from enpire.agents.session import SessionSettings
from enpire.agents.tools import Tools
from enpire.tasks import card
from enpire.workspace import Workspace

SECRET = "sk-test-" + "Zq9x" * 8
KEY_ENV = "ENPIRE_TEST_LLM_KEY"
TUNING = range(0, 1000)
CLIENT_TIMEOUT_S = 2.0  # generous: an ordinary answer on a loaded machine must not time out

POLICY = '''\
class Policy:
    def __init__(self, params):
        self.gain = params.get("gain", 1.0)

    def reset(self):
        pass

    def act(self, obs):
        return [256.0, 256.0]

    def on_failure(self, info):
        pass
'''


def client(api: str, url: str, model: str = ""):
    if api == "anthropic":
        return AnthropicClient(model or "claude-test", api_key_env=KEY_ENV, base_url=url, timeout_s=CLIENT_TIMEOUT_S)
    kind = OpenAIClient if api == "openai" else OpenAIResponsesClient
    return kind(model or "gpt-test", api_key_env=KEY_ENV, base_url=url + "/v1", timeout_s=CLIENT_TIMEOUT_S)


def failures(api: str) -> list:
    """429 with retry-after, 500 echoing the caller's key, a cut-off body, JSON that is no reply, a reply after
    the client timeout."""
    if api == "anthropic":
        limited = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    else:
        limited = {"error": {"message": "slow down", "type": "rate_limit_exceeded", "code": None}}

    def echo(h: dict, b: dict):
        return 500, json.dumps({"error": {"message": f"saw Authorization: {h.get('authorization') or h.get('x-api-key')}",
                                          "type": "server_error"}}).encode(), {}, 0.0

    return [
        lambda h, b: (429, json.dumps(limited).encode(), {"retry-after": "0.05"}, 0.0),
        echo,
        lambda h, b: (200, b'{"id": "x", "content": [{"type": ', {}, 0.0),
        lambda h, b: (200, b'{"object": "error", "message": "model overloaded", "code": 503}', {}, 0.0),
        lambda h, b: (200, b"{}", {}, CLIENT_TIMEOUT_S + 1.0),  # the client times out first
    ]


class CannedScheduler(Actor):
    """Answers evaluations (half succeed) once `gate` is set; refuses those with params {"refuse": 1}."""

    name = "scheduler"
    concurrent_handlers = True

    def __init__(self, seen: list, gate: trio.Event | None = None):
        super().__init__()
        self.seen, self.gate = seen, gate

    async def handle(self, msg):
        self.seen.append(msg)
        if isinstance(msg, EvalRequest):
            if msg.policy.params.get("refuse"):
                return Failure(error="queue full")
            if self.gate is not None:
                await self.gate.wait()
            eps = [EpisodeSummary(f"{msg.job_id}:{i}", s, i % 2 == 0, i % 2 == 0, 0.9 if i % 2 == 0 else 0.5,
                                  "success" if i % 2 == 0 else "timeout", 120) for i, s in enumerate(msg.seeds)]
            return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=eps)
        if isinstance(msg, PromoteRequest):
            return PromoteResult(job_id=msg.job_id, policy=msg.policy, promoted=True, successes=80, n=100,
                                 champion_successes=0, champion_n=0, detail="promoted: 80/100 held-out")


def settings(**kw) -> LLMSettings:
    base = dict(backoff_initial_s=0.02, backoff_max_s=0.1, pause_s=0.2, max_failures=5)
    return LLMSettings(**{**base, **kw})


def agent_for(api: str, server: ScriptedAPI, s: LLMSettings, model: str = "") -> LLMAgent:
    return LLMAgent(client(api, server.url, model), s, card=card("pusht"), tuning_seeds=TUNING, rng_seed=7)


async def run_agent(agent: LLMAgent, tmp_path, seen: list, *, gate: trio.Event | None = None, limit: float = 30,
                    during=None, board: Blackboard | None = None, state_dir=None,
                    events: EventHub | None = None, workspace: Workspace | None = None) -> tuple[Tools, list]:
    board = board or Blackboard(tmp_path / "bb")
    workspace = workspace or Workspace(tmp_path / "ws")
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: CannedScheduler(seen, gate))
            tools = Tools("agent-0", "pusht", workspace, scheduler, board, state_dir=state_dir, events=events)
            if during is not None:
                nursery.start_soon(during, nursery)
            with trio.move_on_after(limit):
                await agent.run(tools)
            nursery.cancel_scope.cancel()
    return tools, logs


def _text(value) -> str:
    return msgspec.json.encode(value).decode() if not isinstance(value, str) else value


def _ledger_rows(board: Blackboard) -> list[tuple[int, int, int, int, int]]:
    return [(r.input_tokens, r.cached_input_tokens, r.cache_write_tokens, r.output_tokens, r.reasoning_tokens)
            for r in board.values("tokens", TokenRecord)]


# ----------------------------------------------------------------------------- the improvement cycle


def cycle(api: str) -> list:
    """A bad call; list files; write + evaluate the new head in ONE reply; a finding naming that job;
    promote; wait for the verdict."""
    finding = lambda b: {"hypothesis": "a higher gain pushes harder", "change": "gain 1.5",  # noqa: E731
                         "evidence": "2/4 on tuning seeds", "outcome": "improved", "job": job_ids(b)[0]}
    return [reply(api, [("evaluate", {"n_seeds": "many"})], 0),
            reply(api, [("list_files", {})], 1),
            reply(api, [("write_file", {"path": "policy.py", "content": POLICY, "message": "trivial policy"}),
                        ("evaluate", {"params": {"gain": 1.5}, "n_seeds": 4})], 2, text="writing and measuring"),
            reply(api, [("post_finding", finding)], 3),
            reply(api, [("promote", {"params": {"gain": 1.5}}), ("wait", {"timeout_s": 10})], 4),
            reply(api, [("digest", {})], 5)]


@pytest.mark.parametrize("api", APIS)
async def test_agent_runs_the_improvement_cycle_through_the_sdk(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI(failures(api) + cycle(api), fallback=reply(api, [("digest", {})], 99))
    seen: list = []
    # Six answered calls of 1000 tokens each: the budget ends the agent right after the last.
    agent = agent_for(api, server, settings(token_budget=6000, max_failures=6))
    hub, used = EventHub(), []

    async def collect(nursery):
        with hub.subscribe(TokensUsed) as events:
            async for event in events:
                used.append(event)

    try:
        tools, logs = await run_agent(agent, tmp_path, seen, events=hub, during=collect)
    finally:
        server.close()
    board, ws = tools.board, tools.workspace
    # The probe asked for the model by name, free of tokens.
    assert server.requests[0].method == "GET" and server.requests[0].path.endswith("/models/" + agent.client.model)
    # write_file then evaluate of the branch head in one reply: the NEW commit was evaluated.
    head = ws.head("agent/agent-0")
    evals = [m for m in seen if isinstance(m, EvalRequest)]
    assert len(evals) == 1 and evals[0].policy.commit == head and ws.read_file(head, "policy.py").decode() == POLICY
    assert len(evals[0].seeds) == 4 and all(s in TUNING for s in evals[0].seeds)
    assert any(isinstance(m, PromoteRequest) for m in seen)
    findings = board.values("findings", Finding)
    assert [f.hypothesis for f in findings] == ["a higher gain pushes harder", "budget exhausted: this agent stops"]
    assert findings[0].score == 0.5  # the measured score of the job it named
    posts = server.posts()
    answered = server.answered()
    # The bad call came back as a tool error the model saw in its next request.
    assert "bad arguments for evaluate" in json.dumps(answered[1].body)
    # The evaluation's result reached the model (in the briefing) before it posted the finding ...
    assert '"successes":2' in json.dumps(answered[3].body).replace("\\", "")
    # ... and the promotion's verdict through wait, in the same turn.
    assert '"promoted":true' in json.dumps(answered[5].body).replace("\\", "")
    # Every answered call is on the ledger with the usage the server reported, call for call.
    assert _ledger_rows(board) == [expected_ledger(api, r.usage) for r in answered]
    assert ledger.per_agent(board.values("tokens", TokenRecord))["agent-0"].total == 6000
    # Progress events, report.json and enpire.status show the same totals as the server reported.
    from enpire import fleet, status

    rows = [expected_ledger(api, r.usage) for r in answered]
    served = {"input_tokens": sum(r[0] for r in rows), "cached_input_tokens": sum(r[1] for r in rows),
              "cache_write_tokens": sum(r[2] for r in rows), "output_tokens": sum(r[3] for r in rows),
              "reasoning_tokens": sum(r[4] for r in rows)}
    progress = ledger.TokenTotals()  # what the daemon's progress ticks add up from the agents' TokensUsed events
    for event in used:
        progress = progress.add(event.call)
    assert {k: progress.as_dict()[k] for k in served} == served and progress.total == 6000 and progress.calls == 6
    report = fleet.build_report(board, fleet.cfg.Config(), fleet.Outcome("budget", 1.0, None), {})["tokens"]
    shown = status._collect(board, time.time())["token_ledger"]
    for totals in (report["team"], report["agents"]["agent-0"], shown["agents"]["agent-0"]):
        assert {k: totals[k] for k in served} == served and totals["tokens"] == 6000 and totals["calls"] == 6
    # Retries were logged (5 failures before the first answer), and the key leaked nowhere.
    events = [e["event"] for e in logs]
    assert events.count("llm_retry") == 5 and "backend_paused" not in events
    assert len(posts) == 11
    assert all(SECRET in (r.headers.get("authorization", "") + r.headers.get("x-api-key", "")) for r in posts)
    echoed = [e for e in logs if e["event"] == "llm_retry" and "500" in e["error"]]
    assert echoed and "[redacted]" in echoed[0]["error"]
    everywhere = [_text(logs), _text(findings), _text([o.content for t in agent.turns for o in t.outputs])]
    assert not any(SECRET in text for text in everywhere)


# ----------------------------------------------------------------------------- waiting and pacing


@pytest.mark.parametrize("api", APIS)
async def test_wait_returns_when_results_arrive_and_no_model_call_is_made_meanwhile(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI([reply(api, [("write_file", {"path": "policy.py", "content": POLICY}),
                                      ("evaluate", {"n_seeds": 2}), ("wait", {"timeout_s": 60})], 0)],
                         fallback=reply(api, [("digest", {})], 1))
    gate, seen, marks = trio.Event(), [], {}

    async def release(nursery):
        with trio.fail_after(10):
            while not seen:
                await trio.sleep(0.01)
        await trio.sleep(1.0)
        marks["posts_while_waiting"] = len(server.posts())
        marks["released"] = time.time()
        gate.set()

    agent = agent_for(api, server, settings(token_budget=2000))
    try:
        await run_agent(agent, tmp_path, seen, gate=gate, during=release)
    finally:
        server.close()
    posts = server.posts()
    assert marks["posts_while_waiting"] == 1  # the model was not asked anything while the agent waited
    assert len(posts) == 2 and posts[1].t >= marks["released"]
    assert '"state":"done"' in json.dumps(posts[1].body).replace("\\", "")


@pytest.mark.parametrize("api", APIS)
async def test_an_instantly_failing_evaluate_does_not_close_the_turn(api, tmp_path, monkeypatch):
    """Paced turns think again once one experiment of the turn has a result; a refusal is not one."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI([reply(api, [("write_file", {"path": "policy.py", "content": POLICY}),
                                      ("evaluate", {"params": {"refuse": 1.0}, "n_seeds": 2}),
                                      ("evaluate", {"n_seeds": 2})], 0)],
                         fallback=reply(api, [("digest", {})], 1))
    gate, seen, marks = trio.Event(), [], {}

    async def release(nursery):
        await trio.sleep(1.0)
        marks["posts"] = len(server.posts())
        marks["released"] = time.time()
        gate.set()

    agent = agent_for(api, server, settings(token_budget=2000, pace_per_cell=10.0))
    try:
        await run_agent(agent, tmp_path, seen, gate=gate, during=release)
    finally:
        server.close()
    posts = server.posts()
    assert marks["posts"] == 1 and len(posts) == 2 and posts[1].t >= marks["released"]
    # Both outcomes reached the model: the refusal (as a failed job, with its reason) and the result.
    text = json.dumps(posts[1].body).replace("\\", "")
    assert '"state":"failed"' in text and "queue full" in text and '"state":"done"' in text


# ----------------------------------------------------------------------------- stop reasons


@pytest.mark.parametrize("api", APIS)
async def test_a_cut_off_reply_is_asked_again_and_never_dispatched(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    cut = [("write_file", {"path": "policy.py", "content": "class Pol"})]
    server = ScriptedAPI([reply(api, cut, 0, stop="max_tokens"),  # asked again with twice the cap
                          reply(api, cut, 1, stop="max_tokens"),  # at the ceiling: recorded, not run
                          reply(api, [("list_files", {})], 2)],
                         fallback=reply(api, [("digest", {})], 3))
    agent = agent_for(api, server, settings(token_budget=4000, max_output_tokens=1000, max_output_ceiling=2000))
    try:
        tools, logs = await run_agent(agent, tmp_path, [])
    finally:
        server.close()
    posts = server.posts()
    assert [output_cap(api, p.body) for p in posts[:3]] == [1000, 2000, 1000]
    assert posts[0].body["messages" if api != "responses" else "input"] == \
        posts[1].body["messages" if api != "responses" else "input"]  # the same request, a larger cap
    assert tools.workspace.head("agent/agent-0") is None  # the truncated write never ran
    assert "cut off at the output limit" in json.dumps(posts[2].body)
    assert len(tools.board.values("tokens", TokenRecord)) == 4  # every answered call is billed
    assert [e["event"] for e in logs].count("llm_reask") == 1


@pytest.mark.parametrize("api", APIS)
async def test_a_refusal_reaches_the_journal(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI([reply(api, [], 0, refusal="I can't help with pushing blocks.", stop="refusal")],
                         fallback=reply(api, [("digest", {})], 1))
    agent = agent_for(api, server, settings(token_budget=2000))
    try:
        _, logs = await run_agent(agent, tmp_path, [])
    finally:
        server.close()
    assert any(e["event"] == "model_refused" and "pushing blocks" in e["text"] for e in logs)
    assert any(line.startswith("refused: I can't help") for line in agent.journal)
    second = json.dumps(server.posts()[1].body)
    assert "refused: I can't help" in second and "Your reply was a refusal" in second


@pytest.mark.parametrize("api", APIS)
async def test_a_wrong_model_name_stops_the_agent_at_start(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI([], fallback=not_found)
    agent = agent_for(api, server, settings(), model="no-such-model")
    try:
        with trio.fail_after(10):
            tools, logs = await run_agent(agent, tmp_path, [])
    finally:
        server.close()
    stopped = [e for e in logs if e["event"] == "model_unusable"]
    assert len(stopped) == 1 and "'no-such-model' is not served" in stopped[0]["error"]
    assert len(server.posts()) == 1  # one probe call, no retries
    assert tools.board.count("tokens") == 0


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_the_daemon_refuses_a_wrong_model_in_one_line(api, tmp_path, monkeypatch, capsys):
    from enpire import fleet

    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI([], fallback=not_found)
    url = server.url if api == "anthropic" else server.url + "/v1"
    (tmp_path / "e.toml").write_text(f'[agents]\nbackend = "{api}"\nmodel = "no-such-model"\nbase_url = "{url}"\n'
                                     f'api_key_env = "{KEY_ENV}"\n[fleet]\nstate_dir = "{tmp_path / "state"}"\n')
    try:
        code = fleet.main(["--config", str(tmp_path / "e.toml"), "--quiet"])
    finally:
        server.close()
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "'no-such-model' is not served" in err and SECRET not in err


# ----------------------------------------------------------------------------- prompt caching, images


def twenty_turns(api: str) -> list:
    plan = [[("list_files", {})], [("read_file", {"path": "README.md"})],
            [("write_file", {"path": "policy.py", "content": POLICY}), ("evaluate", {"n_seeds": 3})],
            [("job", lambda b: {"job": job_ids(b)[-1]})], [("leaderboard", {})], [("task_card", {})],
            [("edit", {"path": "policy.py", "old": "1.0)", "new": "1.1)"}), ("evaluate", {"n_seeds": 3})],
            [("post_finding", {"hypothesis": "h", "change": "c", "evidence": "e", "outcome": "note"})],
            [("digest", {})], [("log", {})]]
    return [reply(api, plan[i % len(plan)], i, text=f"turn {i}") for i in range(20)]


@pytest.mark.parametrize("api", APIS)
async def test_each_request_is_mostly_an_unchanged_prefix_of_the_last(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI(twenty_turns(api), fallback=reply(api, [("digest", {})], 99))
    agent = agent_for(api, server, settings(token_budget=20_000))
    try:
        await run_agent(agent, tmp_path, [], limit=60)
    finally:
        server.close()
    bodies = [canonical(api, p.body) for p in server.posts()]
    assert len(bodies) == 20
    shares = [shared_prefix(a, b) / len(b) for a, b in zip(bodies, bodies[1:], strict=False)]
    print(f"{api}: unchanged prefix of the previous request, 19 requests after the first: min {min(shares):.1%}, "
          f"mean {sum(shares) / len(shares):.1%}; first request {len(bodies[0])} chars, last {len(bodies[-1])}")
    assert min(shares) >= 0.80
    if api == "anthropic":  # cache breakpoints at the end of the stable parts
        body = server.posts()[-1].body
        assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
        marks = [blk for m in body["messages"] for blk in m["content"] if isinstance(blk, dict) and "cache_control" in blk]
        assert len(marks) == 2  # the task card, and the end of the turns
    else:
        assert server.posts()[-1].body["parallel_tool_calls"] is True


@pytest.mark.parametrize("api", APIS)
async def test_episode_images_reach_the_model_in_the_providers_format(api, tmp_path, monkeypatch):
    import numpy as np
    from test_registry import _record

    from hw import make_driver

    monkeypatch.setenv(KEY_ENV, SECRET)
    driver = make_driver("pusht")
    obs = [driver.reset(3)] + [driver.act(np.array([250.0, 300.0])) for _ in range(5)]
    driver.disconnect()
    board = Blackboard(tmp_path / "bb")
    _record(board, tmp_path, "ep-1", "pusht", np.array(obs), np.full((5, 2), 250.0), "timeout")
    server = ScriptedAPI([reply(api, [("episode", {"episode": "ep-1", "frames": 2})], 0)],
                         fallback=reply(api, [("digest", {})], 1))
    agent = agent_for(api, server, settings(token_budget=2000))
    try:
        await run_agent(agent, tmp_path, [], board=board, state_dir=tmp_path)
    finally:
        server.close()
    body = server.posts()[1].body
    if api == "anthropic":
        results = [b for m in body["messages"] for b in m["content"] if isinstance(b, dict) and b["type"] == "tool_result"]
        images = [c for c in results[0]["content"] if c["type"] == "image"]
        assert images[0]["source"]["media_type"] == "image/png" and images[0]["source"]["type"] == "base64"
    elif api == "openai":
        parts = [p for m in body["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                 for p in m["content"]]
        assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,")
                   for p in parts)
    else:
        parts = [p for item in body["input"] if item.get("role") == "user" for p in item["content"]]
        assert any(p["type"] == "input_image" and p["image_url"].startswith("data:image/png;base64,") for p in parts)


# ----------------------------------------------------------------------------- failures, notes, ledger


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_backend_whose_server_always_fails_pauses_and_never_raises(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def echo(h: dict, b: dict):
        return 503, json.dumps({"error": {"message": f"down; got {h.get('authorization')}"}}).encode(), {}, 0.0

    server = ScriptedAPI([], fallback=echo)
    agent = agent_for(api, server, settings(max_failures=2))
    try:
        tools, logs = await run_agent(agent, tmp_path, [], limit=1.5)
    finally:
        server.close()
    paused = [e for e in logs if e["event"] == "backend_paused"]
    assert len(paused) >= 2  # paused, resumed, failed again, paused again
    assert tools.board.count("tokens") == 0
    assert SECRET not in _text(logs)


async def _first_prompt(api: str, tmp_path, peers: int, monkeypatch) -> tuple[int, int]:
    """Size of the agent's first request (as sent) with `peers` teammates' findings posted."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    board = Blackboard(tmp_path / f"bb{peers}")
    for p in range(peers):
        for g in range(6):
            board.append("findings", Finding(
                f"peer-{p}-{g}", f"peer-{p}", time.time(), f"peer {p} generation {g}: a wider standoff avoids "
                "hitting the block corner while repositioning", f"standoff {10 + g}.{p} px, push_gain 0.{p}{g}",
                f"{g}/6 succeeded, near misses 2, outcomes timeout 3; mean score 0.{p}{g}", "improved",
                score=g / 6))
    board.append("digests", write_digest(board.values("findings", Finding), None))
    server = ScriptedAPI([], fallback=reply(api, [("digest", {})], 1))
    agent = agent_for(api, server, settings(token_budget=1000))
    try:
        await run_agent(agent, tmp_path / f"run{peers}", [], board=board)
    finally:
        server.close()
    return len(canonical(api, server.posts()[0].body)), sum(
        len(f.hypothesis) + len(f.change) + len(f.evidence) for f in board.values("findings", Finding))


@pytest.mark.parametrize("api", APIS)
async def test_prompt_size_stays_flat_as_the_team_grows(api, tmp_path, monkeypatch):
    one, raw_one = await _first_prompt(api, tmp_path, 1, monkeypatch)
    eight, raw_eight = await _first_prompt(api, tmp_path, 8, monkeypatch)
    print(f"{api}: request chars with 1 peer {one}, with 8 peers {eight} ({eight / one:.2f}x); "
          f"the raw findings alone are {raw_one} vs {raw_eight} chars")
    assert eight <= 1.3 * one


def test_scrub():
    text = f"Error code: 500 - {{'headers': {{'x-api-key': '{SECRET}', 'authorization': 'Bearer abc.def'}}}}"
    assert SECRET not in scrub(text) and "abc.def" not in scrub(text)
    assert scrub("key=hunter2-long", ["hunter2-long"]) == "key=[redacted]"


async def test_notes_search_and_read(tmp_path):
    from enpire.agents.registry import REGISTRY, open_session

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("# Push-T\n\nApproach the block from behind.\n\nUnrelated text.\n")
    (notes / "b.txt").write_text("The block corner catches the pusher when the standoff is small.")
    tools = Tools("agent-0", "pusht", Workspace(tmp_path / "ws"), None, Blackboard(tmp_path / "bb"))
    async with open_session(tools, SessionSettings(notes_dir=str(notes)), card("pusht"), TUNING) as s:
        hits = await REGISTRY.call(s, "search_notes", {"query": "block standoff"})
        assert hits.text.startswith("b.txt:") and hits.text.count("\n---\n") == 1
        page = await REGISTRY.call(s, "read_note", {"path": "a.md", "max_lines": 2})
        assert page.text.startswith("a.md: lines 1-2 of 5; next page: start_line=3")
        escape = await REGISTRY.call(s, "read_note", {"path": "../bb/data.mdb"})
        assert escape.is_error


def test_ledger_figures_and_prices():
    rec = [TokenRecord("a", "m", 10.0, 900, 300, 100, cache_write_tokens=50, reasoning_tokens=20, cost=0.5),
           TokenRecord("b", "m", 70.0, 500, 0, 500), TokenRecord("a", "m", 130.0, 1000, 0, 0)]
    t = ledger.totals(rec)
    assert t.total == 3000 and t.cached_input_tokens == 300 and t.cache_write_tokens == 50 and t.reasoning_tokens == 20
    assert ledger.mtu(rec, 120.0) == 1500.0
    assert ledger.tokens_to_success(rec, 100.0) == 2000 and ledger.tokens_to_success(rec, None) is None
    assert ledger.time_to_success(10.0, 100.0) == 90.0
    assert ledger.budget_left(rec, "a", 2500) == 500 and ledger.budget_left(rec, "a", 0) is None
    assert ledger.over_budget(rec, "a", 2000) and not ledger.over_budget(rec, "b", 2000)
    summary = ledger.summary(rec)
    assert summary["team"]["tokens"] == 3000 and summary["agents"]["a"]["cost"] == 0.5
    # uncached input 550 at 3, cached 300 at 0.3, writes 50 at 3.75, output 100 at 15 (per million)
    price = ledger.Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    assert ledger.cost(price, 900, 300, 50, 100) == pytest.approx((550 * 3 + 300 * 0.3 + 50 * 3.75 + 100 * 15) / 1e6)
    assert ledger.cost(None, 900, 300, 50, 100) == 0.0


@pytest.mark.parametrize("api", ["openai"])
async def test_the_ledger_records_the_price_of_each_call(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ScriptedAPI([], fallback=reply(api, [("digest", {})], 3))
    price = ledger.Price(input=2.0, output=8.0, cached_input=0.5)
    agent = agent_for(api, server, settings(token_budget=2000, price=price))
    try:
        tools, _ = await run_agent(agent, tmp_path, [])
    finally:
        server.close()
    records = tools.board.values("tokens", TokenRecord)
    assert len(records) == 2 and all(r.cost == pytest.approx((600 * 2 + 300 * 0.5 + 100 * 8) / 1e6) for r in records)


def test_briefing_lists_every_finding_when_the_digest_is_off(tmp_path):
    """`[agents] digest = false` (ablation): the digest tool and briefing carry all peers' findings."""
    from enpire.agents.tool_team import team_state

    board = Blackboard(tmp_path / "bb")
    for p in range(3):
        board.append("findings", Finding(f"f{p}", f"agent-{p}", time.time(), f"hypothesis {p}", f"change {p}",
                                         f"evidence {p}", "improved", score=0.5))
    board.append("digests", write_digest(board.values("findings", Finding), None))
    tools = Tools("agent-0", "pusht", None, None, board)

    class S:  # the two fields team_state reads
        def __init__(self, digest):
            self.tools, self.settings = tools, SessionSettings(digest=digest)

    on, off = team_state(S(True)), team_state(S(False))
    assert on.startswith("## Team digest") and "hypothesis 1" not in on
    assert off.startswith("## Team findings") and all(f"hypothesis {p} | change {p} | evidence {p}" in off
                                                       for p in range(3))
    assert re.search(r"\[agent-0 improved 50%\]", off)


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_a_call_in_flight_when_the_fleet_stops_is_still_billed(api, tmp_path, monkeypatch):
    """The agent is cancelled while the server takes 1 s to answer: the reply is recorded on the ledger within
    the shutdown grace, and the agent does not wait longer than that grace."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    answer = reply(api, [("digest", {})], 0)
    slow = lambda h, b: (*answer(h, b)[:3], 1.0)  # noqa: E731
    server = ScriptedAPI([slow], fallback=slow)
    agent = LLMAgent(AnthropicClient("claude-test", api_key_env=KEY_ENV, base_url=server.url, timeout_s=60)
                     if api == "anthropic" else OpenAIClient("gpt-test", api_key_env=KEY_ENV,
                                                              base_url=server.url + "/v1", timeout_s=60),
                     settings(shutdown_grace_s=20.0), card=card("pusht"), tuning_seeds=TUNING, rng_seed=0)
    board = Blackboard(tmp_path / "bb")
    try:
        async with trio.open_nursery() as nursery:
            scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: CannedScheduler([]))
            nursery.start_soon(agent.run, Tools("agent-0", "pusht", Workspace(tmp_path / "ws"), scheduler, board))
            with trio.fail_after(10):
                while not server.posts():
                    await trio.sleep(0.01)
            t0 = time.monotonic()
            nursery.cancel_scope.cancel()
        stopped_after = time.monotonic() - t0
    finally:
        server.close()
    records = board.values("tokens", TokenRecord)
    assert len(records) == 1 and (records[0].input_tokens, records[0].output_tokens)[1] > 0
    assert 0.5 < stopped_after < 15.0  # it waited for the answer, not for the whole grace or the timeout


# ----------------------------------------------------------------------------- whole files, teammates, training


def _last(pattern: str, body: dict) -> str | None:
    found = re.findall(pattern, json.dumps(body).replace("\\\\", "\\").replace('\\"', '"'))
    return found[-1] if found else None


@pytest.mark.parametrize("api", APIS)
async def test_the_model_pages_through_the_template_edits_one_line_and_reads_a_teammates_commit(
        api, tmp_path, monkeypatch):
    from enpire.agents import pusht_policy

    monkeypatch.setenv(KEY_ENV, SECRET)
    template = Path(pusht_policy.__file__).read_text()
    ws = Workspace(tmp_path / "ws")
    ws.commit("main", {"policy.py": template}, "template")
    mate = ws.commit("agent/agent-1", {"policy.py": template.replace("class Policy", "class Policy  # mate")},
                     "teammate's variant")
    target = next(line for line in template.splitlines() if line.strip().startswith("def act("))
    state = {"i": 0, "edited": False, "shown": False}

    def model(h: dict, b: dict):
        state["i"] += 1
        header = _last(r"policy.py @ \w+: lines \d+-(\d+) of (\d+)", b)
        if state["i"] == 1 or (header and header[0] != header[1] and not state["edited"]):
            start = int(header[0]) + 1 if header else 1
            call = [("read_file", {"path": "policy.py", "start_line": start, "max_lines": 400})]
        elif not state["edited"]:
            state["edited"] = True
            call = [("edit", {"path": "policy.py", "old": target, "new": target + "  # faster", "message": "one line"})]
        elif not state["shown"]:
            state["shown"] = True
            call = [("show_commit", {"commit": mate[:9]})]
        else:
            call = [("digest", {})]
        return reply(api, call, state["i"])(h, b)

    server = ScriptedAPI([], fallback=model)
    agent = agent_for(api, server, settings(token_budget=12_000, tools=SessionSettings(tool_output_chars=5000)))
    try:
        await run_agent(agent, tmp_path, [], workspace=ws)
    finally:
        server.close()
    posts = server.posts()
    # Every line of the template reached the model, page after page, each page under the output cap.
    pages = [o for t in agent.turns for o in t.outputs if o.name == "read_file"]
    lines = [row.split("| ", 1)[1] if "| " in row else "" for p in pages for row in p.content.split("\n")[1:]]
    assert len(pages) >= 3 and lines == template.splitlines() and all(len(p.content) <= 5000 for p in pages)
    head = ws.head("agent/agent-0")
    assert ws.read_file(head, "policy.py").decode() == template.replace(target, target + "  # faster")
    assert "# mate" in json.dumps(posts[-1].body)  # the teammate's commit, read by id


@pytest.mark.parametrize("api", [pytest.param("anthropic", marks=pytest.mark.slow), "openai"])
async def test_the_model_trains_bc_and_the_cells_run_the_checkpoint(api, tmp_path, monkeypatch):
    """train (BC through the trainer actor) and wait; commit_checkpoint by job id; evaluate that commit on a
    real cell and wait for its episodes."""
    from bus.records import EpisodeRecord
    from enpire import config as cfg
    from enpire.agents.pusht_policy import INITIAL_PARAMS
    from enpire.agents.pusht_policy import Policy as Scripted
    from enpire.agents.session import agent_tools
    from enpire.fleet import open_state_dir, start_core
    from enpire.learning.dataset import record_scripted

    monkeypatch.setenv(KEY_ENV, SECRET)
    state = tmp_path / "state"
    assert record_scripted(state, lambda: Scripted(INITIAL_PARAMS), range(3))["successes"] == 3
    steps = {"i": 0}

    def model(h: dict, b: dict):
        steps["i"] += 1
        i = steps["i"]
        if i == 1:
            calls = [("train", {"recipe": "bc", "time_budget_s": 60,
                                "options": {"hidden": "32", "layers": "3", "max_epochs": "5"}}), ("wait", {"timeout_s": 200})]
        elif i == 2:
            calls = [("commit_checkpoint", {"job": _last(r'"job":"(agent-0-train-\w+)"', b), "message": "bc"})]
        elif i == 3:
            calls = [("evaluate", {"commit": _last(r'"commit":"([0-9a-f]{40})"', b), "n_seeds": 2}),
                     ("wait", {"timeout_s": 200})]
        else:
            calls = [("digest", {})]
        return reply(api, calls, i)(h, b)

    server = ScriptedAPI([], fallback=model)
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"cells.count": 1, "agents.count": 0, "scheduler.background": False})
    board, meta = open_state_dir(state)
    agent = agent_for(api, server, settings(token_budget=4000))
    try:
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, state, board, meta)
            tools = agent_tools(config, 0, core.workspace, core.judge, board, trainer=core.trainer, state_dir=state,
                                events=core.events)
            with trio.fail_after(300):
                await agent.run(tools)
            nursery.cancel_scope.cancel()
    finally:
        server.close()
    learned = core.workspace.head("learned/agent-0")
    assert learned is not None and core.workspace.read_file(learned, "weights.npz")
    ran = [e for e in board.values("episodes", EpisodeRecord) if e.policy.commit == learned]
    assert len(ran) == 2 and all(e.cell_id != "recorder" for e in ran)  # a real cell ran the checkpoint
    assert '"n":2' in json.dumps(server.posts()[3].body).replace("\\", "")  # the model saw the result


@pytest.mark.parametrize("api", APIS)
async def test_a_request_refused_as_it_is_is_not_retried(api, tmp_path, monkeypatch):
    """400 (the request itself is wrong): no backoff retries of the same request; the agent pauses once,
    starts a fresh window, and the next request after the pause is answered."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    bad = lambda h, b: (400, json.dumps({"type": "error", "error": {  # noqa: E731
        "type": "invalid_request_error", "message": "prompt is too long"}}).encode(), {}, 0.0)
    server = ScriptedAPI([bad], fallback=reply(api, [("digest", {})], 1))
    agent = agent_for(api, server, settings(token_budget=1000, pause_s=0.2))
    try:
        tools, logs = await run_agent(agent, tmp_path, [])
    finally:
        server.close()
    events = [e["event"] for e in logs]
    assert events.count("llm_retry") == 0 and events.count("backend_paused") == 1
    assert [e["retryable"] for e in logs if e["event"] == "backend_paused"] == [False]
    assert len(server.posts()) == 2 and tools.board.count("tokens") == 1
