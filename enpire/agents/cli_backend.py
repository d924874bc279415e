"""CLI coding agents (Claude Code, Codex, any MCP-capable CLI) as fleet agents: the paper's set-up.

Each agent works headless in its own worktree (`enpire.agents.worktree`), inside the isolation engine's
jail, and reaches the fleet through an MCP server it spawns itself (`enpire.agents.mcp_server`) whose
calls the daemon runs in the agent's session (`enpire.agents.tool_gateway`). Its model calls go through
the daemon's metering relay (`enpire.agents.model_relay`): the ledger gets every call's usage as the
provider reported it, the CLI holds a relay token instead of a key, and a call past the token budget is
refused. One research turn is one headless run of the CLI, resumed across turns so the agent keeps its
context; a run that hangs past its time, crashes or exits non-zero is stopped and started again with
backoff, and the fleet goes on.

What the jail holds: the worktree and the agent's home (its scratch folder, where the CLI keeps its
sessions) writable; the Python environment, the fleet's packages, the pinned CLIs and the two per-agent
sockets read-only; a private /tmp; no network but loopback; an environment of its own (no key of the
fleet, no secret). The CLIs' own sandboxes are turned off inside it (see README: the jail's seccomp
filter refuses the new namespaces they would need, and one tested boundary beats two half-working ones).
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
import trio

from bus.backoff import backoff_delay
from bus.records import CLIRunRecord, TokenRecord
from enpire import isolation, ledger, workspace
from enpire.agents import budget
from enpire.agents.model import LLMConfigError
from enpire.agents.model_relay import CallUsage, ModelRelay
from enpire.agents.worktree import Worktree, WorktreeError
from enpire.untrusted_json import finite, json_object, typed_get
from enpire.workspace import ProtectedPathError, WorkspaceError

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository (editable install)
PACKAGES = ("enpire", "actors", "bus", "hw")  # what the jail's Python imports (read-only)
CLI_DIR = ROOT / "cli" / "node_modules"
Kind = Literal["claude-code", "codex", "command"]


CLI_KINDS = ("claude-code", "codex", "command")


class CLIConfigError(LLMConfigError):
    """A CLI backend cannot start here; one line saying what to install or set (the daemon exits 2)."""


@dataclass(frozen=True)
class CLISettings:
    kind: Kind
    model: str = ""
    base_url: str = ""  # the real endpoint; the CLI itself only sees the relay
    api_key_env: str = ""  # the daemon's variable holding the real key ("" = the provider's usual one)
    command: str = ""  # kind "command": argv template ({prompt} {mcp_config} {workdir} {model} {base_url})
    token_budget: int = 0
    wall_budget_s: float = 0.0
    turn_timeout_s: float = 1800.0  # one headless run; past it the CLI is stopped
    max_turns: int = 0  # 0 = until the budgets end
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 120.0
    memory_mb: int = 4096
    pids: int = 1024  # CLIs are multi-threaded (node, tokio); threads count
    scratch_mb: int = 512
    target: float = 0.0
    price: ledger.Price | None = None  # this model's prices: the ledger records each call's cost


DEFAULTS = {  # provider of each CLI: default key variable and endpoint
    "claude-code": ("ANTHROPIC_API_KEY", "https://api.anthropic.com"),
    "codex": ("OPENAI_API_KEY", "https://api.openai.com/v1"),
    "command": ("", ""),
}


def cli_binary(kind: Kind, command: str = "") -> list[str]:
    """The CLI's argv prefix; CLIConfigError (one line) when it is not installed."""
    if kind == "command":
        if not command.strip():
            raise CLIConfigError("[agents] command is empty: give the CLI's argv template, e.g. "
                                 "'kimi --print --mcp-config-file {mcp_config} --work-dir {workdir} {prompt}'")
        try:
            exe = shlex.split(command)[0]
        except ValueError as e:  # e.g. an unbalanced quote
            raise CLIConfigError(f"[agents] command {command!r} is not a valid argv template: {e}") from None
        if shutil.which(exe) is None and not Path(exe).is_file():
            raise CLIConfigError(f"[agents] command: {exe!r} is not on PATH")
        return []
    name = {"claude-code": "claude", "codex": "codex"}[kind]
    if shutil.which("node") is None:
        raise CLIConfigError(f"backend {kind!r} needs Node.js >= 20 and npm (apt-get install nodejs npm), then "
                             "`npm ci --prefix cli` (bash .ci/run does it)")
    path = CLI_DIR / ".bin" / name
    if not path.exists():
        raise CLIConfigError(f"backend {kind!r}: {path} is missing: run `npm ci --prefix cli` (bash .ci/run does it)")
    return [str(path)]


