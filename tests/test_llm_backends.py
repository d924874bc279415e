"""Model-driven backends through the official SDKs, against a scripted local server in each API's wire format.

The server (127.0.0.1, ephemeral port, a thread) first fails in every way a provider does (429 with
retry-after, 500 echoing the Authorization header, a malformed body, valid JSON that is no reply, a
reply slower than the client timeout), then plays tool-use turns: a bad call, read files, commit, evaluate, post a finding, promote.
The agent runs on the real Tools, Blackboard and Workspace with an in-process scheduler actor.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest
import structlog
import trio

from actors.runtime import Actor, ActorSystem
from actors.summarizer import write_digest
from bus.blackboard import Blackboard
from bus.messages import EpisodeSummary, EvalRequest, EvalResult, PromoteRequest, PromoteResult
from bus.records import Finding, TokenRecord
from enpire import ledger
from enpire.agents.anthropic_backend import AnthropicClient
from enpire.agents.llm import LLMAgent, LLMSettings, scrub, search_notes
from enpire.agents.openai_backend import OpenAIClient
from enpire.agents.tools import Tools
from enpire.workspace import Workspace

SECRET = "sk-test-" + "Zq9x" * 8
KEY_ENV = "ENPIRE_TEST_LLM_KEY"
TUNING = range(0, 1000)

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

# ----------------------------------------------------------------------------- scripted server

# A step answers one request: (status, body bytes, extra headers, delay before answering).
Step = Callable[[dict], tuple[int, bytes, dict, float]]


class ScriptedAPI:
    def __init__(self, steps: list[Step], fallback: Step):
        self.steps = list(steps)
        self.fallback = fallback
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, json body)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                api.requests.append((self.path, headers, json.loads(raw)))
                step = api.steps.pop(0) if api.steps else api.fallback
                status, body, extra, delay = step(headers)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in {"content-type": "application/json", "content-length": str(len(body)), **extra}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout): nothing to answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(body: dict) -> Step:
    return lambda h: (200, json.dumps(body).encode(), {}, 0.0)


def failures(api: str) -> list[Step]:
    """429 with retry-after, 500 echoing the caller's key, a cut-off body, JSON that is no reply, a reply after
    the client timeout."""
    if api == "anthropic":
        limited = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    else:
        limited = {"error": {"message": "slow down", "type": "rate_limit_exceeded", "code": None}}

    def echo(h: dict) -> dict:
        if api == "anthropic":
            return {"type": "error", "error": {"type": "api_error", "message": f"saw {h.get('authorization')}"}}
        return {"error": {"message": f"saw Authorization: {h.get('authorization')}", "type": "server_error"}}

    return [
        lambda h: (429, json.dumps(limited).encode(), {"retry-after": "0.05"}, 0.0),
        lambda h: (500, json.dumps(echo(h)).encode(), {}, 0.0),
        lambda h: (200, b'{"id": "x", "content": [{"type": ', {}, 0.0),
        lambda h: (200, b'{"object": "error", "message": "model overloaded", "code": 503}', {}, 0.0),
        lambda h: (200, b"{}", {}, 1.0),  # the client times out at 0.5 s
    ]


def anthropic_turn(name: str, args: dict, i: int) -> Step:
    return ok({
        "id": f"msg_{i}", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [{"type": "text", "text": f"step {i}"},
                    {"type": "tool_use", "id": f"toolu_{i}", "name": name, "input": args}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 600, "cache_read_input_tokens": 300, "cache_creation_input_tokens": 0,
                  "output_tokens": 100},
    })


def openai_turn(name: str, args: dict | str, i: int) -> Step:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return ok({
        "id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1, "model": "gpt-test",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}]}}],
        "usage": {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1000,
                  "prompt_tokens_details": {"cached_tokens": 300}},
    })


TURN = {"anthropic": anthropic_turn, "openai": openai_turn}

CYCLE = [
    ("evaluate", {"n_seeds": "many"}),  # bad arguments: the model is told, the agent goes on
    ("read_files", {}),
    ("commit", {"files": {"policy.py": POLICY}, "message": "trivial policy"}),
    ("evaluate", {"params": {"gain": 1.5}, "n_seeds": 4}),
    ("post_finding", {"hypothesis": "a higher gain pushes harder", "change": "gain 1.5",
                      "evidence": "2/4 on tuning seeds", "outcome": "improved"}),
    ("promote", {"params": {"gain": 1.5}}),
]


def client(api: str, url: str):
    if api == "anthropic":
        return AnthropicClient("claude-test", api_key_env=KEY_ENV, base_url=url, timeout_s=0.5)
    return OpenAIClient("gpt-test", api_key_env=KEY_ENV, base_url=url + "/v1", timeout_s=0.5)


# ----------------------------------------------------------------------------- fleet side


class CannedScheduler(Actor):
    name = "scheduler"
    concurrent_handlers = True

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    async def handle(self, msg):
        self.seen.append(msg)
        if isinstance(msg, EvalRequest):
            eps = [EpisodeSummary(f"{msg.job_id}:{i}", s, i % 2 == 0, i % 2 == 0, 0.9 if i % 2 == 0 else 0.5,
                                  "success" if i % 2 == 0 else "timeout", 120) for i, s in enumerate(msg.seeds)]
            return EvalResult(job_id=msg.job_id, policy=msg.policy, task=msg.task, episodes=eps)
        if isinstance(msg, PromoteRequest):
            return PromoteResult(job_id=msg.job_id, policy=msg.policy, promoted=True, successes=80, n=100,
                                 champion_successes=0, champion_n=0, detail="promoted: 80/100 held-out")


def settings(**kw) -> LLMSettings:
    base = dict(backoff_initial_s=0.02, backoff_max_s=0.1, pause_s=0.2, max_failures=5)
    return LLMSettings(**{**base, **kw})


def _text(value) -> str:
    return msgspec.json.encode(value).decode() if not isinstance(value, str) else value


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_agent_runs_the_improvement_cycle_through_the_sdk(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    steps = failures(api) + [TURN[api](name, args, i) for i, (name, args) in enumerate(CYCLE)]
    server = ScriptedAPI(steps, fallback=TURN[api]("read_digest", {}, 99))
    board, workspace, seen = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws"), []
    # Six turns of 1000 tokens each: the budget ends the agent right after the promotion.
    agent = LLMAgent(client(api, server.url), settings(token_budget=6000, max_turns_window=3, max_failures=6),
                     task_text="Push the T onto the goal.",
                     tuning_seeds=TUNING, rng_seed=7)
    try:
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: CannedScheduler(seen))
                tools = Tools("agent-0", "pusht", workspace, scheduler, board)
                with trio.fail_after(30):
                    await agent.run(tools)  # returns once the token budget is spent
                nursery.cancel_scope.cancel()
    finally:
        server.close()

    # The cycle happened: policy committed on its own branch, evaluated on tuning seeds, finding, promotion.
    assert (await tools.read_files())["policy.py"] == POLICY
    evals = [m for m in seen if isinstance(m, EvalRequest)]
    assert len(evals) == 1 and len(evals[0].seeds) == 4 and all(s in TUNING for s in evals[0].seeds)
    assert evals[0].policy.params == {"gain": 1.5}
    assert any(isinstance(m, PromoteRequest) for m in seen)
    findings = board.values("findings", Finding)
    assert [f.hypothesis for f in findings] == ["a higher gain pushes harder", "budget exhausted: this agent stops"]
    # The bad call came back as a tool error the model saw in its next request.
    assert "bad arguments for evaluate" in json.dumps(server.requests[len(failures(api)) + 1][2])
    # Only the last 3 turns stay verbatim; the older ones left one journal line each in the briefing.
    assert [t.reply.calls[0].name for t in agent.turns] == ["evaluate", "post_finding", "promote"]
    assert [line.split(" ")[0] for line in agent.journal] == ["evaluate", "read_files", "commit"]
    assert "evaluate ERROR" in agent.journal[0] and "evaluate ERROR" in json.dumps(server.requests[-1][2])
    assert len(server.requests[-1][2]["messages"]) == (7 if api == "anthropic" else 8)  # briefing + 3 turns

    # Every answered call is on the ledger with the usage the server reported (input includes cached).
    records = board.values("tokens", TokenRecord)
    assert len(records) == 6
    assert {(r.agent, r.input_tokens, r.cached_input_tokens, r.output_tokens) for r in records} == {
        ("agent-0", 900, 300, 100)}
    assert ledger.per_agent(records)["agent-0"].total == 6000

    # Retries were logged (5 failures before the first answer), and the key leaked nowhere.
    events = [e["event"] for e in logs]
    assert events.count("llm_retry") == 5 and "backend_paused" not in events
    assert all(h.get("authorization") == f"Bearer {SECRET}" or h.get("x-api-key") == SECRET
               for _, h, _ in server.requests)  # the key did reach the server, from the environment
    echoed = [e for e in logs if e["event"] == "llm_retry" and "500" in e["error"]]
    assert echoed and "[redacted]" in echoed[0]["error"]
    everywhere = [_text(logs), _text(findings), _text([o.content for t in agent.turns for o in t.outputs])]
    assert not any(SECRET in text for text in everywhere)


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_backend_whose_server_always_fails_pauses_and_never_raises(api, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def echo(h: dict) -> tuple[int, bytes, dict, float]:
        return 503, json.dumps({"error": {"message": f"down; got {h.get('authorization')}"}}).encode(), {}, 0.0

    server = ScriptedAPI([], fallback=echo)
    board, workspace = Blackboard(tmp_path / "bb"), Workspace(tmp_path / "ws")
    agent = LLMAgent(client(api, server.url), settings(max_failures=2), task_text="t", tuning_seeds=TUNING, rng_seed=0)
    try:
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: CannedScheduler([]))
                with trio.move_on_after(1.0):
                    await agent.run(Tools("agent-0", "pusht", workspace, scheduler, board))
                nursery.cancel_scope.cancel()
    finally:
        server.close()
    paused = [e for e in logs if e["event"] == "backend_paused"]
    assert len(paused) >= 2  # paused, resumed, failed again, paused again
    assert board.count("tokens") == 0
    assert SECRET not in _text(logs)


async def _first_prompt(api: str, tmp_path, peers: int, monkeypatch) -> tuple[int, int]:
    """Size of the agent's first request (system + messages, as sent) with `peers` teammates' findings posted."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    board, workspace = Blackboard(tmp_path / f"bb{peers}"), Workspace(tmp_path / f"ws{peers}")
    for p in range(peers):
        for g in range(6):
            board.append("findings", Finding(
                f"peer-{p}-{g}", f"peer-{p}", time.time(), f"peer {p} generation {g}: a wider standoff avoids "
                "hitting the block corner while repositioning", f"standoff {10 + g}.{p} px, push_gain 0.{p}{g}",
                f"{g}/6 succeeded, near misses 2, outcomes timeout 3; mean score 0.{p}{g}", "improved",
                score=g / 6))
    board.append("digests", write_digest(board.values("findings", Finding), None))
    server = ScriptedAPI([TURN[api]("read_digest", {}, 0)], fallback=TURN[api]("read_digest", {}, 1))
    agent = LLMAgent(client(api, server.url), settings(), task_text="Push the T onto the goal.",
                     tuning_seeds=TUNING, rng_seed=0)
    try:
        async with trio.open_nursery() as nursery:
            scheduler = await ActorSystem(nursery).spawn("scheduler", lambda: CannedScheduler([]))
            nursery.start_soon(agent.run, Tools("agent-0", "pusht", workspace, scheduler, board))
            with trio.fail_after(10):
                while not server.requests:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        server.close()
    body = server.requests[0][2]
    return len(json.dumps([body.get("system"), body["messages"]])), sum(
        len(f.hypothesis) + len(f.change) + len(f.evidence) for f in board.values("findings", Finding))


