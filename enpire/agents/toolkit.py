"""The shape of an agent tool: argument Struct, result, and the registry that validates and dispatches.

Every tool is defined once (name, description, argument Struct, handler, ordered) and served to both the
API agent loop and the MCP server of CLI agents. Handlers get the agent's `Session` (its Tools, job journal,
task card) and the validated arguments; whatever goes wrong becomes an error result the model can act on.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from enpire.episodes import EpisodeFileError
from enpire.workspace import WorkspaceError


class Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of each tool's arguments (unknown fields are refused with their name)."""


@dataclass(frozen=True)
class Image:
    data: bytes
    media_type: str = "image/png"


@dataclass(frozen=True)
class ToolResult:
    text: str
    images: tuple[Image, ...] = ()
    is_error: bool = False


class ToolError(RuntimeError):
    """A refusal or failure the model is told about in one line (bad commit id, protected path, ...)."""


Handler = Callable[[Any, Any], Awaitable["ToolResult | str"]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[Args]
    handler: Handler
    # True: touches the agent's branch or job sequence; the calls of one turn that are ordered run one
    # after another in the order the model wrote them (commit, then evaluate of the new head).
    ordered: bool = False

    def schema(self) -> dict[str, Any]:
        """JSON schema of the arguments object (no $ref: every provider accepts it inline)."""
        schema = msgspec.json.schema(self.args)
        body = dict(schema["$defs"][self.args.__name__]) if "$defs" in schema else dict(schema)
        body.pop("title", None)
        body.setdefault("properties", {})
        return body


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 40)] + f"\n…[cut: {len(text) - limit + 40} more chars]"


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
    return text


def _unusable(value: Any, where: str) -> str | None:
    """Where in a tool's arguments a value is one no path, git argument, UTF-8 file or policy parameter can
    hold (a NUL, a lone surrogate, NaN or an infinity), or None. JSON text cannot carry NaN, but a decoded
    object from the MCP side can: both kinds of agent get the same refusal. Argument types nest two or
    three levels, so the recursion is shallow."""
    if isinstance(value, str):
        return where if "\0" in value or (not value.isascii() and not _encodes(value)) else None
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):  # the keys of argument dicts are strings (paths, parameter names)
        pairs = [(_unusable(key, f"{where} key"), _unusable(item, f"{where}.{key}")) for key, item in value.items()]
        return next((found for pair in pairs for found in pair if found), None)
    if isinstance(value, list):
        return next((found for i, item in enumerate(value) if (found := _unusable(item, f"{where}[{i}]"))), None)
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class Registry:
    """Every agent tool by name. `call` validates the arguments against the tool's Struct and never raises
    for a tool's own failure: the model gets an error result instead."""

    def __init__(self, tools: Iterable[Tool]):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            if t.name in self._tools:
                raise ValueError(f"tool {t.name!r} is defined twice")
            self._tools[t.name] = t

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def parse(self, name: str, arguments: dict | str | bytes) -> tuple[Tool, Args]:
        """The tool and its validated arguments (JSON text or an already decoded object); ToolError if not."""
        tool = self._tools.get(name)
        if tool is None:
            raise ToolError(f"unknown tool {name!r}; tools: {', '.join(self._tools)}")
        try:
            if isinstance(arguments, (str, bytes)):
                args = msgspec.json.decode(arguments or "{}", type=tool.args)
            else:
                args = msgspec.convert(arguments or {}, type=tool.args)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeEncodeError) as e:  # the last: a lone
            raise ToolError(f"bad arguments for {name}: {e}") from None  # surrogate compared to a Literal
        where = _unusable(msgspec.structs.asdict(args), "$")
        if where:
            raise ToolError(f"bad arguments for {name}: `{where}` holds a NUL, an unpaired surrogate or a number "
                            "that is not finite (text is UTF-8 without NUL; numbers are finite)")
        return tool, args

    async def call(self, session, name: str, arguments: dict | str) -> ToolResult:
        """Validate, run (ordered tools one at a time per session, in call order), cap and scrub the text."""
        limit = getattr(getattr(session, "settings", None), "tool_output_chars", 12_000)
        secrets = getattr(session, "secrets", ())
        try:
            tool, args = self.parse(name, arguments)
            if tool.ordered and getattr(session, "lane", None) is not None:
                async with session.lane:
                    result = await tool.handler(session, args)
            else:
                result = await tool.handler(session, args)
            if isinstance(result, str):
                result = ToolResult(result)
            return ToolResult(_truncate(_scrub(result.text, secrets), limit), result.images, result.is_error)
        except ToolError as e:
            return ToolResult(_truncate(_scrub(str(e), secrets), limit), is_error=True)
        except (WorkspaceError, EpisodeFileError, OSError) as e:  # refusals of the workspace, unreadable files
            structlog.get_logger().info("tool_refused", tool=name, error=f"{type(e).__name__}: {e}"[:300])
            return ToolResult(_truncate(_scrub(f"{type(e).__name__}: {e}", secrets), limit), is_error=True)
        # Anything else is a bug: it crashes the agent, whose supervisor restarts it (let it crash).