# ----------------------------------------------------------------------------- what the agent reads


def agents_md(agent: str, card_text: str, protocol: str, tools: list[tuple[str, str]], task: dict) -> str:
    listing = "\n".join(f"- `{name}`: {description}" for name, description in tools)
    return f"""# You are {agent}, a member of a team improving a robot policy

The fleet runs your policy on real simulated robot cells; its verifier alone decides success.

## Task
{card_text}

## Policy protocol
{protocol}

## Your worktree
This folder is a git repository of your workspace branch. Edit `policy.py` (and helper modules next
to it), then `git add` and `git commit`: the fleet takes your latest commit when you next call one of
its tools (evaluate, promote, ...). `recipes/` holds a copy of the training recipes.

Local check on tuning seeds (the simulator and the verifier, as the fleet's offline evaluation):

    python -m enpire.agents.local_check --episodes 10        # policy.py, random tuning seeds
    python -m enpire.agents.local_check --params '{{"gain": 2}}' --seeds {task['tuning_start']}:{task['tuning_start'] + 20}

## Fleet tools (MCP server `enpire`)
{listing}

## Rules
- Held-out seeds are never visible to you; promotion is judged on them by the fleet, which draws them
  in a secret order from billions of seeds outside the tuning range. Only tuning seeds run locally.
- Commits that touch protected paths (verifier, reset, eval, seeds, safety, limits) are refused.
- You may write only inside this folder and your home; there is no network but your model.
- Every model call counts against your token budget; be brief and let the robots work.
"""


def briefing(tools, used: int, budget: int, elapsed: float, wall: float) -> str:
    champion = tools.champion()
    parts = [f"Tokens used: {used}" + (f" of {budget}" if budget else "") + f"; {elapsed:.0f} s"
             + (f" of {wall:.0f} s" if wall else "")]
    if champion is not None:
        parts.append(f"Champion: commit {champion.policy.commit[:12]} judged {champion.judged_successes}/"
                     f"{champion.judged_n} on held-out seeds.")
    else:
        parts.append("No champion yet.")
    digest = tools.digest()
    if digest is not None:
        parts.append("Team digest:\n" + digest.text[:2000])
    return "\n".join(parts)


FIRST_PROMPT = ("Read AGENTS.md. Improve the policy: write or edit policy.py, check it locally on tuning seeds, "
                "commit, evaluate it on the fleet with the enpire tools, look at failures, iterate, and promote "
                "a candidate that beats the champion.")
NEXT_PROMPT = "Continue improving the policy (AGENTS.md has the rules).\n\n"


# What one turn may cost the daemon's disk and memory, whatever the jail prints or writes: the CLI's lines
# are read in pieces of at most LINE_MAX, kept in the transcript up to TRANSCRIPT_MAX, and a turn stops
# when the disk under the agent's folders has only workspace.DISK_RESERVE left (its files are host files;
# the jail's RLIMIT_FSIZE caps each one, not their sum).
LINE_MAX = 32 << 20
SESSION_MAX = 200  # a session id (a UUID) goes on the ledger and the next command line
TRANSCRIPT_MAX = 64 << 20


