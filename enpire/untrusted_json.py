"""JSON from a source the daemon does not trust (a jailed agent's tool socket, a CLI's output stream, a
recipe's metrics file): an object or nothing, never an exception, and never one that is nested deeper
than `MAX_DEPTH`. The standard parser raises RecursionError, not ValueError, on deeply nested input,
and an object it just accepts can still be too deep to print or encode again a few frames further down;
catching ValueError alone lets a single line of brackets crash whoever reads it."""

from __future__ import annotations

import json
import sys
from typing import Any

MAX_DEPTH = 64  # far beyond any event, tool call or metrics file the daemon reads


def json_object(data: str | bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any] | None:
    """The JSON object `data` holds; None for anything else (not JSON, not UTF-8, not an object, too deep)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or _depth_over(value, max_depth):
        return None
    return value


def _depth_over(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep (iterative: the check must not recurse itself)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def typed_get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """obj[key] when it is of type `kind`, else `default`: reading a value of the wrong type from an
    untrusted object is a missing value, not a crash."""
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # JSON true is no number
        return default
    return value


def finite(value: Any) -> float | None:
    """`value` as a float when it is a number a float holds: not a bool, nan, an infinity or an int past
    the float range (float() of that raises)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
        return None
    return float(value)
