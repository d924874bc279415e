"""The daemon's end of a CLI agent's MCP server: a unix socket that carries that agent's tool calls only.

One gateway per CLI agent, bound to the agent's session (its Tools, jobs, task card): whatever a caller
sends, a call runs as that agent, so the socket a jail sees cannot act for anyone else. A call must carry
the agent's token (compared in constant time); the socket file is 0600 and lives in a folder only that
agent's jail binds. Requests and replies are one line of JSON each (see `enpire.agents.mcp_server`).
"""

from __future__ import annotations

import hmac
import json
import os
import socket as pysocket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from enpire.agents.mcp_server import image_payload
from enpire.untrusted_json import json_object

MAX_REQUEST = 4 << 20
MAX_CONNECTIONS = 16  # open at once: each holds a descriptor of the daemon's, which a jail must not exhaust
REQUEST_TIMEOUT_S = 60.0  # to send the request line (a call may then run as long as its tool does)


def tool_list(registry) -> list[dict[str, Any]]:
    """Every tool of the registry as MCP lists it: name, description, JSON schema of its arguments."""
    return [{"name": t.name, "description": t.description, "schema": t.schema()} for t in registry]


class ToolGateway:
    def __init__(self, path: Path, token: str, agent: str, registry, session,
                 before_call: Callable[[str, dict], Awaitable[str | None]] | None = None):
        self.path = Path(path)
        self.token = token
        self.agent = agent
        self.registry = registry
        self.session = session
        self.before_call = before_call  # e.g. publish the agent's worktree; returns a note for the result
        self.log = structlog.get_logger().bind(actor=agent)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        await sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        slots = trio.Semaphore(MAX_CONNECTIONS)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await slots.acquire()  # past the limit, connects wait in the kernel's backlog, not here
                    stream = await listener.accept()
                    nursery.start_soon(self._connection, stream, slots)
        finally:
            self.path.unlink(missing_ok=True)  # before the checkpoint below, which a cancellation interrupts
            await listener.aclose()

    async def _connection(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        try:
            async with stream:
                line = await self._request_line(stream)
                if line is None:
                    return
                reply = await self.handle(line)
                with trio.move_on_after(REQUEST_TIMEOUT_S):  # a caller that never reads keeps no slot
                    try:
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
                    except trio.BrokenResourceError:
                        pass  # the MCP server went away (the CLI was stopped): the call's effects stand
        finally:
            slots.release()

    async def _request_line(self, stream: trio.SocketStream) -> bytes | None:
        data = bytearray()
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            while b"\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                data += chunk
                if len(data) > MAX_REQUEST:
                    self.log.warning("tool_gateway_refused", reason="request too large")
                    return None
            return bytes(data.split(b"\n", 1)[0])
        self.log.warning("tool_gateway_refused", reason=f"no request line within {REQUEST_TIMEOUT_S:.0f} s")
        return None

    async def handle(self, line: bytes) -> dict[str, Any]:
        message = json_object(line)
        if message is None:
            return {"error": "request is not a JSON object"}
        if not hmac.compare_digest(str(message.get("token", "")).encode(), self.token.encode()):
            self.log.warning("tool_gateway_refused", reason="wrong token")
            return {"error": "wrong token"}
        op = message.get("op")
        if op == "list":
            return {"tools": tool_list(self.registry)}
        if op != "call":
            return {"error": f"unknown op {op!r}"}
        name, arguments = str(message.get("name", "")), message.get("arguments") or {}
        if not isinstance(arguments, dict):
            return {"text": "arguments must be an object", "is_error": True}
        note = await self.before_call(name, arguments) if self.before_call else None
        result = await self.registry.call(self.session, name, arguments)
        text = f"{note}\n{result.text}" if note else result.text
        self.log.info("mcp_tool_call", tool=name, is_error=result.is_error, images=len(result.images))
        return {"text": text, "is_error": result.is_error,
                "images": [image_payload(i.data, i.media_type) for i in result.images]}