@pytest.mark.parametrize("api", ["anthropic", "openai"])
async def test_prompt_size_stays_flat_as_the_team_grows(api, tmp_path, monkeypatch):
    one, raw_one = await _first_prompt(api, tmp_path, 1, monkeypatch)
    eight, raw_eight = await _first_prompt(api, tmp_path, 8, monkeypatch)
    print(f"{api}: request chars with 1 peer {one}, with 8 peers {eight} ({eight / one:.2f}x); "
          f"the raw findings alone are {raw_one} vs {raw_eight} chars")
    assert eight <= 1.3 * one


def test_scrub_and_notes_search(tmp_path):
    text = f"Error code: 500 - {{'headers': {{'x-api-key': '{SECRET}', 'authorization': 'Bearer abc.def'}}}}"
    assert SECRET not in scrub(text) and "abc.def" not in scrub(text)
    assert scrub("key=hunter2-long", ["hunter2-long"]) == "key=[redacted]"
    (tmp_path / "a.md").write_text("# Push-T\n\nApproach the block from behind.\n\nUnrelated text.\n")
    (tmp_path / "b.txt").write_text("The block corner catches the pusher when the standoff is small.")
    hits = search_notes(tmp_path, "block standoff")
    assert hits[0].startswith("b.txt:") and len(hits) == 2
    assert search_notes(tmp_path / "missing", "block") == []


