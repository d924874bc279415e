"""The policy sandbox against hostile policies, and the cell-side action checks.

Each adversarial policy in tests/adversarial/ runs a short episode (obs = zeros(5), 20 steps) through
PolicySandbox + check_action, the way a cell runs one. The outcome must name what happened, the test
process (standing in for the cell) must survive, the same sandbox must load the good policy afterwards,
and the fake API key in our environment must not show up anywhere the policy could put it.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from enpire.safety import ActionLimits, check_action
from enpire.sandbox import PolicyError, PolicySandbox, SandboxLimits, without_credentials

ADVERSARIAL = Path(__file__).parent / "adversarial"
FAKE_KEY = "sk-ant-test-DO-NOT-LEAK-0123456789"
STATE_SECRET = "state-dir-secret-42"
LIMITS = ActionLimits(dim=2, low=0.0, high=512.0, max_delta=100.0)
FAST = SandboxLimits(load_timeout_s=3.0)  # keeps the slow-import case short (a jail starts in ~0.3 s)


def policy_files(name: str) -> dict[str, str]:
    return {"policy.py": (ADVERSARIAL / f"{name}.py").read_text()}


def run_episode(sb: PolicySandbox, files: dict[str, str], steps: int = 20) -> tuple[str, np.ndarray | None]:
    """A cell's loop against a trivial fake environment: (outcome, last executed action)."""
    executed: np.ndarray | None = None
    try:
        sb.load(files, {})
        sb.reset()
    except PolicyError as exc:
        return exc.reason, None
    for _ in range(steps):
        result = sb.act(np.zeros(5))
        if result.deadline_missed:
            continue  # the cell holds `executed`
        if result.error:
            return result.error, executed
        reason = check_action(result.action, executed, LIMITS)
        if reason:
            return reason, executed
        executed = result.action
    return "ok", executed


@pytest.fixture(autouse=True)
def fake_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    (state / "secret.txt").write_text(STATE_SECRET)
    return state


def assert_no_leak(state: Path) -> None:
    for path in state.rglob("*"):
        if path.is_file() and path.name != "secret.txt":
            text = path.read_bytes()
            assert FAKE_KEY.encode() not in text and STATE_SECRET.encode() not in text, path


CASES = [
    ("good", "ok"),
    ("loop_act", "policy_timeout: 3 consecutive replies"),
    ("loop_import", "policy_timeout: load took longer"),
    ("fork", "sandbox_denied: os.fork"),
    ("subprocess_run", "sandbox_denied: subprocess.Popen"),
    ("socket_connect", "sandbox_denied: socket."),
    ("memory_hog", "memory_limit: MemoryError"),
    ("raises", "policy_error: RuntimeError: gripper model diverged"),
    ("nan_action", "safety_violation: action non-finite"),
    ("out_of_bounds", "safety_violation: action out of bounds"),
    ("wrong_shape", "safety_violation: action shape (3,) != (2,)"),
    ("huge_output", "output_too_large"),
    ("steal_key_env", "ok"),
    ("steal_key_proc", "sandbox_denied: open /proc/"),
    ("patch_verifier", "sandbox_denied: import enpire"),
    ("patch_simulator", "ok"),
    ("write_outside", "sandbox_denied: open"),
    ("read_state", "sandbox_denied: open"),
    ("kill_parent", "sandbox_denied: os.kill"),
    ("exit_process", "policy_crashed (exit code 7)"),
    ("tamper_hook", "sandbox_denied: gc.get_objects"),
]


@pytest.mark.parametrize(("name", "expected"), CASES, ids=[c[0] for c in CASES])
def test_adversarial_policy(name: str, expected: str, state: Path) -> None:
    with PolicySandbox(FAST, state / "scratch") as sb:
        outcome, action = run_episode(sb, policy_files(name))
        assert outcome.startswith(expected), outcome
        os.kill(os.getpid(), 0)  # we (the cell) are still here
        assert_no_leak(state)
        if name == "steal_key_env":
            assert action is not None and list(action) == [256.0, 256.0]  # the key was not in its env
        if name == "write_outside":
            assert not (state / "outside.txt").exists()
            assert not Path("/tmp/enpire_sandbox_pwned.txt").exists()
        if name == "read_state":  # "../secret.txt" from the jail's scratch: not the state dir's file
            assert "/secret.txt" in outcome
        # The same sandbox recovers: the good policy loads and runs a clean episode.
        outcome, action = run_episode(sb, policy_files("good"))
        assert outcome == "ok" and action is not None and action[0] == 256.0 + 2.0 * 20


