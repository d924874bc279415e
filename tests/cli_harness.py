"""Shared pieces of the CLI agent tests: which CLIs are here, shell calls in each CLI's own tool."""

from __future__ import annotations

import shutil

import pytest

from enpire import isolation
from enpire.agents.cli_backend import CLI_DIR

KINDS = ("claude-code", "codex")
PROVIDER = {"claude-code": "anthropic", "codex": "openai"}
MAIN_TOOL = {"claude-code": "Bash", "codex": "exec_command"}
MODEL = {"claude-code": "claude-sonnet-4-5", "codex": "gpt-5-codex"}


def shell(kind: str, command: str) -> tuple[tuple[str, dict], ...]:
    """One shell call in the CLI's own tool."""
    if kind == "claude-code":
        return (("Bash", {"command": command, "description": "run"}),)
    return (("exec_command", {"cmd": command, "yield_time_ms": 60000}),)


def read(kind: str, path: str) -> tuple[tuple[str, dict], ...]:
    """Read a file with the CLI's own tool (Claude Code writes over a file only after reading it)."""
    if kind == "claude-code":
        return (("Read", {"file_path": path}),)
    return shell(kind, f"cat {path}")


def write(kind: str, path: str, text: str) -> tuple[tuple[str, dict], ...]:
    """Write a file with the CLI's own file tool (Claude Code: Write; Codex: its shell, as Codex does)."""
    if kind == "claude-code":
        return (("Write", {"file_path": path, "content": text}),)
    return shell(kind, f"cat > {path} <<'EOF'\n{text}EOF")


def require(kind: str) -> None:
    """Skip (saying what is missing) when this machine cannot run the CLI confined."""
    reason = isolation.check()
    if reason:
        pytest.skip(f"isolation engine unavailable: {reason}")
    if shutil.which("node") is None or not (CLI_DIR / ".bin" / ("claude" if kind == "claude-code" else "codex")).exists():
        pytest.skip(f"{kind} is not installed: run `npm ci --prefix cli` (bash .ci/run does it)")