def _tail(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read()


# ----------------------------------------------------------------------------- the CLIs


@dataclass
class Run:
    """What one headless run reported (parsed from its JSON lines)."""

    session: str = ""
    result: dict[str, Any] | None = None
    error: str = ""
    lines: int = 0
    replies: int = 0  # model replies seen in this run; 0 on a resume means the session never got going
    on_failed: Callable[[str, str, str], None] | None = None  # (tool, input, error) of a failed tool call
    calls: dict[str, tuple[str, str]] = field(default_factory=dict)  # Claude Code: tool_use id -> (name, input)

    def _failed(self, tool: str, given: str, error: str) -> None:
        if self.on_failed is not None:
            self.on_failed(tool, given[:300], " ".join(error.split())[:300])

    def feed(self, kind: Kind, line: str) -> None:
        """Take one line of the CLI's output. It comes out of the jail: a line that is not JSON, or a
        value of the wrong type in it, is skipped, never a crash of the daemon's reader."""
        event = json_object(line)
        if event is None:
            return
        self.lines += 1
        t = typed_get(event, "type", str, "")
        if kind in ("claude-code", "command"):  # a template CLI may print Claude Code's stream-json too
            self.session = typed_get(event, "session_id", str, "")[:SESSION_MAX] or self.session
            if t == "assistant":
                self.replies += 1
            if t == "result":
                self.result = event
                if event.get("is_error"):
                    self.error = str(event.get("result") or event.get("subtype"))[:300]
            for block in typed_get(typed_get(event, "message", dict, {}), "content", list, []):
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "tool_use":
                    self.calls[str(block.get("id", ""))] = (str(block.get("name", "")),
                                                            json.dumps(block.get("input"))[:300])
                elif block.get("type") == "tool_result" and block.get("is_error"):
                    name, given = self.calls.get(str(block.get("tool_use_id", "")), ("?", ""))
                    content = block.get("content")
                    if isinstance(content, list):
                        content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
                    self._failed(name, given, content if isinstance(content, str) else "")
        elif kind == "codex":
            if t == "thread.started":
                self.session = typed_get(event, "thread_id", str, "")[:SESSION_MAX]
            elif t == "turn.completed":
                self.result = event
            elif t == "item.completed":
                self.replies += 1
                item = typed_get(event, "item", dict, {})
                if item.get("type") == "command_execution" and item.get("exit_code") not in (0, None):
                    self._failed("shell", str(item.get("command", "")), str(item.get("aggregated_output", "")))
            elif t in ("turn.failed", "error") and not self.result:
                self.error = str(event.get("error") or event.get("message"))[:300]

    @property
    def usage(self) -> tuple[int, int]:
        """(input, output) tokens of this run as the CLI reported them, input counting cached input and
        cache writes (Claude Code's result reports them apart; Codex's turn.completed counts them in)."""
        usage = typed_get(self.result or {}, "usage", dict, {})
        n = {key: typed_get(usage, key, int, 0) for key in
             ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")}
        n = {key: value if 0 <= value < 1 << 48 else 0 for key, value in n.items()}  # a record holds int64
        return (ledger.anthropic_input(n["input_tokens"], n["cache_read_input_tokens"], n["cache_creation_input_tokens"]),
                n["output_tokens"])

    @property
    def cost(self) -> float | None:
        """The run's cost as the CLI itself reported it (None: it reports none, as Codex never does)."""
        return finite((self.result or {}).get("total_cost_usd"))


# Which end-of-run figures of each CLI cover its session so far (a resumed session carries them on) rather
# than the run: measured with the pinned versions (tests/test_cli_backend.py checks both against the ledger).
SESSION_FIGURES = {"claude-code": {"cost"}, "codex": {"tokens"}, "command": set()}


def run_share(kind: Kind, cost: float | None, tokens: tuple[int, int], earlier: list[CLIRunRecord]
              ) -> tuple[float | None, tuple[int, int]]:
    """This run's share of what the CLI reported, given the records of the session's earlier runs."""
    if "cost" in SESSION_FIGURES[kind] and cost is not None:
        cost = max(0.0, cost - sum(r.cost_usd or 0.0 for r in earlier))
    if "tokens" in SESSION_FIGURES[kind] and any(tokens):
        tokens = (max(0, tokens[0] - sum(r.input_tokens for r in earlier)),
                  max(0, tokens[1] - sum(r.output_tokens for r in earlier)))
    return cost, tokens


def mcp_server_spec(socket_path: Path, token: str) -> dict[str, Any]:
    return {"command": sys.executable, "args": ["-m", "enpire.agents.mcp_server"],
            "env": {"ENPIRE_TOOLS_SOCKET": str(socket_path), "ENPIRE_TOOLS_TOKEN": token}}


def cli_argv(s: CLISettings, prefix: list[str], *, prompt: str, session: str, resume: bool, workdir: Path,
             mcp_config: Path, server: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of one headless run ({relay_port} is filled in inside the jail)."""
    if s.kind == "claude-code":
        argv = [*prefix, "-p", prompt, "--output-format", "stream-json", "--verbose",
                "--mcp-config", str(mcp_config), "--strict-mcp-config", "--permission-mode", "bypassPermissions"]
        argv += ["--resume", session] if resume else ["--session-id", session]
        if s.model:
            argv += ["--model", s.model]
        env = {"ANTHROPIC_BASE_URL": "http://127.0.0.1:{relay_port}", "IS_SANDBOX": "1",  # we are its sandbox
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
               "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "MCP_TOOL_TIMEOUT": "3600000",
               "MCP_TIMEOUT": "60000", "ENABLE_TOOL_SEARCH": "false"}
        return argv, env
    if s.kind == "codex":
        provider = ('{name="enpire", base_url="http://127.0.0.1:{relay_port}", env_key="ENPIRE_MODEL_KEY", '
                    'wire_api="responses"}')
        config = ["-c", "model_provider=enpire", "-c", f"model_providers.enpire={provider}",
                  "-c", f"mcp_servers.enpire.command={json.dumps(server['command'])}",
                  "-c", f"mcp_servers.enpire.args={json.dumps(server['args'])}",
                  "-c", "mcp_servers.enpire.env={" + ", ".join(f"{k}={json.dumps(v)}" for k, v in
                                                               server["env"].items()) + "}",
                  "-c", "mcp_servers.enpire.tool_timeout_sec=3600", "-c", "mcp_servers.enpire.required=true",
                  "-c", "mcp_servers.enpire.startup_timeout_sec=60",
                  "-c", "analytics.enabled=false", "-c", "check_for_update_on_startup=false"]
        flags = ["--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", *config]
        if s.model:
            flags += ["-m", s.model]
        argv = [*prefix, "exec", "resume", session, *flags, prompt] if resume else [*prefix, "exec", *flags, prompt]
        return argv, {}
    values = {"prompt": prompt, "mcp_config": str(mcp_config), "workdir": str(workdir), "model": s.model,
              "base_url": "http://127.0.0.1:{relay_port}"}  # the relay: it prefixes the real base_url's path
    return [part.format_map(_Keep(values)) for part in shlex.split(s.command)], {}


class _Keep(dict):
    def __missing__(self, key: str) -> str:  # leaves {relay_port} for the jail to fill in
        return "{" + key + "}"


# ----------------------------------------------------------------------------- the backend


@dataclass
class TurnOutcome:
    ok: bool
    reason: str
    exit_code: int | None
    seconds: float
    run: Run
    session_lost: bool = False  # a resume found no saved conversation for the session


@dataclass
class CLIAgent:
    """A backend (`async run(tools)`) that drives a CLI coding agent through research turns."""

    settings: CLISettings
    open_session: Callable[[Any], Any]  # tools -> async context manager of the agent's tool session
    registry: Any
    card_text: str
    protocol: str
    task: dict[str, Any]  # name, driver, tuning seeds, max_delta (what local_check needs)
    secret_values: tuple[str, ...] = ()
    clock: Callable[[], float] = time.time
    turns: int = 0
    outcomes: list[TurnOutcome] = field(default_factory=list)
    backoffs: list[float] = field(default_factory=list)  # seconds slept before each restart

    def __post_init__(self) -> None:
        self.prefix = cli_binary(self.settings.kind, self.settings.command)
        reason = isolation.check()
        if reason:
            raise CLIConfigError(f"backend {self.settings.kind!r} runs the CLI in the isolation engine: {reason}")
        key_env = self.settings.api_key_env or DEFAULTS[self.settings.kind][0]
        if not key_env:
            raise CLIConfigError("[agents] api_key_env is empty: name the variable holding the model key")
        self.key_env = key_env
        self.key = os.environ.get(key_env, "")
        if not self.key:
            raise CLIConfigError(f"[agents] api_key_env: ${key_env} is not set (the CLI's model key)")
        self.base_url = self.settings.base_url or DEFAULTS[self.settings.kind][1]
        if not self.base_url:
            raise CLIConfigError("[agents] base_url is empty: the 'command' backend needs the model endpoint")

    # ------------------------------------------------------------------ setup

    def _dirs(self, tools) -> tuple[Path, Path, Path]:
        root = tools.workspace.path.parent / "cli" / tools.agent
        for d in (root / "worktree", root / "home", root / "run", root / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(root / "run", 0o700)
        return root / "worktree", root / "home", root / "run"

    def _docs(self, tools) -> dict[str, str]:
        listing = [(t.name, t.description) for t in self.registry]
        text = agents_md(tools.agent, self.card_text, self.protocol, listing, self.task)
        return {"AGENTS.md": text, "CLAUDE.md": text}

    def _prepare(self, tools, worktree: Worktree) -> None:
        if (worktree.path / ".git").is_dir():
            worktree.write_docs(self._docs(tools), self.task)  # a restart: the agent's work stays
            return
        ws = tools.workspace
        base = ws.head(tools.branch) or ws.head("main")
        worktree.create(ws.read_bytes(base), base, self._docs(tools), self.task)

    def _jail(self, worktree: Path, home: Path, run_dir: Path, env: dict[str, str]) -> isolation.Jail:
        read_only = [*isolation.python_paths(), *(ROOT / p for p in PACKAGES), run_dir]
        if self.settings.kind != "command":
            read_only.append(CLI_DIR)
        else:  # the template's programs (outside the system folders the jail always has), read-only
            for word in shlex.split(self.settings.command):
                exe = shutil.which(word) if "/" not in word else (word if Path(word).is_file() else None)
                if exe and not exe.startswith(("/usr/", "/bin/", "/sbin/")):
                    read_only.append(Path(exe).resolve().parent)
        return isolation.Jail(read_only=tuple(read_only), writable=(worktree, home), network=False,
                              scratch_mb=self.settings.scratch_mb, memory_mb=self.settings.memory_mb,
                              pids=self.settings.pids, cpu_seconds=max(60, int(self.settings.turn_timeout_s) * 4),
                              env=env, cwd=worktree)

    # ------------------------------------------------------------------ the loop

    async def run(self, tools) -> None:
        log = structlog.get_logger().bind(actor=tools.agent, backend=self.settings.kind)
        worktree_dir, home, run_dir = self._dirs(tools)
        worktree = Worktree(worktree_dir, tools.agent)
        await trio.to_thread.run_sync(self._prepare, tools, worktree)
        (run_dir / "task.json").write_text(json.dumps(self.task))  # the local check's, read-only in the jail
        own = [r for r in tools.board.values("tokens", TokenRecord) if r.agent == tools.agent]
        self.used = ledger.totals(own).total
        started = min((r.t for r in own), default=self.clock())
        self.over_budget = False
        relay_token, tools_token = pysecrets.token_urlsafe(24), pysecrets.token_urlsafe(24)

        loop = trio.lowlevel.current_trio_token()

        def record(u: CallUsage) -> None:  # on the relay's thread
            self.used += u.total
            tools.record_tokens_from_thread(u.ledger_record(tools.agent, u.model, self.clock(), self.settings.price), loop)

        def allow() -> str | None:
            if self.settings.token_budget and self.used >= self.settings.token_budget:
                self.over_budget = True
                return f"token budget exhausted ({self.used} of {self.settings.token_budget} tokens)"
            return None

        def refused(reason: str) -> None:
            log.warning("cli_model_call_refused", reason=reason)

        relay = ModelRelay(run_dir / "model.sock", self.base_url, token=relay_token, key=self.key,
                           record=record, allow=allow, on_refusal=refused).start()
        try:
            async with self.open_session(tools) as session, trio.open_nursery() as nursery:
                from enpire.agents.tool_gateway import ToolGateway

                gateway = ToolGateway(run_dir / "tools.sock", tools_token, tools.agent, self.registry, session,
                                      before_call=lambda name, args: self._publish(tools, worktree, log, args))
                await nursery.start(gateway.serve)
                server = mcp_server_spec(run_dir / "tools.sock", tools_token)
                mcp_config = run_dir / "mcp.json"
                mcp_config.write_text(json.dumps({"mcpServers": {"enpire": dict(server, type="stdio")}}))
                await self._loop(tools, log, worktree, home, run_dir, relay_token, server, mcp_config, started)
                nursery.cancel_scope.cancel()
        finally:
            relay.close()

    async def _loop(self, tools, log, worktree, home, run_dir, relay_token, server, mcp_config, started) -> None:
        s = self.settings
        state_file = run_dir / "session.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        failures = 0
        while True:
            elapsed = self.clock() - started
            reason = budget.exhausted(s.token_budget, s.wall_budget_s, self.used, elapsed)
            if not reason and s.max_turns and self.turns >= s.max_turns:
                reason = f"{self.turns} turns done (max_turns)"
            if reason:
                await budget.stop(tools, log, reason, self.used, elapsed)
                return
            if budget.team_goal_met(tools, s.target):
                await tools.champion_changed(timeout=60.0)  # until confirmation disagrees (or a new champion)
                continue
            resume = bool(state.get("session")) and s.kind != "command"
            session = state.get("session") or (str(uuid.uuid4()) if s.kind == "claude-code" else "")
            prompt = (NEXT_PROMPT + briefing(tools, self.used, s.token_budget, elapsed, s.wall_budget_s)
                      if state.get("turns") else FIRST_PROMPT)
            limit = s.turn_timeout_s
            if s.wall_budget_s:
                limit = max(1.0, min(limit, s.wall_budget_s - elapsed))
            outcome = await self._turn(tools, log, worktree, home, run_dir, relay_token, server, mcp_config,
                                       prompt=prompt, session=session, resume=resume, limit=limit)
            if resume and outcome.session_lost:
                # A run killed before the CLI saved its transcript leaves a session that can never be
                # resumed ("No conversation found"): start a new one at once; this was not a research turn.
                log.warning("cli_session_lost", session=session, reason=outcome.reason)
                state.pop("session", None)
                state_file.write_text(json.dumps(state))
                continue
            self.turns += 1
            self.outcomes.append(outcome)
            if outcome.run.session:
                state["session"] = outcome.run.session
            if outcome.ok:
                failures = 0
                state["turns"] = state.get("turns", 0) + 1
            else:
                failures += 1
                delay = backoff_delay(failures, s.backoff_initial_s, s.backoff_max_s)
                log.warning("cli_restart", reason=outcome.reason, failures=failures, backoff_s=delay)
                self.backoffs.append(delay)
                state_file.write_text(json.dumps(state))
                await trio.sleep(delay)
                continue
            state_file.write_text(json.dumps(state))

    async def _turn(self, tools, log, worktree, home, run_dir, relay_token, server, mcp_config, *, prompt: str,
                    session: str, resume: bool, limit: float) -> TurnOutcome:
        s = self.settings
        argv, extra = cli_argv(s, self.prefix, prompt=prompt, session=session, resume=resume,
                               workdir=worktree.path, mcp_config=mcp_config, server=server)
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
               "TMPDIR": "/tmp", "LANG": "C.UTF-8", "TERM": "dumb", "CODEX_HOME": str(home / ".codex"),
               "GIT_AUTHOR_NAME": tools.agent, "GIT_AUTHOR_EMAIL": f"{tools.agent}@enpire",
               "GIT_COMMITTER_NAME": tools.agent, "GIT_COMMITTER_EMAIL": f"{tools.agent}@enpire",
               "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1", "ENPIRE_TASK_FILE": str(run_dir / "task.json")}
        # The CLI's key variable holds the relay token: the relay swaps in the real key on the way out.
        env[{"claude-code": "ANTHROPIC_API_KEY", "codex": "ENPIRE_MODEL_KEY"}.get(s.kind, self.key_env)] = relay_token
        url_env = [f"{k}={v}" for k, v in extra.items() if "{relay_port}" in v]
        env.update({k: v for k, v in extra.items() if "{relay_port}" not in v})
        if s.kind == "command" and "{base_url}" not in s.command:
            url_env.append("OPENAI_BASE_URL=http://127.0.0.1:{relay_port}")
        codex_home = home / ".codex"
        if codex_home.is_symlink() or (codex_home.exists() and not codex_home.is_dir()):
            codex_home.unlink()  # the agent's home is its own: a link or file here must not stop the turn
        codex_home.mkdir(exist_ok=True)
        inner = [sys.executable, "-m", "enpire.agents.jail_init", "--model-socket", str(run_dir / "model.sock"),
                 *(f"--url-env={u}" for u in url_env), "--", *argv]
        jailed = isolation.wrap(self._jail(worktree.path, home, run_dir, env), inner)
        number = len(list((run_dir.parent / "logs").glob("turn-*.stderr")))
        stderr_path = run_dir.parent / "logs" / f"turn-{number:05d}.stderr"
        transcript = run_dir.parent / "logs" / f"turn-{number:05d}.jsonl"  # the CLI's own JSON lines
        # Every tool call the jail turned down (a path it cannot see or write, a refused check) fails inside the
        # CLI; the daemon logs each failed call with the agent's name as the CLI reports it.
        run = Run(session=session if s.kind == "claude-code" else "",
                  on_failed=lambda tool, given, error: log.warning("cli_tool_failed", tool=tool, input=given,
                                                                   error=error))
        log.info("cli_turn_started", turn=number, resume=resume, session=session, timeout_s=round(limit, 1))
        t0 = self.clock()
        reason, code = "", None
        procs: list[subprocess.Popen] = []
        done: dict[str, int] = {}
        starting = threading.Lock()  # a stop that comes before the start (a full disk) must not miss the process
        stopped = False

        def blocking() -> int:
            # bwrap --die-with-parent is PR_SET_PDEATHSIG: the jail dies with the *thread* that started it,
            # so one thread starts the CLI, reads its JSON lines and waits for it (trio's idle worker threads
            # end after 10 s, which would kill a run that outlives them).
            with open(stderr_path, "wb") as stderr, open(transcript, "ab") as out:
                # bwrap itself gets no environment of the daemon: the jail's init is a bwrap process, and a
                # jailed process can read /proc/1/environ (it would hold the fleet's keys and secret).
                with starting:
                    if stopped:
                        return -signal.SIGKILL
                    proc = subprocess.Popen(jailed, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
                    procs.append(proc)
                kept = 0
                # Bounded reads: a "line" with no end would otherwise be held whole (its pieces fail to parse).
                for line in iter(lambda: proc.stdout.readline(LINE_MAX), b""):
                    if kept < TRANSCRIPT_MAX:
                        out.write(line)
                        kept += len(line)
                    run.feed(self.settings.kind, line.decode(errors="replace"))
                return proc.wait()

        async def runner() -> None:
            done["code"] = await trio.to_thread.run_sync(blocking)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            try:
                deadline = trio.current_time() + limit
                while "code" not in done:
                    if self.over_budget:  # the relay refused a call: the run ends now, not when the CLI gives up
                        break
                    if trio.current_time() > deadline:
                        reason = f"no result within {limit:.0f} s: stopped"
                        break
                    if shutil.disk_usage(worktree.path).free < workspace.DISK_RESERVE:  # the fleet's records
                        reason = f"the disk is down to its last {workspace.DISK_RESERVE >> 20} MB: stopped"
                        log.error("cli_disk_reserve", free_mb=shutil.disk_usage(worktree.path).free >> 20)
                        break
                    await trio.sleep(0.1)
            finally:
                with starting:  # held only while a Popen runs
                    stopped = True
                    for proc in procs:
                        if proc.poll() is None:
                            proc.kill()  # the thread then sees the end of its output and returns
        code = done.get("code")
        if procs:
            await trio.to_thread.run_sync(isolation.release, procs[0].pid)
        seconds = self.clock() - t0
        if not reason:
            if self.over_budget:
                reason = "token budget exhausted: stopped"
            elif code != 0:
                stderr = _tail(stderr_path, 1 << 20).decode(errors="replace").split("Stack backtrace:")[0]
                tail = stderr[-300:].strip().replace("\n", " | ")
                reason = f"exit {code}: {tail}" if tail else f"exit {code}"
            elif run.error:
                reason = f"the CLI reported an error: {run.error}"
        ok = not reason
        lost = (not ok and run.replies == 0
                and any(m in f"{reason} {run.error}".lower() for m in ("no conversation found", "no rollout found")))
        log.info("cli_turn_finished", turn=number, ok=ok, reason=reason, exit_code=code, seconds=round(seconds, 2),
                 cli_cost_usd=run.cost, session=run.session,
                 cli_usage=run.usage)
        # The CLI's own figures go to the ledger beside the relay's per-call records (report.json shows both).
        await trio.to_thread.run_sync(self._record_run, tools, number, ok, seconds, run)
        return TurnOutcome(ok, reason, code, seconds, run, session_lost=lost)

    def _record_run(self, tools, number: int, ok: bool, seconds: float, run: Run) -> None:
        earlier = [r for r in tools.board.values("cli_runs", CLIRunRecord)
                   if r.agent == tools.agent and run.session and r.session == run.session]
        cost, tokens = run_share(self.settings.kind, run.cost, run.usage, earlier)
        tools.board.append("cli_runs", CLIRunRecord(tools.agent, self.settings.kind, self.clock(), number, ok,
                                                    round(seconds, 3), run.session, cost, *tokens))

    async def _publish(self, tools, worktree: Worktree, log, arguments: dict) -> str | None:
        """Before a fleet tool runs: the worktree's latest commit becomes a commit of the agent's branch."""
        try:
            done = await trio.to_thread.run_sync(worktree.publish, tools.workspace, tools.branch)
        except ProtectedPathError as e:
            log.warning("cli_commit_refused", reason=str(e))
            return f"NOT published (your branch is unchanged): {e}"
        except (WorktreeError, WorkspaceError) as e:
            log.warning("cli_commit_refused", reason=str(e))
            return f"NOT published (your branch is unchanged): {e}"
        commit = arguments.get("commit")
        if isinstance(commit, str) and commit:
            mapped = worktree.resolve(commit)
            if mapped:
                arguments["commit"] = mapped  # a worktree commit id names its published commit
        if done is None:
            return None
        log.info("cli_published", worktree_commit=done[0][:12], commit=done[1][:12])
        return f"published worktree commit {done[0][:12]} as fleet commit {done[1][:12]} (your branch head)"


def make_cli_backend(config, index: int) -> CLIAgent:
    """The CLI agent number `index` of a fleet run by `config` (the [agents] keys of the SDK backends)."""
    from enpire.agents.prompt import POLICY_PROTOCOL
    from enpire.agents.registry import REGISTRY, agent_session
    from enpire.tasks import card

    a, task = config.agents, config.task()
    price = a.prices.get(a.model)
    settings = CLISettings(
        kind=a.backend, model=a.model, base_url=a.base_url, api_key_env=a.api_key_env, command=a.command,
        token_budget=a.token_budget, wall_budget_s=a.wall_budget_minutes * 60, turn_timeout_s=a.turn_minutes * 60,
        max_turns=a.max_turns, target=config.fleet.target,
        price=ledger.Price(price.input, price.output, price.cached_input, price.cache_write) if price else None)
    tuning = task.tuning_seeds
    return CLIAgent(settings, open_session=lambda tools: agent_session(config, tools, index), registry=REGISTRY,
                    card_text=card(config.cells.task, config).render(), protocol=POLICY_PROTOCOL,
                    task={"name": config.cells.task, "driver": task.driver, "tuning_start": tuning.start,
                          "tuning_count": tuning.count, "max_delta": task.limits.max_delta})