def test_cpu_limit_ends_a_runaway_import(state: Path) -> None:
    limits = SandboxLimits(cpu_seconds=1, load_timeout_s=8.0)
    with PolicySandbox(limits, state / "scratch") as sb:
        outcome, _ = run_episode(sb, policy_files("loop_import"))
        assert outcome == "cpu_limit"


def test_simulator_patch_stays_in_the_sandbox(state: Path) -> None:
    import pymunk
    from gym_pusht.envs import pusht

    step, coverage = pymunk.Space.step, pusht.PushTEnv._get_coverage
    with PolicySandbox(FAST, state / "scratch") as sb:
        outcome, action = run_episode(sb, policy_files("patch_simulator"))
    assert outcome == "ok" and action is not None and action[1] == 257.0  # it did patch its own copies
    assert pymunk.Space.step is step and pusht.PushTEnv._get_coverage is coverage
    space = pymunk.Space()
    body = pymunk.Body(1.0, 1.0)
    body.velocity = (10.0, 0.0)
    space.add(body, pymunk.Circle(body, 1.0))
    space.step(0.1)
    assert body.position.x > 0.5  # the cell's physics still moves things


def test_isolation_layers_reported(state: Path) -> None:
    with PolicySandbox(FAST, state / "scratch") as sb:
        sb.load(policy_files("good"), {})
        assert "rlimits" in sb.isolation and "audit_hook" in sb.isolation


# ----------------------------------------------------------------------------- kernel layer


KERNEL_CASES = [
    ("socket_connect", "policy_error: PermissionError"),
    ("read_state", "policy_error: FileNotFoundError"),  # the jail does not even show it
    ("subprocess_run", "policy_error: PermissionError"),
    ("kill_parent", "policy_error: PermissionError"),
    ("write_outside", "ok"),  # it swallows the errors; the files must still not exist
    ("steal_key_proc", "ok"),  # likewise: nothing read
]


