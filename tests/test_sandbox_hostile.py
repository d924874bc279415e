"""The attacks of issue #13 against the policy sandbox, one hostile policy file each (tests/adversarial/).

Each test fails on a sandbox that rests on the in-process audit hook (the hook is switched off from
policy code first where that matters) and passes with the isolation engine around the child.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from enpire import isolation
from enpire import sandbox_child as proto
from enpire.sandbox import CHILD_SCRIPT, PolicyError, PolicySandbox, SandboxLimits

pytestmark = pytest.mark.skipif(isolation.check() is not None, reason=f"no isolation engine: {isolation.check()}")

ADVERSARIAL = Path(__file__).parent / "adversarial"
LIMITS = SandboxLimits(load_timeout_s=5.0)


def hostile(name: str) -> dict[str, str]:
    """A hostile policy file as policy.py, with the hook-bypass helper next to it."""
    return {"policy.py": (ADVERSARIAL / f"{name}.py").read_text(),
            "hook_bypass.py": (ADVERSARIAL / "hook_bypass.py").read_text()}


def good() -> dict[str, str]:
    return {"policy.py": (ADVERSARIAL / "good.py").read_text()}


def first_action(sb: PolicySandbox, files: dict[str, str], limits_steps: int = 1) -> np.ndarray | str:
    try:
        sb.load(files, {})
        sb.reset()
    except PolicyError as e:
        return e.reason
    result = sb.act(np.zeros(5))
    return result.error or ("missed" if result.deadline_missed else result.action)  # type: ignore[return-value]


def sandbox_processes() -> set[int]:
    """Processes running this worktree's sandbox child script (the policy and anything it forked)."""
    found = set()
    marker = str(CHILD_SCRIPT).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes() and _state(entry) != "Z":
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


def _state(entry: Path) -> str:
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]


def test_hook_bypass_and_setsid_grandchild_die_with_the_episode(tmp_path: Path) -> None:
    before = sandbox_processes()
    with PolicySandbox(LIMITS, tmp_path / "scratch") as sb:
        action = first_action(sb, hostile("hook_bypass_setsid"))
        assert isinstance(action, np.ndarray) and action[0] == 256.0  # the bypass worked inside the child
        time.sleep(0.3)  # the grandchild is rewriting policy.py now
        # The next policy on this cell runs its own code, in a fresh jail and scratch.
        for _ in range(3):
            action = first_action(sb, good())
            assert isinstance(action, np.ndarray) and list(action) == [258.0, 256.0], action
    deadline = time.monotonic() + 5
    while sandbox_processes() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_processes() - before  # nothing of the sandbox outlived it


def test_stale_frame_flood_cannot_hold_off_the_deadline(tmp_path: Path) -> None:
    limits = SandboxLimits(act_timeout_s=0.1, load_timeout_s=5.0)
    with PolicySandbox(limits, tmp_path / "scratch") as sb:
        sb.load(hostile("stale_frame_flood"), {})
        sb.reset()
        results: list = []

        def episode() -> None:
            for _ in range(limits.max_missed_deadlines):
                t0 = time.monotonic()
                result = sb.act(np.zeros(5))
                results.append((result, time.monotonic() - t0))
                if result.error:
                    return

        worker = threading.Thread(target=episode, daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "act() never returned: the deadline did not fire"
        error = results[-1][0].error or ""
        assert error.startswith(("policy_timeout", "protocol_error: more than")), results
        assert all(secs < 2 * limits.act_timeout_s for _, secs in results), results


def test_bus_socket_is_neither_visible_nor_reachable(tmp_path: Path) -> None:
    """The layout of a fleet: state/bus.sock, cells' scratch in state/scratch/<cell>."""
    state = tmp_path / "state"
    (state / "scratch").mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(state / "bus.sock"))
    server.listen(8)
    server.settimeout(0.2)
    try:
        with PolicySandbox(LIMITS, state / "scratch" / "cell-0") as sb:
            action = first_action(sb, hostile("bus_connect"))
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    finally:
        server.close()
    assert isinstance(action, np.ndarray) and list(action) == [256.0, 256.0], action  # not connected, not seen


