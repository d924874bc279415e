"""The CLI agent backend with the real Claude Code and Codex against scripted loopback model servers.

These tests use a small registry of their own (the MCP plumbing, the jail, the relay and the turns are
what is under test); tests/test_cli_fleet.py runs the CLIs against a real fleet and the real registry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil

import msgspec
import pytest
import trio

from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import TokensUsed
from bus.records import CLIRunRecord, TokenRecord
from enpire import ledger
from enpire.agents.cli_backend import CLIAgent, CLIConfigError, CLISettings, cli_binary
from enpire.agents.tools import Tools
from enpire.workspace import Workspace
from tests.cli_harness import MAIN_TOOL, MODEL, PROVIDER, read, require, shell, write
from tests.scripted_models import Reply, ScriptedModel, Steps
from tests.test_mcp_server import Registry

SONNET = ledger.Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)  # list prices, USD per M
TASK = {"name": "pusht", "driver": "pusht", "tuning_start": 0, "tuning_count": 100, "max_delta": 100.0}


class FakeTools:
    """What the backend uses of `Tools` (its branch, workspace, blackboard, champion, digest, findings)."""

    def __init__(self, root, agent="agent-0"):
        self.agent, self.branch = agent, f"agent/{agent}"
        self.workspace = Workspace(root / "workspace")
        self.workspace.commit("main", {"policy.py": "class Policy:\n    pass\n"}, "template")
        self.board = Blackboard(root / "blackboard.lmdb")
        self.events = EventHub()
        self.findings = []

    def champion(self):
        return None

    def digest(self):
        return None

    async def post_finding(self, **kw):
        self.findings.append(kw)

    record_tokens_from_thread = Tools.record_tokens_from_thread  # the real ledger append and TokensUsed announcement


@contextlib.asynccontextmanager
async def _session(tools):
    yield f"session of {tools.agent}"


def make_agent(kind, url, **kw) -> CLIAgent:
    settings = CLISettings(kind, model=MODEL[kind], base_url=url, api_key_env="ENPIRE_TEST_MODEL_KEY",
                           turn_timeout_s=kw.pop("turn_timeout_s", 120), backoff_initial_s=0.2, **kw)
    return CLIAgent(settings, open_session=_session, registry=kw.get("registry") or Registry(), card_text="card",
                    protocol="protocol", task=TASK)


@pytest.fixture(autouse=True)
def _model_key(monkeypatch):
    monkeypatch.setenv("ENPIRE_TEST_MODEL_KEY", "sk-the-real-model-key")
    monkeypatch.setenv("ENPIRE_SECRET", "fleet-secret-never-in-a-jail")


# CI runs both CLIs through tests/test_cli_fleet.py; here Codex's variants are `slow` to keep CI short.
BOTH = ["claude-code", pytest.param("codex", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", BOTH)
async def test_a_turn_writes_commits_and_calls_the_fleet(tmp_path, kind):
    require(kind)
    tools = FakeTools(tmp_path)
    wt = tmp_path / "cli" / "agent-0" / "worktree"
    policy = "class Policy:\n    def __init__(self, params):\n        self.gain = 3.0\n"
    steps = Steps([
        lambda ex: Reply(calls=read(kind, f"{wt}/policy.py")),
        lambda ex: Reply(text="Writing a policy.", calls=write(kind, f"{wt}/policy.py", policy)),
        lambda ex: Reply(calls=shell(kind, "git add policy.py && git commit -qm 'gain 3' && env")),
        lambda ex: Reply(calls=((ex.tool("echo"), {"n": 5}),)),
        lambda ex: Reply(text="Done."),
    ], main_tool=MAIN_TOOL[kind])
    with ScriptedModel(PROVIDER[kind], steps) as model:
        agent = make_agent(kind, model.url, max_turns=2, price=SONNET)
        with trio.fail_after(240):
            await agent.run(tools)
    assert not model.errors, model.errors
    assert [o.ok for o in agent.outcomes] == [True, True], agent.outcomes
    env_out = steps.seen[3].results[0]
    assert "sk-the-real-model-key" not in env_out and "fleet-secret" not in env_out  # only its relay token
    echo = steps.seen[4]
    assert "echo 5" in echo.results[0] and "published worktree commit" in echo.results[0]
    assert echo.images == 1  # the tool's image reached the model as an image
    head = tools.workspace.head("agent/agent-0")
    assert tools.workspace.read(head)["policy.py"] == policy
    # Turn 2 resumed turn 1's session: its first request carries turn 1's conversation.
    second = [e for e in steps.seen if "Continue improving" in json.dumps(e.body)]
    assert second and "gain 3" in json.dumps(second[0].body)
    records = tools.board.values("tokens", TokenRecord)
    assert len(records) == len(model.log) >= 5
    assert tools.events.published == len(records)  # each call told to the fleet's progress as it happened
    assert tools.events.latest(TokensUsed).call == records[-1]
    for r, logged in zip(records, model.log, strict=True):
        u = logged.usage
        assert (r.agent, r.input_tokens, r.cached_input_tokens, r.cache_write_tokens, r.output_tokens,
                r.reasoning_tokens) == ("agent-0", u.input_tokens, u.cached_input_tokens, u.cache_write_tokens,
                                        u.output_tokens, u.reasoning_tokens)
    assert all(h["x-api-key" if kind == "claude-code" else "authorization"].endswith("sk-the-real-model-key")
               for h in (entry.headers for entry in model.log))
    # Each run's own figures are on the ledger beside the calls: its tokens as the CLI counted them (Codex's
    # count covers the thread so far) and its cost (Claude Code's covers the session so far; Codex has none).
    runs = tools.board.values("cli_runs", CLIRunRecord)
    assert [(r.agent, r.cli, r.turn, r.ok) for r in runs] == [("agent-0", kind, 0, True), ("agent-0", kind, 1, True)]
    assert runs[0].session == runs[1].session != ""  # one session, resumed
    first_of_run_2 = next(i for i, e in enumerate(model.log) if "Continue improving" in json.dumps(e.exchange.body))
    served = [sum(u.input_tokens + u.output_tokens for u in (e.usage for e in model.log[:first_of_run_2])),
              sum(u.input_tokens + u.output_tokens for u in (e.usage for e in model.log[first_of_run_2:]))]
    assert [r.input_tokens + r.output_tokens for r in runs] == served  # run by run, as the server reported
    mine = ledger.summary(records, runs)["agents"]["agent-0"]
    assert mine["cli_runs"] == 2 and mine["cli_tokens"] == mine["tokens"]
    if kind == "codex":
        assert [r.cost_usd for r in runs] == [None, None] and mine["cli_cost_usd"] is None
        return
    logs = tmp_path / "cli" / "agent-0" / "logs"
    reported = [json.loads(line)["total_cost_usd"] for turn in ("turn-00000", "turn-00001")
                for line in (logs / f"{turn}.jsonl").read_text().splitlines() if '"type":"result"' in line]
    assert reported[1] > reported[0] > 0 and [r.cost_usd for r in runs] == pytest.approx(
        [reported[0], reported[1] - reported[0]])
    # Claude Code, pricing the same calls at the list prices the ledger was given here, agrees with it.
    assert mine["cli_cost_usd"] == pytest.approx(reported[1], abs=1e-6)
    assert mine["cli_cost_usd"] == pytest.approx(mine["cost"], abs=1e-5)  # both rounded to 5-6 places


def test_a_session_figure_counts_once_per_session():
    """A figure that covers the CLI's session so far is taken net of the session's earlier runs."""
    from enpire.agents.cli_backend import run_share

    def rec(session, cost, tokens=(0, 0)):
        return CLIRunRecord("a", "claude-code", 0.0, 0, True, 1.0, session, cost, *tokens)
    assert run_share("claude-code", 0.30, (500, 20), [rec("s1", 0.10), rec("s1", None)]) == (
        pytest.approx(0.20), (500, 20))  # Claude Code: its cost covers the session, its tokens the run
    assert run_share("claude-code", 0.05, (9, 1), []) == (0.05, (9, 1))  # a fresh session
    assert run_share("codex", None, (1500, 70), [rec("t1", None, (1000, 50))]) == (None, (500, 20))
    assert run_share("command", 0.4, (9, 1), [rec("c", 0.1, (5, 5))]) == (0.4, (9, 1))
    runs = [rec("s1", 0.10, (100, 10)), rec("s1", 0.20, (50, 5)), CLIRunRecord("b", "codex", 0.0, 0, True, 1.0)]
    s = ledger.summary([TokenRecord("a", "m", 1.0, 100, 0, 10, cost=0.2)], runs)
    assert (s["agents"]["a"]["cli_cost_usd"], s["agents"]["a"]["cli_tokens"], s["agents"]["a"]["cli_runs"]) == (
        0.3, 165, 2)
    assert s["agents"]["a"]["cost"] == 0.2  # the ledger's own price-based figure stays beside it
    assert s["agents"]["b"]["cli_cost_usd"] is None and s["agents"]["b"]["calls"] == 0
    assert (s["team"]["cli_runs"], s["team"]["cli_cost_usd"], s["team"]["cli_tokens"]) == (3, 0.3, 165)
    assert "cli_cost_usd" not in ledger.summary([TokenRecord("a", "m", 1.0, 100, 0, 10)])["team"]


@pytest.mark.parametrize("kind", ["claude-code", "codex"])
def test_hostile_cli_output_is_skipped_not_a_crash(kind):
    """The CLI's lines come out of the jail: brackets nested past the parser's limit, values of the wrong
    type where a session, a message or a usage is expected. None crashes the reader, and what the run
    reports still fits its ledger record; a well-formed line still counts."""
    from enpire.agents.cli_backend import Run

    failed = []
    run = Run(on_failed=lambda tool, given, error: failed.append((tool, given, error)))
    hostile = ["[" * 100_000, '{"a": ' * 5_000 + "1" + "}" * 5_000, "\xff", "[1]", "null",
               '{"type": "result", "session_id": {"x": 1}, "usage": [1], "total_cost_usd": true}',
               '{"type": "assistant", "message": "text, not an object"}',
               '{"type": "assistant", "message": {"content": 7}}',
               '{"type": "user", "message": {"content": [{"type": "tool_use", "id": ["a"], "input": 1}, '
               '{"type": "tool_result", "is_error": true, "tool_use_id": {"b": 2}, "content": 5}]}}',
               '{"type": "thread.started", "thread_id": ["t"]}', '{"type": "item.completed", "item": [1]}',
               '{"type": "turn.completed", "usage": {"input_tokens": -5, "output_tokens": 1' + "0" * 30 + '}}',
               '{"type": "result", "usage": {"input_tokens": true, "output_tokens": 1e400}, "total_cost_usd": 1e400}',
               '{"type": "result", "total_cost_usd": 1' + "0" * 400 + '}',
               '{"type": "result", "session_id": "' + "s" * 100_000 + '"}',
               '{"type": "thread.started", "thread_id": "' + "t" * 100_000 + '"}']
    good = ('{"type": "result", "session_id": "s-1", "usage": {"input_tokens": 7, "output_tokens": 3}, '
            '"total_cost_usd": 0.5}' if kind == "claude-code" else
            '{"type": "turn.completed", "usage": {"input_tokens": 7, "output_tokens": 3}}')
    for line in [*hostile, good]:
        run.feed(kind, line)
    for line in hostile:  # and after it
        run.feed(kind, line)
    assert all(isinstance(v, int) and 0 <= v < 1 << 48 for v in run.usage)
    assert isinstance(run.session, str) and len(run.session) <= 200 and (run.cost is None or math.isfinite(run.cost))
    record = CLIRunRecord("a", kind, 0.0, 0, True, 1.0, run.session, run.cost, *run.usage)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(record), type=CLIRunRecord) == record
    assert all(isinstance(part, str) for call in failed for part in call)
    run = Run()
    run.feed(kind, good)
    assert run.usage == (7, 3) and (run.session, run.cost) == (("s-1", 0.5) if kind == "claude-code" else ("", None))


def test_status_shows_the_cli_figures_beside_the_ledger(tmp_path):
    from enpire import status

    board = Blackboard(tmp_path / "bb")
    board.append("tokens", TokenRecord("agent-0", "m", 1.0, 1000, 0, 200))
    board.append("cli_runs", CLIRunRecord("agent-0", "claude-code", 2.0, 0, True, 5.0, "s1", 0.0123, 1000, 200))
    board.append("tokens", TokenRecord("agent-1", "m", 1.0, 500, 0, 50))
    board.append("cli_runs", CLIRunRecord("agent-1", "codex", 2.0, 0, True, 5.0, "t1", None, 500, 50))
    s = status._collect(board, 0.0)
    assert s["token_ledger"]["agents"]["agent-0"]["cli_cost_usd"] == 0.0123
    text = status.render(s)
    assert "agent-0: 1,200 tokens (its CLI counted 1,200, $0.0123 in 1 runs)" in text
    assert "agent-1: 550 tokens (its CLI counted 550 in 1 runs)" in text


def test_missing_node_or_cli_fails_at_start_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(CLIConfigError, match=r"needs Node.js >= 20 and npm .*npm ci --prefix cli"):
        cli_binary("claude-code")
    with pytest.raises(CLIConfigError, match="command is empty"):
        cli_binary("command", "  ")
    with pytest.raises(CLIConfigError, match="'kimi' is not on PATH"):
        cli_binary("command", "kimi --prompt {prompt}")
    monkeypatch.delenv("ENPIRE_TEST_MODEL_KEY")
    monkeypatch.setattr("enpire.agents.cli_backend.cli_binary", lambda kind, command="": [])
    monkeypatch.setattr("enpire.isolation.check", lambda: None)
    with pytest.raises(CLIConfigError, match=r"\$ENPIRE_TEST_MODEL_KEY is not set"):
        make_agent("codex", "http://127.0.0.1:9")
    assert os.environ.get("ENPIRE_TEST_MODEL_KEY") is None


@pytest.mark.parametrize("kind", BOTH)
async def test_killed_hung_and_failing_runs_are_restarted_with_backoff(tmp_path, kind):
    require(kind)
    tools = FakeTools(tmp_path)
    steps = Steps([
        lambda ex: Reply(calls=shell(kind, "kill -9 $PPID")),  # the CLI dies mid-run
        lambda ex: Reply(text="thinking...", delay_s=600),  # it hangs past its turn's time
        lambda ex: Reply(calls=shell(kind, "kill -TERM $PPID")),  # the CLI is told to stop: exits non-zero
        lambda ex: Reply(text="All good now."),
    ], main_tool=MAIN_TOOL[kind])
    with ScriptedModel(PROVIDER[kind], steps) as model:
        # A run took 3-18 s here at load 8 on 2 cores: the turn's limit leaves a slower CI machine room.
        agent = make_agent(kind, model.url, max_turns=4, turn_timeout_s=60)
        with trio.fail_after(420):
            await agent.run(tools)
    reasons = [o.reason for o in agent.outcomes]
    assert [o.ok for o in agent.outcomes] == [False, False, False, True], reasons
    assert agent.outcomes[0].exit_code != 0 and "exit" in reasons[0]
    assert "no result within 60 s" in reasons[1] and agent.outcomes[1].seconds < 120
    assert agent.outcomes[2].exit_code not in (0, None) and agent.outcomes[2].seconds < 60  # not its time limit
    assert agent.backoffs == [0.2, 0.4, 0.8]  # doubling from [agents] backoff
    assert not model.errors


@pytest.mark.parametrize("kind", ["claude-code", "codex"])
async def test_a_session_the_cli_never_saved_is_replaced_not_retried(tmp_path, kind):
    """A run killed before the CLI wrote its transcript leaves an id no resume can find; the next run starts anew."""
    require(kind)
    tools = FakeTools(tmp_path)
    run_dir = tools.workspace.path.parent / "cli" / tools.agent / "run"
    run_dir.mkdir(parents=True)
    lost = "2b38f2f0-3fa2-4322-9e77-ee49da50d702"
    (run_dir / "session.json").write_text(json.dumps({"session": lost, "turns": 1}))
    steps = Steps([lambda ex: Reply(text="Fresh start.")], main_tool=MAIN_TOOL[kind])
    with ScriptedModel(PROVIDER[kind], steps) as model:
        agent = make_agent(kind, model.url, max_turns=1, turn_timeout_s=60)
        with trio.fail_after(200):
            await agent.run(tools)
    assert [o.ok for o in agent.outcomes] == [True], [o.reason for o in agent.outcomes]
    assert agent.backoffs == [] and len(model.log) == 1
    saved = json.loads((run_dir / "session.json").read_text())["session"]
    assert saved and saved != lost


async def test_any_mcp_capable_cli_through_the_command_template(tmp_path, monkeypatch):
    """`backend = "command"`: here Claude Code stands in for another CLI, started only by the template."""
    require("claude-code")
    from enpire.agents.cli_backend import CLI_DIR

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-the-real-model-key")
    tools = FakeTools(tmp_path)
    claude = (CLI_DIR / ".bin" / "claude").resolve()
    template = ("env ANTHROPIC_BASE_URL={base_url} IS_SANDBOX=1 ENABLE_TOOL_SEARCH=false "
                f"{claude} -p {{prompt}} --model {{model}} --output-format stream-json --verbose "
                "--mcp-config {mcp_config} --strict-mcp-config --permission-mode bypassPermissions")
    steps = Steps([
        lambda ex: Reply(calls=shell("claude-code", "printf 'class Policy: pass\\n' > policy.py && "
                                                    "git commit -qam 'from a generic CLI' && pwd")),
        lambda ex: Reply(calls=((ex.tool("echo"), {"n": 7}),)),
        lambda ex: Reply(text="Done."),
    ], main_tool="Bash")
    with ScriptedModel("anthropic", steps) as model:
        settings = CLISettings("command", model=MODEL["claude-code"], base_url=model.url,
                               api_key_env="ANTHROPIC_API_KEY", command=template, max_turns=1, turn_timeout_s=120)
        agent = CLIAgent(settings, open_session=_session, registry=Registry(), card_text="card",
                         protocol="protocol", task=TASK)
        with trio.fail_after(200):
            await agent.run(tools)
    assert not model.errors and agent.outcomes[0].ok, agent.outcomes
    assert "cli/agent-0/worktree" in steps.seen[1].results[0], steps.seen[1].results  # the run's cwd
    assert "echo 7" in steps.seen[2].results[0] and "published" in steps.seen[2].results[0]
    assert tools.workspace.read(tools.workspace.head("agent/agent-0"))["policy.py"] == "class Policy: pass\n"
    records = tools.board.values("tokens", TokenRecord)
    assert [(r.input_tokens, r.output_tokens) for r in records] == [(e.usage.input_tokens, e.usage.output_tokens)
                                                                     for e in model.log]
    assert all(e.headers["x-api-key"] == "sk-the-real-model-key" for e in model.log)


def _command_agent(tmp_path, script: str, **kw) -> CLIAgent:
    """A `command` backend whose CLI is a shell script: what a jail can print, not what a CLI would."""
    path = tmp_path / "cli-bin" / "hostile.sh"
    path.parent.mkdir()
    path.write_text(script)
    settings = CLISettings("command", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="ENPIRE_TEST_MODEL_KEY",
                           command=f"/bin/sh {path}", backoff_initial_s=0.2, **kw)
    return CLIAgent(settings, open_session=_session, registry=Registry(), card_text="card", protocol="protocol",
                    task=TASK)


async def test_what_a_jail_prints_is_read_in_bounded_pieces_and_kept_up_to_a_cap(tmp_path, monkeypatch):
    """A 3 MB line with no end is read in pieces of LINE_MAX (none parses, none is held whole), the transcript
    keeps at most TRANSCRIPT_MAX (plus the piece that crossed it), and the result line after them counts."""
    from enpire.agents import cli_backend

    monkeypatch.setattr(cli_backend, "LINE_MAX", 1 << 20)
    monkeypatch.setattr(cli_backend, "TRANSCRIPT_MAX", 2 << 20)
    fed = []
    real_feed = cli_backend.Run.feed
    monkeypatch.setattr(cli_backend.Run, "feed", lambda self, kind, line: fed.append(len(line)) or real_feed(self, kind, line))
    tools = FakeTools(tmp_path)
    agent = _command_agent(tmp_path, "head -c 3000000 /dev/zero | tr '\\0' x; echo\n"
                           "printf '%s\\n' '{\"type\":\"result\",\"session_id\":\"s-ok\",\"usage\":{\"output_tokens\":5}}'\n",
                           max_turns=1, turn_timeout_s=60)
    with trio.fail_after(120):
        await agent.run(tools)
    assert [o.ok for o in agent.outcomes] == [True], agent.outcomes
    assert max(fed) <= 1 << 20 and sum(fed) > 3_000_000  # everything read, in pieces
    assert agent.outcomes[0].run.session == "s-ok" and agent.outcomes[0].run.usage == (0, 5)
    transcript = tmp_path / "cli" / "agent-0" / "logs" / "turn-00000.jsonl"
    assert 2 << 20 <= transcript.stat().st_size <= 3 << 20


async def test_a_turn_stops_when_the_disk_reaches_its_reserve(tmp_path, monkeypatch):
    """The agent's folders are host files: a turn stops at once when the disk under them is down to the
    reserve the fleet's records need (here: a reserve above what is free)."""
    from enpire import workspace

    tools = FakeTools(tmp_path)
    monkeypatch.setattr(workspace, "DISK_RESERVE", shutil.disk_usage(tmp_path).free + (1 << 30))
    agent = _command_agent(tmp_path, "sleep 60\n", max_turns=1, turn_timeout_s=120)
    with trio.fail_after(60):
        await agent.run(tools)
    assert [o.ok for o in agent.outcomes] == [False] and "disk is down to its last" in agent.outcomes[0].reason
    assert agent.outcomes[0].seconds < 20