@pytest.mark.parametrize(("name", "expected"), KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_layer_holds_without_the_audit_hook(name: str, expected: str, state: Path) -> None:
    """Landlock (+ netns) must contain the attacks on its own, as if the audit hook were bypassed."""
    with PolicySandbox(FAST, state / "scratch", _audit_hook=False) as sb:
        sb.load(policy_files("good"), {})
        abi = max(
            (
                int(layer.removeprefix("landlock-abi"))
                for layer in sb.isolation
                if layer.startswith("landlock-abi")
            ),
            default=0,
        )
        if abi < (6 if name == "kill_parent" else 4):
            pytest.skip(f"Landlock ABI {abi} on this kernel: {sb.isolation}")
        outcome, action = run_episode(sb, policy_files(name))
        assert outcome.startswith(expected), outcome
        assert not (state / "outside.txt").exists()
        if name == "steal_key_proc":
            assert action is not None and list(action) == [256.0, 256.0]  # read 0 bytes
        assert_no_leak(state)


# ----------------------------------------------------------------------------- protocol


ECHO = """
import time
class Policy:
    def __init__(self, params):
        self.slow_at = params.get("slow_at", -1.0)
        self.flipped = False
    def on_failure(self, info):
        self.flipped = info.get("attempt") == 1
    def act(self, obs):
        if obs[0] == self.slow_at:
            time.sleep(0.15)
        return [obs[0], -1.0 if self.flipped else 0.0]
"""


def test_late_reply_is_not_taken_for_the_next_step(state: Path) -> None:
    with PolicySandbox(SandboxLimits(act_timeout_s=0.1), state / "scratch") as sb:
        sb.load({"policy.py": ECHO}, {"slow_at": 3.0})
        sb.reset()
        missed = []
        for t in range(8):
            result = sb.act(np.full(5, float(t)))
            assert result.error is None
            if result.deadline_missed:
                missed.append(t)
            else:
                assert result.action is not None and result.action[0] == t  # the answer to *this* step
        assert missed and missed[0] == 3


def test_reload_restarts_only_for_new_code(state: Path) -> None:
    with PolicySandbox(FAST, state / "scratch") as sb:
        sb.load({"policy.py": ECHO}, {})
        pid = sb._proc.pid  # type: ignore[union-attr]
        sb.load({"policy.py": ECHO}, {"slow_at": 5.0})  # new params, same code: same process
        assert sb._proc.pid == pid  # type: ignore[union-attr]
        sb.notify_failure({"attempt": 1})
        assert sb.act(np.zeros(5)).action[1] == -1.0  # type: ignore[index]
        sb.load({"policy.py": ECHO + "\n# v2\n"}, {})
        assert sb._proc.pid != pid  # type: ignore[union-attr]
        new_pid = sb._proc.pid  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(new_pid, 0)  # close() killed and reaped it


def test_warm_spare_takes_over_a_new_version_and_dies_with_the_sandbox(state: Path) -> None:
    """A cell's sandbox keeps the next child started; a new version (or judging) runs in it, it never
    ran anything before, and a spare that died while waiting is replaced, not blamed on the policy."""
    talker = ECHO + "\nimport sys\nprint('loaded', __name__, file=sys.stderr)\n"
    with PolicySandbox(FAST, state / "scratch", keep_spare=True) as sb:
        sb.load({"policy.py": talker}, {})
        first = sb._proc.pid  # type: ignore[union-attr]
        spare = sb._spare.result().proc  # type: ignore[union-attr]
        assert spare.pid != first and spare.poll() is None
        sb.load({"policy.py": talker + "# v2\n"}, {})
        assert sb._proc.pid == spare.pid  # type: ignore[union-attr]  # the spare took over
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # the old version is gone
        sb.reset()
        assert sb.act(np.zeros(5)).action is not None
        assert "loaded policy" in sb.stderr_tail()  # the current child's log, not the spare's

        doomed = sb._spare.result().proc  # type: ignore[union-attr]
        doomed.kill()
        doomed.wait()
        sb.load({"policy.py": talker}, {}, context="heldout:job-1")  # a judging: a fresh child all the same
        assert sb._proc.pid not in (doomed.pid, spare.pid)  # type: ignore[union-attr]
        sb.reset()
        assert sb.act(np.zeros(5)).action is not None
        pids = [sb._proc.pid, sb._spare.result().proc.pid]  # type: ignore[union-attr]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # close() stopped the child and the spare


def test_close_tells_a_failure_to_stop_and_still_stops_the_rest(state: Path, monkeypatch) -> None:
    """close() does not hide a child it could not stop; the others are stopped all the same."""
    import enpire.sandbox as sandbox

    sb = PolicySandbox(FAST, state / "scratch", keep_spare=True)
    sb.load({"policy.py": ECHO}, {})
    child, spare = sb._proc, sb._spare.result().proc  # type: ignore[union-attr]
    real_stop = sandbox._stop

    def stop(proc, confined):
        if proc is child:
            raise OSError("cannot stop it")
        real_stop(proc, confined)

    monkeypatch.setattr(sandbox, "_stop", stop)
    with pytest.raises(OSError, match="cannot stop it"):
        sb.close()
    assert spare.poll() is not None and sb._spawner is None  # the spare and the spawner went anyway
    real_stop(child, FAST.confined)


def test_child_outlives_the_thread_that_loaded_it(state: Path) -> None:
    """A cell loads policies from pool threads that end when idle; the jail's die-with-parent fires when the
    thread that started it ends, so the sandbox starts children from a thread of its own."""
    import threading

    with PolicySandbox(FAST, state / "scratch") as sb:
        loader = threading.Thread(target=sb.load, args=({"policy.py": ECHO}, {}))
        loader.start()
        loader.join()
        pid = sb._proc.pid  # type: ignore[union-attr]
        time.sleep(0.5)  # the parent-death signal, had it fired, has killed the jail by now
        sb.reset()
        assert sb.act(np.zeros(5)).action is not None
        assert sb._proc.pid == pid  # type: ignore[union-attr]


def test_load_errors_are_reasons(state: Path) -> None:
    with PolicySandbox(FAST, state / "scratch") as sb:
        with pytest.raises(PolicyError, match="^policy_error: SyntaxError"):
            sb.load({"policy.py": "class Policy(:\n"}, {})
        with pytest.raises(PolicyError, match="^policy_error: ModuleNotFoundError"):
            sb.load({"policy.py": "import no_such_module_xyz\n"}, {})
        with pytest.raises(PolicyError, match="bad file name"):
            sb.load({"policy.py": ECHO, "../escape.py": ""}, {})
        # Helper modules next to policy.py import normally.
        sb.load(
            {
                "policy.py": "from helper import K\n" + ECHO.replace("obs[0],", "obs[0] + K,"),
                "helper.py": "K = 1.0\n",
            },
            {},
        )
        sb.reset()
        assert sb.act(np.zeros(5)).action[0] == 1.0  # type: ignore[index]


WEIGHTED = """
import numpy as np


class Policy:
    def __init__(self, params):
        with np.load("weights.npz", allow_pickle=False) as data:
            self.target = data["target"]

    def act(self, obs):
        return self.target
"""


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_binary_files_reach_the_policy_exactly(state: Path) -> None:
    blob = _npz(target=np.array([300.0, 200.0]))
    with PolicySandbox(FAST, state / "scratch") as sb:
        outcome, action = run_episode(sb, {"policy.py": WEIGHTED.encode(), "weights.npz": blob})
        assert outcome == "ok" and list(action) == [300.0, 200.0]  # type: ignore[arg-type]
        # pickled arrays are data the policy refuses to unpickle, not code it runs
        pickled = _npz(target=np.array([{"x": 1}], dtype=object))
        outcome, _ = run_episode(sb, {"policy.py": WEIGHTED.encode(), "weights.npz": pickled})
        assert outcome.startswith("policy_error: ValueError") and "allow_pickle" in outcome, outcome
    small = SandboxLimits(load_timeout_s=1.0, max_file_bytes=len(blob) - 1)
    with PolicySandbox(small, state / "scratch") as sb:
        with pytest.raises(PolicyError, match=rf"file 'weights.npz' is {len(blob)} bytes, more than"):
            sb.load({"policy.py": WEIGHTED.encode(), "weights.npz": blob}, {})


def test_parent_caps_forged_frames(state: Path) -> None:
    """The policy can write to the reply pipe itself; the parent still enforces size and sequence."""
    forge = """
import os
class Policy:
    def __init__(self, params):
        self.mode = params["mode"]
    def act(self, obs):
        if self.mode == 0:
            os.write(4, (10**9).to_bytes(4, "big"))  # claims a 1 GB frame
        return [256.0, 256.0]
"""
    with PolicySandbox(FAST, state / "scratch") as sb:
        sb.load({"policy.py": forge}, {"mode": 0.0})
        sb.reset()
        assert (sb.act(np.zeros(5)).error or "").startswith("output_too_large: reply frame")
        sb.load({"policy.py": forge}, {"mode": 1.0})
        sb.reset()
        assert sb.act(np.zeros(5)).action is not None


def test_print_flood_does_not_block(state: Path) -> None:
    flood = "class Policy:\n def __init__(self, p): pass\n def act(self, obs):\n  print('x' * 100000)\n  return [1.0, 1.0]\n"
    with PolicySandbox(SandboxLimits(max_file_bytes=1 << 20), state / "scratch") as sb:
        sb.load({"policy.py": flood}, {})
        sb.reset()
        t0 = time.monotonic()
        outcomes = [sb.act(np.zeros(5)) for _ in range(15)]
        assert time.monotonic() - t0 < 5
        assert any((r.error or "").startswith("policy_error: OSError") for r in outcomes)  # file too large
        assert sb._stderr_path().stat().st_size <= 1 << 20


# ----------------------------------------------------------------------------- check_action


def test_check_action_reasons() -> None:
    lim = ActionLimits(dim=2, low=[0.0, 0.0], high=[512.0, 512.0], max_delta=100.0)
    assert check_action([10, 20], None, lim) is None
    assert check_action(np.array([10.0, 20.0], dtype=np.float32), np.array([0.0, 0.0]), lim) is None
    assert check_action([1, 2, 3], None, lim) == "safety_violation: action shape (3,) != (2,)"
    assert "non-finite" in (check_action([np.inf, 0], None, lim) or "")
    unbounded = ActionLimits(dim=2, low=-np.inf, high=np.inf)  # no bound may let inf or NaN through
    assert "non-finite" in (check_action([np.inf, 0], None, unbounded) or "")
    assert "non-finite" in (check_action([0, np.nan], None, unbounded) or "")
    assert "out of bounds" in (check_action([-1, 0], None, lim) or "")
    assert check_action([250, 0], np.array([106.8, 0.0]), lim) == "safety_violation: step change 143.2 > 100"
    assert "not real-valued" in (check_action("ab", None, lim) or "")
    assert "not real-valued" in (check_action([True, False], None, lim) or "")
    assert "not real-valued" in (check_action([10**30, 0], None, lim) or "")
    assert check_action([[1, 2], [3]], None, lim) is not None
    assert check_action(object(), None, lim) is not None


junk = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.lists(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=2), st.none()), max_size=4),
    st.lists(st.lists(st.floats(), max_size=3), max_size=3),
    hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=3)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(action=junk, previous=st.one_of(st.none(), hnp.arrays(np.float64, st.integers(0, 3))))
