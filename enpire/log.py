"""Structured logging: one JSON event per line in logs/fleet.jsonl, shared by every process.

Each process appends whole lines to the same file (O_APPEND keeps lines from interleaving), so
`tail -f logs/fleet.jsonl` or `python -m enpire.logs` shows the whole fleet in order of time.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import structlog

# Values that look like credentials never reach a log line, whatever an actor passes in.
_SECRET = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|(?i:api[_-]?key|token|secret|password)\s*[=:]\s*\S+)")


def _redact(_, __, event: dict) -> dict:
    for key, value in event.items():
        if isinstance(value, str) and _SECRET.search(value):
            event[key] = _SECRET.sub("[redacted]", value)
    return event


def configure(state_dir: Path | None, process: str, *, console: bool = False, level: str = "info") -> None:
    """Send JSON lines to state_dir/logs/fleet.jsonl (and readable lines to stderr when `console`)."""
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    sinks = []
    if state_dir is not None:
        logs = Path(state_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        sinks.append(open(logs / "fleet.jsonl", "a", buffering=1, encoding="utf-8"))
    render_json = structlog.processors.JSONRenderer()
    render_console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    def write(_, __, event: dict) -> str:
        event.setdefault("process", process)
        event.setdefault("pid", os.getpid())
        line = render_json(None, None, dict(event))
        for sink in sinks:
            sink.write(line + "\n")
        if console:
            sys.stderr.write(render_console(None, None, dict(event)) + "\n")
        return ""

    structlog.configure(
        processors=[*processors, write],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
