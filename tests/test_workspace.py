import pytest

from enpire.workspace import ProtectedPathError, Workspace


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