def test_a_policy_written_reason_is_capped_by_the_parent(tmp_path: Path) -> None:
    with PolicySandbox(LIMITS, tmp_path / "scratch") as sb:
        outcome = first_action(sb, hostile("huge_reason"))
    assert isinstance(outcome, str) and outcome.startswith("policy_error: AAAA")
    assert len(outcome) <= proto.MAX_REASON


def test_scratch_filling_stops_at_the_limit(tmp_path: Path) -> None:
    with PolicySandbox(SandboxLimits(load_timeout_s=10.0), tmp_path / "scratch") as sb:
        action = first_action(sb, hostile("scratch_fill"))
    assert isinstance(action, np.ndarray), action
    assert action[0] - 256.0 < 64  # MB it could write: the default scratch_mb
    host = sum(p.stat().st_size for p in (tmp_path / "scratch").rglob("*") if p.is_file())
    assert host < 1 << 20  # and none of it landed on the host's disk


def test_memfd_hoarding_hits_the_memory_limit(tmp_path: Path) -> None:
    limits = SandboxLimits(load_timeout_s=20.0, memory_mb=256)
    with PolicySandbox(limits, tmp_path / "scratch") as sb:
        outcome = first_action(sb, hostile("memfd_hoard"))
    assert isinstance(outcome, str) and outcome.startswith("memory_limit"), outcome


@pytest.mark.parametrize(("name", "expected"), [
    ("ignore_sigxcpu", "cpu_limit"),
    ("raise_memoryerror_subclass", "policy_error: OutOfIdeas"),
    ("complex_action", "safety_violation: action dtype complex128 is not real-valued"),
])
def test_reasons_name_what_happened(name: str, expected: str, tmp_path: Path) -> None:
    limits = SandboxLimits(load_timeout_s=5.0, cpu_seconds=1, act_timeout_s=30.0)  # CPU time, on a busy machine
    with PolicySandbox(limits, tmp_path / "scratch") as sb:
        outcome = first_action(sb, hostile(name))
    assert isinstance(outcome, str) and outcome.startswith(expected), outcome


def test_each_judging_gets_a_fresh_jail(tmp_path: Path) -> None:
    with PolicySandbox(LIMITS, tmp_path / "scratch") as sb:
        sb.load(good(), {})
        tuning = sb._proc.pid  # type: ignore[union-attr]
        sb.load(good(), {"step": 1.0})
        assert sb._proc.pid == tuning  # type: ignore[union-attr]  # same code, same context: reused
        sb.load(good(), {}, context="heldout:job-1")
        judging = sb._proc.pid  # type: ignore[union-attr]
        assert judging != tuning
        sb.load(good(), {}, context="heldout:job-2")
        assert sb._proc.pid != judging  # type: ignore[union-attr]
    assert not os.path.exists(f"/proc/{judging}") or _state(Path(f"/proc/{judging}")) == "Z"


def test_without_the_engine_untrusted_code_is_refused_unless_opted_out(tmp_path, monkeypatch, capsys):
    from enpire import fleet

    monkeypatch.setitem(isolation._checked, "result", "bubblewrap (bwrap) is not installed")
    with PolicySandbox(LIMITS, tmp_path / "scratch") as sb:
        with pytest.raises(PolicyError, match="^sandbox_unavailable: bubblewrap"):
            sb.load(good(), {})
    # The user's explicit opt-out runs it with the in-process layers only.
    with PolicySandbox(SandboxLimits(load_timeout_s=5.0, confined=False), tmp_path / "scratch") as sb:
        action = first_action(sb, good())
        assert isinstance(action, np.ndarray) and "bwrap" not in sb.isolation
    # The daemon says so in one line and exits 2 before touching its state dir.
    code = fleet.main(["--state-dir", str(tmp_path / "state"), "--cells", "1", "--agents", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bwrap" in err and "require_isolation" in err, err
    assert not (tmp_path / "state").exists()
