"""The policy workspace: a git repository in the state directory, one branch per agent.

Commits are made with git plumbing (a private index per commit, no checkout), so several agents can
commit to their own branches at once without sharing a work tree. A commit id is a policy reference.
Protected paths (verifier, reset, held-out seeds, safety limits, evaluation code) can never be
committed; cells never load them from here anyway.

Files are bytes to git: a source is committed as UTF-8 text, a checkpoint (e.g. `weights.npz`) as
raw bytes. Every lease ships all files of its commit to a cell, so files and commits are size-capped.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

PROTECTED = ("verify*", "verifier*", "reset*", "eval*", "seeds*", "heldout*", "safety*", "limits*", ".git*")
MAIN = "main"
MAX_FILE_BYTES = 8 << 20  # one file, e.g. a trained policy's weights
MAX_COMMIT_BYTES = 16 << 20  # all files of a commit: what every lease carries to a cell
MAX_FILES = 1000  # files of one commit (each costs git processes here and a file in every cell's sandbox)
GIT_TIMEOUT_S = 120.0  # one git process (a hung one, e.g. on a stalled disk, fails the call, not the fleet)
DISK_RESERVE = 512 << 20  # free bytes no agent's commit (or CLI turn) may take: the fleet's records need them


class WorkspaceError(RuntimeError):
    pass


class ProtectedPathError(WorkspaceError):
    pass


class TooLargeError(WorkspaceError):
    pass


class Workspace:
    def __init__(self, path: str | os.PathLike, protected: tuple[str, ...] = PROTECTED):
        self.path = Path(path)
        self.protected = protected
        self._env = {
            "GIT_AUTHOR_NAME": "enpire", "GIT_AUTHOR_EMAIL": "enpire@localhost",
            "GIT_COMMITTER_NAME": "enpire", "GIT_COMMITTER_EMAIL": "enpire@localhost",
            "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self._git("init", "--bare", "--quiet", f"--initial-branch={MAIN}")
            readme = "Policy workspace of an enpire fleet. One branch per agent; the champion is on main.\n"
            self.commit(MAIN, {"README.md": readme}, "workspace created", allow_empty_parent=True)

    def _git_bytes(self, *args: str, input: bytes | None = None, index: str | None = None) -> bytes:
        env = dict(self._env, GIT_DIR=str(self.path))
        if index:
            env["GIT_INDEX_FILE"] = index
        try:
            proc = subprocess.run(["git", *args], input=input, capture_output=True, env=env, timeout=GIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise WorkspaceError(f"git {args[0]}: no answer after {GIT_TIMEOUT_S:.0f} s (killed)") from None
        if proc.returncode != 0:
            raise WorkspaceError(f"git {args[0]}: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout

    def _git(self, *args: str, input: bytes | None = None, index: str | None = None) -> str:
        return self._git_bytes(*args, input=input, index=index).decode()

    def check_paths(self, paths) -> None:
        for p in paths:
            parts = Path(p).parts
            if Path(p).is_absolute() or ".." in parts or not parts:
                raise ProtectedPathError(f"path {p!r} leaves the workspace")
            if any(fnmatch.fnmatch(part.lower(), pat) for part in parts for pat in self.protected):
                raise ProtectedPathError(f"refused: {p!r} is a protected path (verifier, reset, seeds, safety, eval)")

    def head(self, branch: str) -> str | None:
        try:
            return self._git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}").strip() or None
        except WorkspaceError:
            return None

    def commit(self, branch: str, files: Mapping[str, str | bytes | None], message: str, *,
               allow_empty_parent=False) -> str:
        """Commit `files` (text, bytes, or None to delete) on top of `branch` (or main when the branch is new)."""
        self.check_paths(files)
        if len(files) > MAX_FILES:
            raise TooLargeError(f"a commit may change at most {MAX_FILES} files, not {len(files)}")
        blobs: dict[str, bytes | None] = {}
        for path, content in files.items():
            if isinstance(content, str):
                content = content.encode()
            elif content is not None and not isinstance(content, bytes):
                raise WorkspaceError(f"{path!r}: content must be str, bytes or None, not {type(content).__name__}")
            if content is not None and len(content) > MAX_FILE_BYTES:
                raise TooLargeError(f"{path!r} is {len(content)} bytes; a policy file may hold at most {MAX_FILE_BYTES}")
            blobs[path] = content
        incoming = sum(len(c) for c in blobs.values() if c is not None)
        if shutil.disk_usage(self.path).free - incoming < DISK_RESERVE:
            raise WorkspaceError(f"the disk is down to its last {DISK_RESERVE >> 20} MB: commit refused")
        parent = self.head(branch) or self.head(MAIN)
        if parent is None and not allow_empty_parent:
            raise WorkspaceError("workspace has no main branch")
        with tempfile.TemporaryDirectory() as tmp:
            index = str(Path(tmp) / "index")
            if parent:
                self._git("read-tree", parent, index=index)
            for path, content in blobs.items():
                if content is None:  # mode 0 removes the entry (--force-remove needs a work tree)
                    self._git("update-index", "--index-info", input=f"0 {'0' * 40}\t{path}\n".encode(), index=index)
                    continue
                blob = self._git("hash-object", "-w", "--stdin", input=content).strip()
                self._git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", index=index)
            tree = self._git("write-tree", index=index).strip()
        sizes = [int(line.split()[3]) for line in self._git("ls-tree", "-r", "-l", tree).splitlines()]
        if sum(sizes) > MAX_COMMIT_BYTES:
            raise TooLargeError(f"commit on {branch!r} would hold {sum(sizes)} bytes of files; at most {MAX_COMMIT_BYTES}")
        if len(sizes) > MAX_FILES:
            raise TooLargeError(f"commit on {branch!r} would hold {len(sizes)} files; at most {MAX_FILES}")
        args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
        commit = self._git(*args).strip()
        self._git("update-ref", f"refs/heads/{branch}", commit)
        return commit

    def read_bytes(self, commit: str) -> dict[str, bytes]:
        """All files of a commit, exactly as committed: what a cell runs (protected paths cannot be
        there: commits refuse them)."""
        names = self._git("ls-tree", "-r", "--name-only", "-z", commit).split("\0")
        return {n: self._git_bytes("cat-file", "blob", f"{commit}:{n}") for n in names if n}

    def read(self, commit: str) -> dict[str, str | bytes]:
        """All files of a commit: text (valid UTF-8) as str, anything else (checkpoints) as bytes.
        Committing a file back as read gives the same bytes either way."""
        files: dict[str, str | bytes] = {}
        for name, data in self.read_bytes(commit).items():
            try:
                files[name] = data.decode()
            except UnicodeDecodeError:
                files[name] = data
        return files

    def set_main(self, commit: str) -> None:
        """Point main at the champion's commit (promotion or rollback)."""
        self._git("update-ref", f"refs/heads/{MAIN}", commit)

    def log(self, branch: str, limit: int = 20) -> list[str]:
        return self._git("log", f"-{limit}", "--format=%h %s", branch).splitlines()

    # Reading aids for agents: any commit by (abbreviated) id, diffs, and patches applied as a commit.

    def resolve(self, ref: str) -> str:
        """The full id of a commit named by id (7+ hex digits) or branch; WorkspaceError when there is none."""
        if not ref or ref.startswith("-"):
            raise WorkspaceError(f"not a commit: {ref!r}")
        try:
            return self._git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()
        except WorkspaceError:
            raise WorkspaceError(f"no commit {ref!r} in the workspace") from None

    def diff(self, base: str, commit: str, paths: tuple[str, ...] = ()) -> str:
        """Unified diff from `base` to `commit` (binary files named, not shown)."""
        return self._git("diff", "--no-color", "--no-ext-diff", base, commit, "--", *paths)

    def show(self, commit: str) -> str:
        """Header (id, parents, message) and the diff a commit made to its first parent."""
        return self._git("show", "--no-color", "--no-ext-diff", "--format=commit %H%nparents %P%n%n%B", commit)

    def apply_patch(self, branch: str, patch: str, message: str) -> str:
        """Apply a unified diff to `branch` (or main when the branch is new) as one commit; the touched
        paths go through the same checks as `commit`."""
        parent = self.head(branch) or self.head(MAIN)
        with tempfile.TemporaryDirectory() as tmp:
            index = str(Path(tmp) / "index")
            self._git("read-tree", parent, index=index)
            names = self._git("apply", "--numstat", "-", input=patch.encode(), index=index).splitlines()
            self.check_paths([n.split("\t", 2)[2] for n in names if n.count("\t") >= 2])
            self._git("apply", "--cached", "--recount", "-", input=patch.encode(), index=index)
            tree = self._git("write-tree", index=index).strip()
            files = {}
            for line in self._git("diff-tree", "-r", "--name-only", "--no-commit-id", parent, tree).splitlines():
                try:
                    files[line] = self._git_bytes("cat-file", "blob", f"{tree}:{line}")
                except WorkspaceError:
                    files[line] = None  # deleted by the patch
        return self.commit(branch, files, message)

    def read_bytes_names(self, commit: str) -> list[str]:
        return [n for n in self._git("ls-tree", "-r", "--name-only", "-z", commit).split("\0") if n]

    def read_file(self, commit: str, path: str) -> bytes:
        """One file of a commit; WorkspaceError naming the path when it is not there."""
        try:
            return self._git_bytes("cat-file", "blob", f"{commit}:{path}")
        except WorkspaceError:
            raise WorkspaceError(f"no file {path!r} in commit {commit[:12]}") from None

    def sizes(self, commit: str) -> dict[str, int]:
        out = {}
        for line in self._git("ls-tree", "-r", "-l", commit).splitlines():
            meta, name = line.split("\t", 1)
            out[name] = int(meta.split()[3])
        return out
