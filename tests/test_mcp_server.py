"""The MCP server of CLI agents, driven by the official MCP client over stdio, and its tool gateway."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import msgspec
import trio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from enpire.agents.mcp_server import request
from enpire.agents.tool_gateway import ToolGateway

# A 48x32 PNG (a red rectangle), as an episode frame would be: CLIs decode and resize what they receive.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000030000000200802000000dbb66c4b00000076494441545809cdc1310100000cc2b0"
    "d6bf68e680836b893c23cfc833f28c3c23cfc833f28c5461270ba9c24e1652859d2ca40a3b59481576b2902aec642155d8c942aab0"
    "93855461270ba9c24e1652859d2ca40a3b59481576b2902aec642155d8c942aab093853c23cfc833f28c3c23cfc833f2cc01da1c10"
    "21d5de94d00000000049454e44ae426082")


class EchoArgs(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    n: int
    text: str = ""


@dataclass(frozen=True)
class _Image:
    data: bytes
    media_type: str = "image/png"


@dataclass(frozen=True)
class _Result:
    text: str
    images: tuple = ()
    is_error: bool = False


@dataclass(frozen=True)
class _Tool:
    name: str
    description: str

    def schema(self) -> dict:
        return msgspec.json.schema(EchoArgs)["$defs"]["EchoArgs"]


class Registry:
    """The registry contract (iterable of tools, `call(session, name, arguments)`), recording who called."""

    def __init__(self):
        self.tools = [_Tool("echo", "Echo n back with a 1x1 image."), _Tool("fail", "Always refuses.")]
        self.sessions: list[str] = []

    def __iter__(self):
        return iter(self.tools)

    async def call(self, session, name, arguments) -> _Result:
        self.sessions.append(session)
        if name == "fail":
            return _Result("refused: no", is_error=True)
        args = msgspec.convert(arguments, EchoArgs)
        return _Result(f"echo {args.n} {args.text}", (_Image(PNG),))


async def test_mcp_server_lists_the_registry_and_returns_images(tmp_path):
    registry = Registry()
    published = []

    async def before(name, arguments):
        published.append(name)
        return "published note"

    gateway = ToolGateway(tmp_path / "tools.sock", "tok-1", "agent-7", registry, "session-of-agent-7", before)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        params = StdioServerParameters(command=sys.executable, args=["-m", "enpire.agents.mcp_server"],
                                       env={"ENPIRE_TOOLS_SOCKET": str(tmp_path / "tools.sock"),
                                            "ENPIRE_TOOLS_TOKEN": "tok-1", "PATH": "/usr/bin:/bin"})
        with trio.fail_after(60):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
                await client.initialize()
                listed = await client.list_tools()
                result = await client.call_tool("echo", {"n": 3, "text": "hi"})
                failed = await client.call_tool("fail", {})
        nursery.cancel_scope.cancel()
    assert [(t.name, t.description) for t in listed.tools] == [(t.name, t.description) for t in registry]
    assert listed.tools[0].input_schema == registry.tools[0].schema()
    assert result.is_error is False
    assert result.content[0].text == "published note\necho 3 hi"
    assert result.content[1].type == "image" and result.content[1].mime_type == "image/png"
    assert failed.is_error is True and "refused: no" in failed.content[0].text
    assert registry.sessions == ["session-of-agent-7"] * 2 and published == ["echo", "fail"]


async def test_gateway_refuses_a_wrong_token_and_binds_calls_to_its_agent(tmp_path):
    registry = Registry()
    gateway = ToolGateway(tmp_path / "t.sock", "right-token", "agent-1", registry, "session-1")
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        path = str(tmp_path / "t.sock")
        mode = (tmp_path / "t.sock").stat().st_mode & 0o777
        wrong = await trio.to_thread.run_sync(request, path, "guess", {"op": "call", "name": "echo",
                                                                        "arguments": {"n": 1}}, 10.0)
        # A caller cannot name another agent: there is no field for it, the gateway is agent-1's.
        right = await trio.to_thread.run_sync(request, path, "right-token", {"op": "call", "name": "echo",
                                                                              "arguments": {"n": 2},
                                                                              "agent": "agent-2"}, 10.0)
        nursery.cancel_scope.cancel()
    assert wrong == {"error": "wrong token"}
    assert right["text"] == "echo 2 " and registry.sessions == ["session-1"]
    assert mode == 0o600
    assert not (tmp_path / "t.sock").exists()  # gone with the gateway


async def test_mcp_serves_exactly_the_tools_the_sdk_backends_get(tmp_path):
    """One definition per tool: the MCP listing (names, descriptions, schemas) equals the SDK backends' list."""
    from enpire.agents.llm import TOOL_SPECS
    from enpire.agents.registry import REGISTRY

    gateway = ToolGateway(tmp_path / "tools.sock", "tok", "agent-0", REGISTRY, session=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        params = StdioServerParameters(command=sys.executable, args=["-m", "enpire.agents.mcp_server"],
                                       env={"ENPIRE_TOOLS_SOCKET": str(tmp_path / "tools.sock"),
                                            "ENPIRE_TOOLS_TOKEN": "tok", "PATH": "/usr/bin:/bin"})
        with trio.fail_after(60):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
                await client.initialize()
                listed = (await client.list_tools()).tools
        nursery.cancel_scope.cancel()
    mcp = [(t.name, t.description, t.input_schema) for t in listed]
    sdk = [(s.name, s.description, s.parameters) for s in TOOL_SPECS]
    assert mcp == sdk and len(mcp) >= 15
    assert {"evaluate", "wait", "episode", "promote", "commit", "read_file"} <= {name for name, _, _ in mcp}


async def test_gateway_answers_hostile_lines_and_keeps_serving(tmp_path):
    """Whatever a jailed agent writes to its tool socket gets a one-line refusal; the gateway (and with it
    the agent's session) keeps serving the next call."""
    registry = Registry()
    gateway = ToolGateway(tmp_path / "t.sock", "tok", "agent-1", registry, "session-1")
    path = str(tmp_path / "t.sock")

    def send_line(line: bytes) -> bytes:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(line + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
            return data

    hostile = [b"[" * 100_000, b'{"token": "tok", "op": "call", "arguments": ' + b"[" * 50_000 + b"}",
               b"\xff\xfe not utf-8", b"[1, 2]", b'"tok"', b"NaN", b"",
               b'{"token": ["tok"], "op": "list"}', b'{"token": "tok", "op": ["list"]}',
               b'{"token": "tok", "op": "call", "name": "echo", "arguments": [1]}']
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        replies = [await trio.to_thread.run_sync(send_line, line) for line in hostile]
        after = await trio.to_thread.run_sync(request, path, "tok", {"op": "call", "name": "echo",
                                                                      "arguments": {"n": 5}}, 10.0)
        nursery.cancel_scope.cancel()
    import json

    decoded = [json.loads(r) for r in replies]
    assert [bool(d.get("error") or d.get("is_error")) for d in decoded] == [True] * len(hostile), decoded
    assert decoded[0] == {"error": "request is not a JSON object"}
    assert after["text"] == "echo 5 " and not after["is_error"]


async def test_idle_connections_cannot_exhaust_the_daemons_descriptors(tmp_path, monkeypatch):
    """A jail that opens connections and sends nothing holds at most MAX_CONNECTIONS of the daemon's file
    descriptors (the rest wait in the kernel's backlog), each for at most REQUEST_TIMEOUT_S; then calls
    are served again."""
    import os
    import socket

    from enpire.agents import tool_gateway

    monkeypatch.setattr(tool_gateway, "REQUEST_TIMEOUT_S", 1.0)
    gateway = ToolGateway(tmp_path / "t.sock", "tok", "agent-1", Registry(), "session-1")
    path = str(tmp_path / "t.sock")
    idle = []
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        before = len(os.listdir("/proc/self/fd"))

        def connect() -> None:  # in a thread: a connect waits while the backlog is full
            for _ in range(tool_gateway.MAX_CONNECTIONS + 10):  # the rest fit in the listen backlog
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)  # blocking: a unix socket with a timeout fails at once on a full backlog
                idle.append(s)

        with trio.fail_after(30):
            await trio.to_thread.run_sync(connect, abandon_on_cancel=True)
        await trio.sleep(0.3)
        held = len(os.listdir("/proc/self/fd")) - before - len(idle)  # the daemon's side of them
        await trio.sleep(2.5)  # past the request timeout: the first ones are closed, the next ones admitted
        after = await trio.to_thread.run_sync(request, path, "tok", {"op": "call", "name": "echo",
                                                                      "arguments": {"n": 4}}, 10.0)
        nursery.cancel_scope.cancel()
    for s in idle:
        s.close()
    assert 0 < held <= tool_gateway.MAX_CONNECTIONS
    assert after["text"] == "echo 4 "