def test_ledger_figures():
    rec = [TokenRecord("a", "m", 10.0, 900, 300, 100), TokenRecord("b", "m", 70.0, 500, 0, 500),
           TokenRecord("a", "m", 130.0, 1000, 0, 0)]
    assert ledger.totals(rec).total == 3000 and ledger.totals(rec).cached_input_tokens == 300
    assert ledger.mtu(rec, 120.0) == 1500.0
    assert ledger.tokens_to_success(rec, 100.0) == 2000 and ledger.tokens_to_success(rec, None) is None
    assert ledger.time_to_success(10.0, 100.0) == 90.0
    assert ledger.budget_left(rec, "a", 2500) == 500 and ledger.budget_left(rec, "a", 0) is None
    assert ledger.over_budget(rec, "a", 2000) and not ledger.over_budget(rec, "b", 2000)


def test_briefing_lists_every_finding_when_the_digest_is_off(tmp_path):
    """`[agents] digest = false` (ablation): the briefing carries all peers' findings instead of the digest."""
    from enpire.agents.llm import briefing_state

    board = Blackboard(tmp_path / "bb")
    for p in range(3):
        board.append("findings", Finding(f"f{p}", f"agent-{p}", time.time(), f"hypothesis {p}", f"change {p}",
                                         f"evidence {p}", "improved", score=0.5))
    board.append("digests", write_digest(board.values("findings", Finding), None))
    tools = Tools("agent-0", "pusht", None, None, board)
    on, off = briefing_state(tools, 3000), briefing_state(tools, 3000, digest=False)
    assert on.startswith("## Team digest") and "hypothesis 1" not in on
    assert off.startswith("## Team findings") and all(f"hypothesis {p} | change {p} | evidence {p}" in off
                                                       for p in range(3))
