"""A CLI agent's worktree: created from its branch, published through the daemon, protected paths refused."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from enpire.agents.worktree import Worktree, WorktreeError
from enpire.workspace import ProtectedPathError, Workspace

TASK = {"name": "pusht", "driver": "pusht", "tuning_start": 0, "tuning_count": 100, "max_delta": 100.0}


def _git(path, *args):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(path), "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b",
           "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@b"}
    subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, env=env)


@pytest.fixture
def setup(tmp_path):
    ws = Workspace(tmp_path / "workspace")
    base = ws.commit("main", {"policy.py": "class Policy: pass\n"}, "template")
    wt = Worktree(tmp_path / "wt", "agent-0")
    wt.create(ws.read_bytes(base), base, {"AGENTS.md": "rules", "CLAUDE.md": "rules"}, TASK)
    return ws, wt


def test_publish_commits_the_worktree_head_on_the_agents_branch(setup):
    ws, wt = setup
    assert (wt.path / "AGENTS.md").read_text() == "rules" and (wt.path / ".enpire" / "task.json").is_file()
    assert (wt.path / "recipes" / "bc.py").is_file()
    assert wt.publish(ws, "agent/agent-0") is None  # the start is the branch's head: nothing to publish
    (wt.path / "policy.py").write_text("class Policy:\n    gain = 2\n")
    (wt.path / "AGENTS.md").write_text("the agent rewrote its rules")  # the daemon's file: never published
    _git(wt.path, "commit", "-qam", "gain 2")
    local, remote = wt.publish(ws, "agent/agent-0")
    files = ws.read(remote)
    assert files["policy.py"] == "class Policy:\n    gain = 2\n" and "AGENTS.md" not in files
    assert "recipes/bc.py" in files and not any(p.startswith(".enpire") for p in files)  # its own recipes
    assert ws.head("agent/agent-0") == remote and "gain 2" in ws.log("agent/agent-0")[0]
    assert wt.publish(ws, "agent/agent-0") is None  # nothing new
    assert wt.resolve(local[:10]) == remote and wt.resolve("abc") is None
    _git(wt.path, "rm", "-q", "recipes/rl.py")
    _git(wt.path, "commit", "-qm", "drop rl")
    _, after = wt.publish(ws, "agent/agent-0")
    assert "recipes/rl.py" not in ws.read(after)


def test_protected_paths_are_refused_and_the_branch_stays(setup):
    ws, wt = setup
    wt.publish(ws, "agent/agent-0")
    before = ws.head("agent/agent-0")
    (wt.path / "verifier.py").write_text("def verify(*a): return True\n")
    _git(wt.path, "add", "verifier.py")
    _git(wt.path, "commit", "-qm", "always succeed")
    with pytest.raises(ProtectedPathError, match="verifier.py"):
        wt.publish(ws, "agent/agent-0")
    assert ws.head("agent/agent-0") == before


def test_a_redirected_git_directory_is_refused(setup, tmp_path):
    ws, wt = setup
    (wt.path / ".git" / "objects" / "info").mkdir(parents=True, exist_ok=True)
    (wt.path / ".git" / "objects" / "info" / "alternates").write_text(str(ws.path / "objects"))
    with pytest.raises(WorktreeError, match="alternates"):
        wt.publish(ws, "agent/agent-0")
    (wt.path / ".git" / "objects" / "info" / "alternates").unlink()
    (wt.path / ".git").rename(tmp_path / "moved")
    (wt.path / ".git").symlink_to(tmp_path / "moved")
    with pytest.raises(WorktreeError, match="not a plain git directory"):
        wt.publish(ws, "agent/agent-0")


def test_symlinks_are_not_published(setup):
    ws, wt = setup
    (wt.path / "link.py").symlink_to("/etc/passwd")
    _git(wt.path, "add", "link.py")
    _git(wt.path, "commit", "-qm", "a link")
    with pytest.raises(WorktreeError, match="only regular files"):
        wt.publish(ws, "agent/agent-0")


def test_many_paths_to_one_blob_are_refused_before_their_contents_are_read(setup, monkeypatch):
    """40 paths to one 1 MB blob cost the agent 1 MB on disk and would cost the daemon 40 MB in memory:
    publishing refuses it from the tree's sizes, and reads no content."""
    ws, wt = setup
    wt.publish(ws, "agent/agent-0")
    before = ws.head("agent/agent-0")
    blob = bytes(range(256)) * 4096
    for i in range(40):
        (wt.path / f"copy{i}.bin").write_bytes(blob)
    _git(wt.path, "add", "-A")
    _git(wt.path, "commit", "-qm", "forty copies")
    calls = []
    real = Worktree.git
    monkeypatch.setattr(Worktree, "git", lambda self, *args, **kw: calls.append(args[0]) or real(self, *args, **kw))
    monkeypatch.setattr("enpire.agents.worktree.MAX_COMMIT_BYTES", 16 << 20)
    with pytest.raises(WorktreeError, match="more than"):
        wt.publish(ws, "agent/agent-0")
    assert "cat-file" not in calls and ws.head("agent/agent-0") == before
    for i in range(40):  # and once the files are gone, the next commit publishes normally, in one read
        (wt.path / f"copy{i}.bin").unlink()
    (wt.path / "policy.py").write_text("class Policy:\n    gain = 3\n")
    _git(wt.path, "add", "-A")
    _git(wt.path, "commit", "-qm", "gain 3")
    calls.clear()
    _, remote = wt.publish(ws, "agent/agent-0")
    assert ws.read(remote)["policy.py"] == "class Policy:\n    gain = 3\n" and calls.count("cat-file") == 1
    assert ws.read(remote)["recipes/bc.py"] == (wt.path / "recipes" / "bc.py").read_text()


