"""Agent tools on the policy workspace: read and list files of any commit, edit or write them on the agent's
own branch, commit, and read a branch's log, a diff or any teammate's commit by id."""

from __future__ import annotations

from typing import Annotated

import msgspec
import trio
from msgspec import Meta

from enpire.agents.toolkit import Args, Tool, ToolError

COMMIT = Annotated[str, Meta(description="commit id (7+ hex digits, yours or a teammate's) or a branch "
                                         "(main, agent/NAME, learned/NAME); empty = your branch head")]
MAX_LINES = 400


def _json(value) -> str:
    return msgspec.json.encode(value).decode()


def _text(data: bytes, path: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ToolError(f"{path} is a binary file ({len(data)} bytes); it cannot be shown as text") from None


async def _run(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


class ReadFileArgs(Args):
    path: Annotated[str, Meta(min_length=1, description="file path in the workspace, e.g. policy.py")]
    commit: COMMIT = ""
    start_line: Annotated[int, Meta(ge=1, description="first line to show (1-based)")] = 1
    max_lines: Annotated[int, Meta(ge=1, le=MAX_LINES)] = 200


async def read_file(session, a: ReadFileArgs) -> str:
    commit = await session.resolve(a.commit)
    lines = _text(await _run(session.workspace.read_file, commit, a.path), a.path).splitlines()
    budget = session.settings.tool_output_chars - 300  # a page never gets cut in the middle
    shown, size, end = [], 0, a.start_line - 1
    for i in range(a.start_line - 1, min(len(lines), a.start_line - 1 + a.max_lines)):
        row = f"{i + 1:5d}| {lines[i]}"
        if size + len(row) + 1 > budget and shown:
            break
        shown.append(row)
        size += len(row) + 1
        end = i + 1
    if a.start_line > max(1, len(lines)):
        raise ToolError(f"{a.path} has {len(lines)} lines; start_line {a.start_line} is past the end")
    more = f"; next page: start_line={end + 1}" if end < len(lines) else " (end of file)"
    return f"{a.path} @ {commit[:12]}: lines {a.start_line}-{end} of {len(lines)}{more}\n" + "\n".join(shown)


class ListFilesArgs(Args):
    commit: COMMIT = ""


async def list_files(session, a: ListFilesArgs) -> str:
    commit = await session.resolve(a.commit)
    sizes = await _run(session.workspace.sizes, commit)
    return f"commit {commit[:12]}:\n" + "\n".join(f"{p} ({n} bytes)" for p, n in sorted(sizes.items()))


class WriteFileArgs(Args):
    path: Annotated[str, Meta(min_length=1)]
    content: Annotated[str, Meta(description="the whole new text of the file")]
    message: Annotated[str, Meta(max_length=500)] = ""


async def _commit(session, files: dict, message: str) -> str:
    commit = await _run(session.workspace.commit, session.tools.branch, files, message)
    return commit


async def write_file(session, a: WriteFileArgs) -> str:
    commit = await _commit(session, {a.path: a.content}, a.message or f"write {a.path}")
    return _json({"commit": commit, "path": a.path, "lines": len(a.content.splitlines())})


class EditArgs(Args):
    path: Annotated[str, Meta(min_length=1)]
    old: Annotated[str, Meta(description="exact text to replace (whitespace included); it must occur once "
                                         "unless all=true")] = ""
    new: Annotated[str, Meta(description="replacement text")] = ""
    all: Annotated[bool, Meta(description="replace every occurrence of old")] = False
    diff: Annotated[str, Meta(description="instead of old/new: a unified diff (---/+++ headers, @@ hunks) "
                                          "against your branch head")] = ""
    message: Annotated[str, Meta(max_length=500)] = ""


async def edit(session, a: EditArgs) -> str:
    """Exact-string replace or a unified diff, committed on the agent's branch."""
    ws, branch = session.workspace, session.tools.branch
    message = a.message or f"edit {a.path}"
    if a.diff:
        if a.old:
            raise ToolError("give either old/new or diff, not both")
        head = await session.head()
        commit = await _run(ws.apply_patch, branch, a.diff, message)
        return _json({"commit": commit}) + "\n" + await _run(ws.diff, head, commit)
    if not a.old:
        raise ToolError("old is empty: give the exact text to replace (or a unified diff in diff)")
    head = await session.head()
    text = _text(await _run(ws.read_file, head, a.path), a.path)
    n = text.count(a.old)
    if n == 0:
        raise ToolError(f"old text not found in {a.path} @ {head[:12]} (it must match exactly, whitespace included)")
    if n > 1 and not a.all:
        raise ToolError(f"old text occurs {n} times in {a.path}: add context to make it unique, or set all=true")
    commit = await _commit(session, {a.path: text.replace(a.old, a.new)}, message)
    return _json({"commit": commit, "replaced": n}) + "\n" + await _run(ws.diff, head, commit)


class CommitArgs(Args):
    files: Annotated[dict[str, str | None], Meta(description="path -> full new text; null deletes the file")]
    message: Annotated[str, Meta(min_length=1, max_length=500)]


async def commit(session, a: CommitArgs) -> str:
    return _json({"commit": await _commit(session, dict(a.files), a.message)})


class LogArgs(Args):
    branch: Annotated[str, Meta(description="main, agent/NAME, learned/NAME or a teammate's NAME; empty = yours")] = ""
    limit: Annotated[int, Meta(ge=1, le=50)] = 15


async def log(session, a: LogArgs) -> str:
    ws = session.workspace
    def find(branch: str) -> str:
        if ws.head(branch) is None and ws.head(f"agent/{branch}") is not None:
            branch = f"agent/{branch}"
        if ws.head(branch) is None:
            raise ToolError(f"no branch {branch!r} (yours is {session.tools.branch}; teammates' are agent/NAME)")
        return branch

    branch = await _run(find, a.branch or session.tools.branch)
    return f"{branch}:\n" + "\n".join(await _run(ws.log, branch, a.limit))


class DiffArgs(Args):
    commit: COMMIT = ""
    base: Annotated[str, Meta(description="commit or branch to compare against; empty = main")] = ""
    paths: list[str] = []


async def diff(session, a: DiffArgs) -> str:
    target, base = await session.resolve(a.commit), await session.resolve(a.base or "main")
    text = await _run(session.workspace.diff, base, target, tuple(a.paths))
    return f"diff {base[:12]}..{target[:12]}\n" + (text or "(no differences)")


class ShowCommitArgs(Args):
    commit: Annotated[str, Meta(min_length=7, description="commit id, e.g. a teammate's candidate")]


async def show_commit(session, a: ShowCommitArgs) -> str:
    return await _run(session.workspace.show, await session.resolve(a.commit))


TOOLS = [
    Tool("read_file", "Read a text file of a commit (any commit, a teammate's too) with line numbers, one page "
         "at a time; the header says which start_line shows the next page.", ReadFileArgs, read_file, ordered=True),
    Tool("list_files", "Files and sizes of a commit (default: your branch head).", ListFilesArgs, list_files, ordered=True),
    Tool("edit", "Change one file on your branch and commit: replace exact text old -> new, or apply a unified "
         "diff. Returns the commit id and the diff.", EditArgs, edit, ordered=True),
    Tool("write_file", "Write a whole file on your branch and commit; returns the commit id.", WriteFileArgs,
         write_file, ordered=True),
    Tool("commit", "Write several files on your branch in one commit (null deletes); returns the commit id. "
         "Protected paths (verifier, reset, eval, seeds, safety) are refused.", CommitArgs, commit, ordered=True),
    Tool("log", "Recent commits of a branch (yours, main, or a teammate's).", LogArgs, log, ordered=True),
    Tool("diff", "Unified diff between two commits (default: your branch head against main).", DiffArgs, diff, ordered=True),
    Tool("show_commit", "A commit's message and the diff it made, by id (a teammate's too).", ShowCommitArgs,
         show_commit),
]
