"""The fleet's agent tools as an MCP server (official `mcp` SDK, stdio), one per CLI agent.

The CLI spawns this inside its jail (`python -m enpire.agents.mcp_server`), with two things in its
environment: ENPIRE_TOOLS_SOCKET, a unix socket the daemon bound into this agent's jail only, and
ENPIRE_TOOLS_TOKEN, the agent's token for it. Each MCP request becomes one line of JSON on that socket;
the daemon (`enpire.agents.tool_gateway`) runs it against the tool registry in this agent's session and
answers with the result. So the server holds no state, no blackboard and no bus: it lists the tools the
registry defines (names, descriptions, JSON schemas, as the daemon reports them) and relays calls; image
results become MCP image content.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
from typing import Any

MAX_LINE = 64 << 20  # a result with images stays well below this


def request(path: str, token: str, message: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """One request to the daemon's tool gateway (blocking; one connection per request)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall(json.dumps(dict(message, token=token)).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_LINE:
                raise ConnectionError("tool gateway reply too large")
    if not data:
        raise ConnectionError("tool gateway closed the connection without a reply")
    return json.loads(data)


def _content(reply: dict[str, Any]):
    import mcp_types as types

    content: list[Any] = [types.TextContent(type="text", text=reply.get("text", ""))]
    for image in reply.get("images", []):
        content.append(types.ImageContent(type="image", data=image["data"], mime_type=image["media_type"]))
    return types.CallToolResult(content=content, is_error=bool(reply.get("is_error")))


def build_server(path: str, token: str):
    import anyio
    import mcp_types as types
    from mcp.server.lowlevel import Server

    async def list_tools(ctx, params) -> types.ListToolsResult:
        reply = await anyio.to_thread.run_sync(request, path, token, {"op": "list"}, 60.0)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return types.ListToolsResult(tools=[types.Tool(name=t["name"], description=t["description"],
                                                       input_schema=t["schema"]) for t in reply["tools"]])

    async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        message = {"op": "call", "name": params.name, "arguments": params.arguments or {}}
        try:
            reply = await anyio.to_thread.run_sync(request, path, token, message, None)
        except (OSError, ValueError) as e:
            reply = {"text": f"the fleet's tool gateway is unreachable: {e}", "is_error": True}
        if "error" in reply:
            reply = {"text": reply["error"], "is_error": True}
        return _content(reply)

    return Server("enpire", version="1", instructions="Tools of the enpire robot fleet: evaluate policies on "
                  "its cells, inspect episodes, promote, read the team's findings.",
                  on_list_tools=list_tools, on_call_tool=call_tool)


def main() -> int:
    path, token = os.environ.get("ENPIRE_TOOLS_SOCKET", ""), os.environ.get("ENPIRE_TOOLS_TOKEN", "")
    if not path or not token:
        print("enpire.agents.mcp_server: ENPIRE_TOOLS_SOCKET and ENPIRE_TOOLS_TOKEN must be set "
              "(the daemon starts this server for a CLI agent)", file=sys.stderr)
        return 2
    import anyio
    from mcp.server.stdio import stdio_server

    server = build_server(path, token)

    async def run() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(run)
    return 0


def image_payload(data: bytes, media_type: str) -> dict[str, str]:
    return {"data": base64.b64encode(data).decode(), "media_type": media_type}


if __name__ == "__main__":
    sys.exit(main())