def test_check_action_never_raises(action: object, previous: np.ndarray | None) -> None:
    reason = check_action(action, previous, LIMITS)
    assert reason is None or reason.startswith("safety_violation: ")
    if reason is None:  # anything accepted really is a finite in-bounds 2-vector
        a = np.asarray(action, dtype=np.float64)
        assert a.shape == (2,) and np.all(np.isfinite(a)) and np.all((a >= 0) & (a <= 512))


# ----------------------------------------------------------------------------- act fast path

PROBE = """
import numpy as np
class Policy:
    def __init__(self, params):
        pass
    def act(self, obs):
        obs[0] += 1  # the observation is the policy's own writable copy
        kind = 1.0 if (obs.dtype == np.float64 and obs.flags.writeable and obs.flags.c_contiguous) else 0.0
        if obs.ndim == 2:
            return np.array([obs.shape[0], obs.shape[1]], dtype=np.int32)  # a non-float64 action
        return [float(obs[0]), kind + 10.0 * float(obs.dtype.itemsize)]
"""


@pytest.mark.parametrize("spin_us", [0.0, 300.0])
def test_act_frames_round_trip(state: Path, spin_us: float) -> None:
    """Binary frames for 1-D float64, msgpack for everything else: the policy sees the same array."""
    with PolicySandbox(SandboxLimits(spin_us=spin_us), state / "scratch") as sb:
        sb.load({"policy.py": PROBE}, {})
        sb.reset()
        obs = np.arange(5.0)
        for t in range(50):  # enough steps for the adaptive spin to engage
            obs[0] = t
            action = sb.act(obs).action
            assert action is not None and action.dtype == np.float64
            assert list(action) == [t + 1.0, 81.0]
        assert obs[0] == 49.0  # the child's edit did not reach our array
        strided = np.arange(10.0)[::2]  # non-contiguous float64
        assert list(sb.act(strided).action) == [1.0, 81.0]  # type: ignore[arg-type]
        assert list(sb.act(np.zeros(5, dtype=np.float32)).action) == [1.0, 40.0]  # type: ignore[arg-type]
        image = sb.act(np.zeros((3, 4), dtype=np.uint8)).action
        assert image is not None and image.dtype == np.int32 and list(image) == [3, 4]
        assert sb.act(np.zeros(5)).action is not None  # and the fast path still works after that