async def test_a_link_the_agent_left_in_its_home_does_not_stop_the_next_turn(tmp_path):
    tools = FakeTools(tmp_path)
    home = tmp_path / "cli" / "agent-0" / "home"
    home.mkdir(parents=True)
    (home / ".codex").symlink_to(tmp_path / "nowhere")  # dangling: mkdir(exist_ok=True) alone raises
    agent = _command_agent(tmp_path, "true\n", max_turns=1, turn_timeout_s=60)
    with trio.fail_after(60):
        await agent.run(tools)
    assert [o.ok for o in agent.outcomes] == [True] and (home / ".codex").is_dir()
    assert not (tmp_path / "nowhere").exists()


async def test_the_token_budget_stops_the_run_at_the_refused_call(tmp_path):
    require("claude-code")
    tools = FakeTools(tmp_path)
    steps = Steps([lambda ex: Reply(calls=shell("claude-code", "echo one")),
                   lambda ex: Reply(calls=shell("claude-code", "echo two"))], main_tool="Bash")
    with ScriptedModel("anthropic", steps) as model:
        agent = make_agent("claude-code", model.url, token_budget=20_000)  # the first call spends more
        with trio.fail_after(120):
            await agent.run(tools)
    assert len(model.log) == 1  # the second call never reached the model
    assert "token budget exhausted" in agent.outcomes[0].reason and len(agent.outcomes) == 1
    assert any("budget exhausted" in f["hypothesis"] for f in tools.findings)
    spent = sum(r.input_tokens + r.output_tokens for r in tools.board.values("tokens", TokenRecord))
    assert spent == model.log[0].usage.input_tokens + model.log[0].usage.output_tokens > 20_000


async def test_the_wall_budget_stops_a_run_and_the_agent(tmp_path):
    require("claude-code")
    tools = FakeTools(tmp_path)
    steps = Steps([lambda ex: Reply(text="thinking...", delay_s=600)], main_tool="Bash")
    with ScriptedModel("anthropic", steps) as model:
        agent = make_agent("claude-code", model.url, wall_budget_s=8.0)
        started = trio.current_time()
        with trio.fail_after(120):
            await agent.run(tools)
        took = trio.current_time() - started
    assert "no result within 8 s" in agent.outcomes[0].reason and took < 60
    assert any(f["hypothesis"].startswith("budget exhausted") and "wall-time budget exhausted" in f["evidence"]
               for f in tools.findings)


def test_a_command_template_that_does_not_parse_is_refused_in_one_line():
    with pytest.raises(CLIConfigError, match=r"\[agents\] command .* is not a valid argv template: No closing quotation"):
        cli_binary("command", "sh -c 'oops")
