import pytest

from enpire import workspace
from enpire.workspace import ProtectedPathError, TooLargeError, Workspace, WorkspaceError


def test_commits_on_agent_branches_are_policy_references(tmp_path):
    ws = Workspace(tmp_path / "ws")
    a = ws.commit("agent/a", {"policy.py": "A = 1\n"}, "a's policy")
    b = ws.commit("agent/b", {"policy.py": "B = 2\n", "lib/util.py": "X = 0\n"}, "b's policy")
    assert a != b
    assert ws.read(a)["policy.py"] == "A = 1\n"
    assert ws.read(b)["lib/util.py"] == "X = 0\n"
    a2 = ws.commit("agent/a", {"policy.py": "A = 3\n"}, "tune")
    assert ws.read(a2)["policy.py"] == "A = 3\n" and ws.read(a)["policy.py"] == "A = 1\n"
    ws.set_main(a2)
    assert ws.head("main") == a2


@pytest.mark.parametrize("path", ["verify.py", "verifier/state.py", "eval/run.py", "heldout_seeds.json",
                                  "safety_limits.toml", "reset.py", "../escape.py", "/abs.py", ".git/config"])
def test_protected_paths_are_refused(tmp_path, path):
    ws = Workspace(tmp_path / "ws")
    before = ws.head("main")
    with pytest.raises(ProtectedPathError):
        ws.commit("agent/a", {"policy.py": "ok\n", path: "evil\n"}, "sneaky")
    assert ws.head("agent/a") is None and ws.head("main") == before


def test_binary_files_round_trip_and_are_size_capped(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    weights = bytes(range(256)) * 4  # not UTF-8: stays bytes
    c = ws.commit("agent/a", {"policy.py": "P = 1\n", "weights.npz": weights}, "learned policy")
    assert ws.read_bytes(c) == {"README.md": ws.read_bytes(c)["README.md"], "policy.py": b"P = 1\n",
                                "weights.npz": weights}
    files = ws.read(c)
    assert files["policy.py"] == "P = 1\n" and files["weights.npz"] == weights
    # what was read commits back to the same tree
    again = ws.commit("agent/b", files, "copy")
    assert ws.read_bytes(again) == ws.read_bytes(c)
    with pytest.raises(ProtectedPathError):
        ws.commit("agent/a", {"verifier.npz": weights}, "sneaky binary")
    with pytest.raises(WorkspaceError, match="must be str, bytes or None"):
        ws.commit("agent/a", {"policy.py": 3}, "junk")
    monkeypatch.setattr(workspace, "MAX_FILE_BYTES", 1000)
    with pytest.raises(TooLargeError, match=r"'weights.npz' is 1024 bytes; a policy file may hold at most 1000"):
        ws.commit("agent/a", {"weights.npz": weights}, "too big")
    monkeypatch.setattr(workspace, "MAX_COMMIT_BYTES", 1500)
    head = ws.head("agent/a")
    with pytest.raises(TooLargeError, match="would hold"):
        ws.commit("agent/a", {"more.bin": weights[:900]}, "too much in all")  # 1024 inherited + 900
    assert ws.head("agent/a") == head


def test_a_commit_that_would_eat_into_the_disk_reserve_is_refused(tmp_path, monkeypatch):
    """An agent that commits large files in a loop stops at the reserve the fleet's records need."""
    import shutil

    ws = Workspace(tmp_path / "ws")
    ws.commit("main", {"policy.py": "x = 1\n"}, "template")
    monkeypatch.setattr(workspace, "DISK_RESERVE", shutil.disk_usage(tmp_path).free + (1 << 20))
    with pytest.raises(WorkspaceError, match="disk is down to its last"):
        ws.commit("agent/a", {"big.bin": bytes(1000)}, "fill")
    assert ws.head("agent/a") is None