def test_parent_rejects_forged_binary_frames(state: Path) -> None:
    """A policy writing raw binary action frames cannot get a malformed or future reply accepted."""
    forge = """
import os, struct
class Policy:
    def __init__(self, params):
        self.mode = params["mode"]
        self.n = 0
    def act(self, obs):
        self.n += 1
        if self.mode == 0:  # a payload that is not a whole number of float64s
            os.write(4, struct.pack(">IBQ", 9 + 5, 0xC1, 10**6) + b"12345")
        elif self.mode == 1:  # a well-formed frame answering a request not sent yet
            os.write(4, struct.pack(">IBQ", 9 + 16, 0xC1, 10**6) + struct.pack("<2d", 1.0, 2.0))
        return [256.0, 256.0]
"""
    with PolicySandbox(FAST, state / "scratch") as sb:
        sb.load({"policy.py": forge}, {"mode": 0.0})
        sb.reset()
        assert (sb.act(np.zeros(5)).error or "").startswith("protocol_error: ValueError: binary frame")
        sb.load({"policy.py": forge}, {"mode": 1.0})
        sb.reset()
        assert (sb.act(np.zeros(5)).error or "").startswith("protocol_error: reply for request")


def test_without_credentials_drops_every_credential_like_variable() -> None:
    environ = {"PATH": "/bin", "OPENAI_API_KEY": "k", "hf_token": "t", "ENPIRE_SECRET": "s", "DB_PASSWORD": "p",
               "MY_MODEL_KEY_FILE": "/x", "CUSTOM": "c"}
    assert without_credentials(environ, "CUSTOM") == {"PATH": "/bin", "MY_MODEL_KEY_FILE": "/x"}
