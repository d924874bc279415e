"""The agent tool registry: every tool an agent may call, defined once.

Served to the API agent loop (`enpire/agents/llm.py`) and to the MCP server of CLI agents alike:

    async with agent_session(config, tools, index) as session:      # or open_session(...)
        result = await REGISTRY.call(session, "read_file", {"path": "policy.py"})

`call` validates the arguments against the tool's Struct and turns every tool failure into a result with
is_error=True; tools marked `ordered` run one at a time per session, in the order they were called.
"""

from __future__ import annotations

from enpire.agents import tool_code, tool_fleet, tool_team
from enpire.agents.session import Session, SessionSettings, agent_session, agent_tools, open_session
from enpire.agents.toolkit import Args, Image, Registry, Tool, ToolError, ToolResult

REGISTRY = Registry([*tool_code.TOOLS, *tool_fleet.TOOLS, *tool_team.TOOLS])

__all__ = ["REGISTRY", "Args", "Image", "Registry", "Session", "SessionSettings", "Tool", "ToolError", "ToolResult",
           "agent_session", "agent_tools", "open_session"]