def test_a_commit_of_more_files_than_a_policy_may_hold_is_refused(tmp_path):
    from enpire.workspace import MAX_FILES, TooLargeError

    ws = Workspace(tmp_path / "ws")
    ws.commit("main", {"policy.py": "x = 1\n"}, "template")
    with pytest.raises(TooLargeError, match=f"at most {MAX_FILES} files"):
        ws.commit("agent/a", {f"f{i}.py": "" for i in range(MAX_FILES + 1)}, "too many")
    assert ws.head("agent/a") is None


def test_a_blob_removed_from_the_worktrees_objects_is_refused(setup):
    ws, wt = setup
    (wt.path / "policy.py").write_text("class Policy:\n    gain = 4\n")
    _git(wt.path, "commit", "-qam", "gain 4")
    sha = subprocess.run(["git", "-C", str(wt.path), "rev-parse", "HEAD:policy.py"], capture_output=True,
                         text=True, check=True).stdout.strip()
    (wt.path / ".git" / "objects" / sha[:2] / sha[2:]).unlink()
    with pytest.raises(WorktreeError, match="missing"):
        wt.publish(ws, "agent/agent-0")


def test_rewriting_the_daemons_files_follows_no_link_the_agent_planted(setup, tmp_path):
    """On a restart the daemon rewrites AGENTS.md, CLAUDE.md, .enpire/task.json and .git/info/exclude in
    the worktree. Links the agent put in their place (they resolve in the daemon's file system, not the
    jail's) are replaced, never written through."""
    ws, wt = setup
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("records.mdb", "task.json", "exclude"):
        (victims / name).write_text("precious")
    (wt.path / "AGENTS.md").unlink()
    (wt.path / "AGENTS.md").symlink_to(victims / "records.mdb")
    (wt.path / "CLAUDE.md").unlink()
    (wt.path / "CLAUDE.md").mkdir()  # a directory where a file goes
    for sub in (wt.path / ".enpire", wt.path / ".git" / "info"):
        for child in sub.iterdir():
            child.unlink()
        sub.rmdir()
        sub.symlink_to(victims)
    wt.write_docs({"AGENTS.md": "rules 2", "CLAUDE.md": "rules 2"}, TASK)
    assert all((victims / name).read_text() == "precious" for name in ("records.mdb", "task.json", "exclude"))
    assert (wt.path / "AGENTS.md").read_text() == "rules 2" and not (wt.path / "AGENTS.md").is_symlink()
    assert (wt.path / "CLAUDE.md").read_text() == "rules 2"
    assert json.loads((wt.path / ".enpire" / "task.json").read_text()) == TASK
    assert not (wt.path / ".enpire").is_symlink() and not (wt.path / ".git" / "info").is_symlink()
    assert "/AGENTS.md" in (wt.path / ".git" / "info" / "exclude").read_text()
    (wt.path / ".git").rename(tmp_path / "moved-git")
    (wt.path / ".git").symlink_to(tmp_path / "moved-git")  # and a linked .git is refused before any write
    (victims / "info").mkdir()
    with pytest.raises(WorktreeError, match="not a plain git directory"):
        wt.write_docs({"AGENTS.md": "rules 3"}, TASK)
    assert (wt.path / "AGENTS.md").read_text() == "rules 2" and (victims / "info").is_dir()


def test_a_worktree_whose_git_the_agent_removed_starts_anew_without_following_its_links(setup, tmp_path):
    ws, wt = setup
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    shutil.rmtree(wt.path / ".git")
    (wt.path / "policy.py").unlink()
    (wt.path / "policy.py").symlink_to(victim)
    shutil.rmtree(wt.path / "recipes")
    (wt.path / "recipes").symlink_to(tmp_path)
    base = ws.head("main")
    wt.create(ws.read_bytes(base), base, {"AGENTS.md": "rules"}, TASK)  # what a restart does here
    assert victim.read_text() == "precious" and not (tmp_path / "bc.py").exists()
    assert (wt.path / "policy.py").read_text() == "class Policy: pass\n" and (wt.path / "recipes" / "bc.py").is_file()
