"""A CLI agent's worktree: a git repository of its workspace branch that only its jail may write.

The daemon creates it from the agent's branch head (main for a new agent), adds a copy of the training
recipes, `.enpire/task.json` (what `enpire.agents.local_check` needs: task, tuning seeds, limits) and the
AGENTS.md / CLAUDE.md it writes (task card, policy protocol, tools, rules). The agent edits and commits
with its own tools; its commits reach the fleet only when the daemon publishes them (`publish`, before
every fleet tool call): the daemon reads the worktree's HEAD with git plumbing under a config of its own
(no hooks, no fsmonitor, no alternates, no gitdir redirection) and commits the files on the agent's
workspace branch, where protected paths are refused as for every agent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from enpire.workspace import MAX_COMMIT_BYTES, MAX_FILE_BYTES, MAX_FILES, Workspace, WorkspaceError

DAEMON_FILES = ("AGENTS.md", "CLAUDE.md", ".enpire/")  # written by the daemon, never published
RECIPES = ("bc.py", "rl.py", "dataset.py", "recipes.py", "mlp_policy.py")


class WorktreeError(WorkspaceError):
    pass


def _git_env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "enpire", "GIT_AUTHOR_EMAIL": "enpire@localhost",
            "GIT_COMMITTER_NAME": "enpire", "GIT_COMMITTER_EMAIL": "enpire@localhost", "GIT_TERMINAL_PROMPT": "0"}


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _replace(path: Path, text: str) -> None:
    """Write `text` at `path` (below the worktree) as a new regular file in real folders: whatever link,
    folder or file the agent left at that name or at its parent is removed first."""
    if path.parent.is_symlink() or (path.parent.exists() and not path.parent.is_dir()):
        _remove(path.parent)
    path.parent.mkdir(exist_ok=True)
    _remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass
class Worktree:
    path: Path
    agent: str
    published: dict[str, str] = field(default_factory=dict)  # worktree commit -> workspace commit

    def _git_dir(self) -> Path:
        git_dir = self.path / ".git"
        if git_dir.is_symlink() or not git_dir.is_dir():
            raise WorktreeError(f"{git_dir}: not a plain git directory (it was replaced)")
        return git_dir

    def git(self, *args: str, input: bytes | None = None) -> bytes:
        """git on the worktree with the daemon's own settings: nothing the agent configured runs."""
        git_dir = self._git_dir()
        if (git_dir / "objects" / "info" / "alternates").exists():
            raise WorktreeError(f"{git_dir}: object alternates are not allowed")
        safe = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "protocol.allow=never",
                "-c", f"safe.directory={self.path}"]
        env = dict(_git_env(self.path), GIT_DIR=str(git_dir), GIT_WORK_TREE=str(self.path))
        proc = subprocess.run(["git", *safe, *args], input=input, capture_output=True, env=env, timeout=60)
        if proc.returncode != 0:
            raise WorktreeError(f"git {args[0]} in {self.path}: {proc.stderr.decode(errors='replace').strip()[:300]}")
        return proc.stdout

    def create(self, files: dict[str, bytes], base: str, docs: dict[str, str], task: dict) -> None:
        """Fill a new worktree with `files` (the branch head `base`), the recipes and the daemon's files.
        Whatever a folder without a git directory holds (what an agent left after removing its .git,
        links included) goes first: nothing is written through it."""
        if self.path.exists():
            shutil.rmtree(self.path)  # removes links, never follows them
        self.path.mkdir(parents=True)
        subprocess.run(["git", "init", "--quiet", "--initial-branch=main", str(self.path)], check=True,
                       env=_git_env(self.path), capture_output=True)
        for name, data in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        recipes = Path(__file__).resolve().parent.parent / "learning"
        (self.path / "recipes").mkdir(exist_ok=True)
        for name in RECIPES:
            if (recipes / name).is_file() and not (self.path / "recipes" / name).exists():
                shutil.copyfile(recipes / name, self.path / "recipes" / name)
        self.write_docs(docs, task)
        self.git("add", "-A")
        self.git("commit", "--quiet", "--allow-empty", "-m", f"start from fleet commit {base[:12]}")
        self.published[self.head()] = base

    def write_docs(self, docs: dict[str, str], task: dict) -> None:
        """(Re)write the daemon's files; git ignores them (they are the daemon's, never the agent's work).
        The agent may have put links in their place, which resolve in the daemon's file system, not the
        jail's: each file and folder here is replaced, never written through (the jail is not running)."""
        git_dir = self._git_dir()
        for name, text in docs.items():
            _replace(self.path / name, text)
        _replace(self.path / ".enpire" / "task.json", json.dumps(task, indent=1))
        _replace(git_dir / "info" / "exclude", "".join(f"/{d}\n" for d in DAEMON_FILES) + "__pycache__/\n*.pyc\n")

    def head(self) -> str:
        return self.git("rev-parse", "--verify", "HEAD").decode().strip()

    def files(self, commit: str) -> dict[str, bytes]:
        """Regular files of a worktree commit (no symlinks, no submodules), daemon files left out. Sizes and
        count are checked from the tree before any content is read: a thousand paths to one blob cost the
        agent one object on disk, and would cost the daemon a thousand copies in memory."""
        wanted: list[tuple[str, bytes, int]] = []
        total = 0
        for entry in self.git("ls-tree", "-r", "-l", "-z", "--full-tree", commit).split(b"\0"):
            if not entry:
                continue
            meta, _, name = entry.partition(b"\t")
            mode, kind, sha, size = meta.split()
            path = name.decode(errors="replace")
            if any(path == d or path.startswith(d) for d in DAEMON_FILES):
                continue
            if kind != b"blob" or mode not in (b"100644", b"100755"):
                raise WorktreeError(f"{path}: only regular files can be published (mode {mode.decode()})")
            if not size.isdigit():  # ls-tree's size of an object it cannot read
                raise WorktreeError(f"{path}: object {sha.decode()[:12]} is missing or unreadable")
            if int(size) > MAX_FILE_BYTES:
                raise WorktreeError(f"{path} is {int(size)} bytes; a policy file may hold at most {MAX_FILE_BYTES}")
            total += int(size)
            wanted.append((path, sha, int(size)))
            if total > MAX_COMMIT_BYTES or len(wanted) > MAX_FILES:
                raise WorktreeError(f"commit {commit[:12]} holds more than {MAX_COMMIT_BYTES} bytes or {MAX_FILES} "
                                    "files; a policy may hold at most that")
        # one git process for all contents: each object comes back as "<sha> blob <size>\n<content>\n"
        batch = self.git("cat-file", "--batch", input=b"".join(sha + b"\n" for _, sha, _ in wanted))
        out, at = {}, 0
        for path, sha, size in wanted:
            header = b"%s blob %d\n" % (sha, size)
            if batch[at : at + len(header)] != header:  # "<sha> missing": the agent removed the object
                raise WorktreeError(f"{path}: object {sha.decode()[:12]} is missing or not the blob its tree names")
            at += len(header)
            out[path] = batch[at : at + size]
            at += size + 1
        return out

    def publish(self, workspace: Workspace, branch: str) -> tuple[str, str] | None:
        """Commit the worktree's HEAD on `branch` of the workspace when it changed since the last publish.
        Returns (worktree commit, workspace commit), or None when there was nothing new. Raises
        ProtectedPathError (nothing is committed) when it touches a protected path."""
        head = self.head()
        if head in self.published:
            return None
        files = self.files(head)
        base = workspace.head(branch) or workspace.head("main")
        current = workspace.read_bytes(base) if base else {}
        changes: dict[str, bytes | None] = {p: d for p, d in files.items() if current.get(p) != d}
        changes.update({p: None for p in current if p not in files})
        message = self.git("log", "-1", "--format=%B", head).decode(errors="replace").strip()[:500] or "commit"
        if not changes:
            self.published[head] = base
            return None
        commit = workspace.commit(branch, changes, f"{message} (worktree {head[:12]})")
        self.published[head] = commit
        return head, commit

    def resolve(self, commit: str) -> str | None:
        """The workspace commit a worktree commit id (7+ hex digits) was published as."""
        if len(commit) < 7:
            return None
        for local, remote in self.published.items():
            if local.startswith(commit):
                return remote
        return None
