"""Parent side of the policy sandbox: run agent-written policy code in a confined child process.

The cell (trusted) owns the simulator and the verifier; the policy only ever sees observations and only
ever returns actions, over a pipe. Everything the child sends is untrusted: frames are size-capped,
decoded into typed structs, matched by sequence number, and every action still goes through
`enpire.safety.check_action` in the cell.

The child runs in a jail of the isolation engine (`enpire/isolation.py`, bubblewrap): its own PID,
mount, IPC and network namespaces, a seccomp filter, a cgroup capping memory (memfds and scratch
included) and processes, and a fresh size-limited tmpfs as scratch. A new jail (process and scratch)
for each policy version and each judging, so nothing one policy leaves behind, not even a process,
reaches the next one. The audit hook inside the child is only a friendly early error.
`SandboxLimits(confined=False)` runs the child without the jail: only where the user opted out.

Synchronous by design: a cell drives one `PolicySandbox` from its episode thread. Not thread-safe.
The child is started from a thread the sandbox owns: the jail's `--die-with-parent` is
PR_SET_PDEATHSIG, which fires when the *thread* that started it ends, and the caller's thread may be
a pool worker that ends when idle (trio's end after 10 s), which would kill a child kept for the next
episode.
See `enpire/sandbox_child.py` for the layers inside the child.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import msgspec
import numpy as np

from enpire import isolation
from enpire import sandbox_child as proto

CHILD_SCRIPT = Path(proto.__file__).resolve()
STDERR_NAME = ".sandbox-stderr-{}.log"  # a child's stderr/print output (per slot), next to its scratch, size-capped
JAIL_SCRATCH = Path("/tmp")  # the jail's tmpfs, as the child sees it
MAX_STALE_FRAMES = 1000  # late replies skipped in one wait (an honest child sends one per missed step)
_LOCALE_VARS = ("LANG", "LC_ALL", "LC_CTYPE")
F_SETPIPE_SZ = 1031  # Linux fcntl
PIPE_BYTES = 1 << 20


class SandboxLimits(msgspec.Struct, frozen=True, kw_only=True):
    act_timeout_s: float = 0.05  # one act() reply; later than this the cell holds its last safe action
    max_missed_deadlines: int = 3  # consecutive misses before the episode ends as `policy_timeout`
    load_timeout_s: float = 10.0  # process start + imports + Policy(params); covers slow imports
    call_timeout_s: float = 1.0  # reset() and on_failure()
    cpu_seconds: int = 300  # RLIMIT_CPU over the child's life; the child is recycled at half of it
    memory_mb: int = 1024  # RLIMIT_AS
    max_output_bytes: int = 1 << 20  # cap on one reply frame
    max_files: int = 64  # RLIMIT_NOFILE
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: caps scratch files and the stderr log
    scratch_mb: int = 64  # the jail's tmpfs scratch (all files together); counts toward its memory too
    pids: int = 16  # processes + threads in the jail
    confined: bool = True  # run in the isolation engine; False only where the user opted out
    # Busy-wait budget (µs) before blocking on the pipe, on both sides: the cell waiting for an action,
    # the child waiting for the next observation. Adaptive: a side spins only while its recent waits
    # fit in the budget (see sandbox_child.Waiter). 0 = always block. It pays only when the cell and its
    # child run on different, otherwise idle cores; on a shared 2-core VM the scheduler mostly puts
    # both on one core, where spinning made the 1- and 2-cell rollouts slower (bench/rollout.py), so
    # the default blocks. Try 100-300 on a machine with a spare core per cell (bench/sandbox_ipc.py).
    spin_us: float = 0.0


class PolicyError(Exception):
    """The policy could not be loaded/reset; `reason` is a verdict reason ("policy_error: ...")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ActResult:
    """Exactly one of: an action, a missed deadline (hold the last safe action), or a terminal error."""

    action: np.ndarray | None = None
    deadline_missed: bool = False
    error: str | None = None  # verdict reason; the episode ends, the sandbox restarts on next load/reset
    latency_s: float = 0.0


class _Terminal(Exception):
    """Internal: the child can no longer be trusted to answer; it gets killed."""


CREDENTIAL_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")


def without_credentials(environ: Mapping[str, str], *also: str) -> dict[str, str]:
    """`environ` minus every credential-like variable (`*_KEY`, `*_TOKEN`, `*_SECRET`, `*_PASSWORD`, and
    the names in `also`): for trusted helper processes (cells, training recipes) that need no model key."""
    return {k: v for k, v in environ.items() if not k.upper().endswith(CREDENTIAL_SUFFIXES) and k not in also}


def child_env(scratch: Path) -> dict[str, str]:
    """An allowlist, not a blocklist: nothing from the cell's environment leaks by default."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "OPENBLAS_NUM_THREADS": "1",  # one core per policy; cells share the machine
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    for name in _LOCALE_VARS:
        value = os.environ.get(name, "")
        if value and len(value) < 40 and value.replace(".", "").replace("_", "").replace("-", "").isalnum():
            env[name] = value
    return env


def _clear(path: Path) -> None:
    """An empty directory at `path`: nothing an earlier policy left there survives."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def code_key(files: dict[str, bytes]) -> str:
    return hashlib.sha256(msgspec.msgpack.encode(sorted(files.items()))).hexdigest()


def _safe_relpath(name: str) -> Path:
    rel = Path(name)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise PolicyError(f"policy_error: bad file name {name!r}")
    return rel


def _death_reason(returncode: int | None, limits: SandboxLimits, cpu_s: float, oom_kills: int) -> str:
    """Why the child died. bwrap reports a signal death as 128 + signal; a child that ignores SIGXCPU
    is killed by the hard CPU limit (SIGKILL), and the kernel OOM killer also uses SIGKILL."""
    if returncode is None:
        return "policy_crashed (no exit status)"
    sig = -returncode if returncode < 0 else (returncode - 128 if limits.confined and returncode > 128 else 0)
    if oom_kills:
        return f"memory_limit: killed at the sandbox's memory limit ({limits.memory_mb + limits.scratch_mb} MB)"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= 0.5 * limits.cpu_seconds):
        return "cpu_limit"
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return f"policy_crashed (signal {name})"
    return f"policy_crashed (exit code {returncode})"


@dataclass(frozen=True)
class _Fresh:
    """A started child waiting for its Init: its process, its scratch (as it sees it) and its slot."""

    proc: subprocess.Popen[bytes]
    scratch: Path
    slot: int


def _stop(proc: subprocess.Popen[bytes], confined: bool) -> None:
    """Kill a child, its process group and (confined) whatever is left of its jail; close its pipes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: also any process that slipped out
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)
    if confined:
        isolation.release(proc.pid)  # whatever of the jail is left, and its cgroup
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def _reason(text: object) -> str:
    """A child-written reason as the parent stores it: one printable line of at most MAX_REASON characters."""
    line = "".join(c if c.isprintable() else " " for c in str(text)[: 4 * proto.MAX_REASON])
    return proto.truncate(line.strip() or "policy_error: (no reason given)")


class PolicySandbox:
    def __init__(
        self, limits: SandboxLimits, scratch_dir: str | os.PathLike[str], *, keep_spare: bool = False,
        _audit_hook: bool = True,
    ):
        """`keep_spare`: keep one child started and waiting (a cell's sandbox): see `_start`."""
        self.limits = limits
        self.scratch = Path(scratch_dir).resolve()
        self.keep_spare = keep_spare
        self.isolation: list[
            str
        ] = []  # layers the child reported active, e.g. ["rlimits", "landlock-abi7", ...]
        self._audit_hook = _audit_hook
        self._proc: subprocess.Popen[bytes] | None = None
        self._spawner: ThreadPoolExecutor | None = None  # its one thread starts every child (see above)
        self._spare: Future[_Fresh] | None = None  # the next child, started while the current one works
        self._slot = 0  # the current child's scratch and stderr log; the spare uses the other one
        self._files: dict[str, bytes] = {}
        self._params: dict[str, float] = {}
        self._key = ""
        self._context = ""
        self._seq = 0
        self._missed = 0
        self._t0 = self._deadline = 0.0  # of the act request in flight (submit -> result)
        self._failed = ""  # why that request could not be sent
        self._inbuf = bytearray()
        self._waiter: proto.Waiter | None = None  # re-made for each child
        self._poll_out = select.poll()
        self._wfd = -1
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(proto.Reply)

    # ------------------------------------------------------------------------- public API

    def load(self, files: Mapping[str, bytes | str], params: dict[str, float], *, context: str = "") -> None:
        """Make `Policy(params)` from `files` (exact bytes; a str is taken as UTF-8 text) ready.
        The running child is kept only for the same code and the same `context` (e.g. one judging: its
        held-out episodes never share a process or scratch with anything else). Raises PolicyError with
        a verdict reason."""
        if "policy.py" not in files:
            raise PolicyError("policy_error: no policy.py")
        data = {name: content.encode() if isinstance(content, str) else bytes(content)
                for name, content in files.items()}
        for name, content in data.items():
            _safe_relpath(name)
            if len(content) > self.limits.max_file_bytes:
                raise PolicyError(f"policy_error: file {name!r} is {len(content)} bytes, more than the sandbox's "
                                  f"max_file_bytes ({self.limits.max_file_bytes})")
        key = code_key(data)
        self._files, self._params = data, dict(params)
        if (self._alive() and key == self._key and context == self._context
                and self._cpu_used() < self.limits.cpu_seconds / 2):
            self._call(proto.Load(self._next_seq(), self._params), self.limits.load_timeout_s)
            return
        self._key, self._context = key, context
        self._start()

    def reset(self) -> None:
        """Start of an episode/attempt; restarts a child that died or was killed."""
        if not self._alive():
            if not self._files:
                raise PolicyError("policy_error: nothing loaded")
            self._start()
        self._missed = 0
        self._call(proto.Reset(self._next_seq()), self.limits.call_timeout_s)

    def act(self, obs: np.ndarray | Mapping[str, np.ndarray]) -> ActResult:
        """The policy's action for `obs`: `submit` then `result`."""
        self.submit(obs)
        return self._result(sent=True)

    def submit(self, obs: np.ndarray | Mapping[str, np.ndarray]) -> None:
        """Send `obs` to the policy and return at once: the caller does its own work (e.g. the simulator
        scoring the step) while the policy thinks, then collects the action with `result()`. The act
        deadline runs from here."""
        self._t0 = t0 = time.monotonic()
        self._deadline = t0 + self.limits.act_timeout_s
        self._seq = seq = self._seq + 1
        self._failed = ""
        # No waitpid here (this runs every control step): a child that died shows as EOF on its pipe.
        if self._proc is None:
            self._failed = "policy_crashed (not running)"
            return
        try:
            if isinstance(obs, Mapping):  # e.g. {"pixels": frame, "agent_pos": position}
                arrays = {str(k): np.ascontiguousarray(v) for k, v in obs.items()}
                blobs = {k: proto.Blob(a.dtype.str, list(a.shape), a.tobytes()) for k, a in arrays.items()}
                self._send(proto.ActDict(seq, blobs), self._deadline)
                return
            arr = np.asarray(obs)
            if arr.ndim == 1 and arr.dtype == proto.F8:
                self._send_raw(proto.fast_frame(seq, arr), self._deadline)
            else:
                arr = np.ascontiguousarray(arr)
                self._send(proto.Act(seq, arr.dtype.str, list(arr.shape), arr.tobytes()), self._deadline)
        except _Terminal as exc:
            self._kill()
            self._failed = str(exc)

    def result(self) -> ActResult:
        """The reply to the last `submit`: an action, a missed deadline, or a terminal error."""
        return self._result(sent=False)

    def _result(self, sent: bool) -> ActResult:
        t0 = self._t0
        if self._failed:
            return ActResult(error=self._failed, latency_s=time.monotonic() - t0)
        try:
            reply = self._recv(self._seq, self._deadline, sent=sent)
            if reply is None:
                self._missed += 1
                if self._missed >= self.limits.max_missed_deadlines:
                    raise _Terminal(
                        f"policy_timeout: {self._missed} consecutive replies later than "
                        f"{self.limits.act_timeout_s * 1000:.0f} ms"
                    )
                return ActResult(deadline_missed=True, latency_s=time.monotonic() - t0)
            self._missed = 0
            if type(reply) is np.ndarray:
                return ActResult(action=reply, latency_s=time.monotonic() - t0)
            if isinstance(reply, proto.Failed):
                raise _Terminal(_reason(reply.reason))
            if not isinstance(reply, proto.Action):
                raise _Terminal(f"protocol_error: {type(reply).__name__} in reply to act")
            return ActResult(action=self._decode_action(reply), latency_s=time.monotonic() - t0)
        except _Terminal as exc:
            self._kill()
            return ActResult(error=str(exc), latency_s=time.monotonic() - t0)

    def notify_failure(self, info: dict[str, Any]) -> None:
        """Tell the policy an attempt failed (pass@k). Raises PolicyError if the policy misbehaves."""
        if not self._alive():
            raise PolicyError("policy_crashed (not running)")
        self._call(proto.Notify(self._next_seq(), info), self.limits.call_timeout_s)

    def close(self) -> None:
        """Stop the child, the spare and the spawner. A failure to stop one is raised, after the others
        are stopped."""
        try:
            self._kill()
        finally:
            try:
                self._drop_spare()
            finally:
                spawner, self._spawner = getattr(self, "_spawner", None), None
                if spawner is not None:
                    spawner.shutdown(wait=False)

    def _drop_spare(self) -> None:
        spare, self._spare = getattr(self, "_spare", None), None
        if spare is None or spare.cancel():
            return
        try:
            fresh = spare.result()
        except Exception:  # noqa: BLE001 - it failed to start: nothing to stop
            return
        _stop(fresh.proc, self.limits.confined)

    def stderr_tail(self, n: int = 2000) -> str:
        """The end of the child's stderr/print output, for logs (never parsed)."""
        try:
            with open(self._stderr_path(), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------------- child lifecycle

    def _stderr_path(self, slot: int | None = None) -> Path:
        return self.scratch / STDERR_NAME.format(self._slot if slot is None else slot)

    def _start(self) -> None:
        """A new child for the current code and context. With `keep_spare`, the next child is started
        (jail, interpreter, imports: most of the cost) while this one works, and waits for its Init:
        a new policy version or judging then costs the robot only its Init. A spare has run no policy
        code and holds no files, so it is as fresh as a child started now."""
        self._kill()
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
        fresh = self._take_spare() or self._spawner.submit(self._spawn, 1 - self._slot).result()
        self._proc, self._slot = fresh.proc, fresh.slot
        try:
            self._init(fresh.scratch)
        finally:
            if self.keep_spare:
                self._spare = self._spawner.submit(self._spawn, 1 - self._slot)

    def _take_spare(self) -> _Fresh | None:
        """The spare if it started and still waits; None if there is none or it did not last."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        try:
            fresh = spare.result()
        except Exception:  # noqa: BLE001 - starting it failed: a start now says why, or succeeds
            return None
        if fresh.proc.poll() is None:
            return fresh
        _stop(fresh.proc, self.limits.confined)  # died waiting (killed from outside): not the policy's fault
        return None

    def _spawn(self, slot: int) -> _Fresh:
        """Start a child that waits for its Init, using scratch/stderr `slot` (on the spawner thread)."""
        lim = self.limits
        self.scratch.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-I", "-B", str(CHILD_SCRIPT)]
        if lim.confined:
            reason = isolation.check()
            if reason is not None:
                raise PolicyError(f"sandbox_unavailable: {reason}")
            inner = JAIL_SCRATCH
            jail = isolation.Jail(
                read_only=(*isolation.python_paths(), CHILD_SCRIPT), scratch_mb=lim.scratch_mb,
                memory_mb=lim.memory_mb, pids=lim.pids, cpu_seconds=lim.cpu_seconds, env=child_env(inner),
                cwd=inner,
            )
            argv, cwd, env = isolation.wrap(jail, argv), None, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        else:
            inner = self.scratch / f"work-{slot}"
            _clear(inner)
            cwd, env = inner, child_env(inner)
        with open(self._stderr_path(slot), "wb") as stderr:  # the child keeps its own copy of the fd
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=cwd,
                env=env,
                close_fds=True,  # only the two pipes and the stderr file reach the child
                start_new_session=True,  # its own process group: killed as a whole, deaf to our ^C
            )
        assert proc.stdin is not None and proc.stdout is not None
        for pipe in (proc.stdin, proc.stdout):
            try:  # image observations fit in one pipe buffer: fewer wake-ups per step
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass
        return _Fresh(proc, inner, slot)

    def _init(self, inner: Path) -> None:
        """Hand the current child its code, parameters and limits; it answers once `Policy(params)` exists."""
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        lim = self.limits
        self._wfd = self._proc.stdin.fileno()
        os.set_blocking(self._wfd, False)
        os.set_blocking(self._proc.stdout.fileno(), False)  # reads go through the Waiter
        self._waiter = proto.Waiter(self._proc.stdout.fileno(), self.limits.spin_us)
        self._poll_out = select.poll()
        self._poll_out.register(self._wfd, select.POLLOUT)
        self._inbuf.clear()
        self._missed = 0
        init = proto.Init(
            self._next_seq(),
            self._params,
            str(inner),
            lim.cpu_seconds,
            lim.memory_mb,
            lim.max_files,
            lim.max_file_bytes,
            lim.max_output_bytes,
            self._audit_hook,
            lim.spin_us,
            self._files,
        )
        reply = self._call(init, lim.load_timeout_s)
        layers = [proto.truncate(_reason(x), 40) for x in reply.isolation[:16]] if isinstance(reply, proto.Ready) else []
        self.isolation = (["bwrap"] if lim.confined else []) + layers

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _cpu_used(self) -> float:
        """CPU seconds of the child (its jail), so a long-lived child is recycled before RLIMIT_CPU."""
        if self.limits.confined and self._proc is not None:
            used = isolation.usage(self._proc.pid)
            return used.cpu_s if used else 0.0
        try:
            fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()  # type: ignore[union-attr]
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return 0.0

    def _kill(self) -> None:
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is not None:
            _stop(proc, self.limits.confined)

    def _death(self) -> _Terminal:
        proc = self._proc
        rc, cpu, oom = None, 0.0, 0
        if proc is not None:
            if not self.limits.confined:
                time.sleep(0.01)  # a dying child: its /proc entry (a zombie until reaped) keeps the CPU time
                cpu = self._cpu_used()
            try:
                rc = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            if self.limits.confined:
                used = isolation.usage(proc.pid)
                cpu, oom = (used.cpu_s, used.oom_kills) if used else (0.0, 0)
        return _Terminal(_death_reason(rc, self.limits, cpu, oom))

    # ------------------------------------------------------------------------- framing

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _call(self, msg: Any, timeout: float) -> proto.Reply:
        """Request/reply for everything but act(): any failure is a PolicyError and kills the child."""
        deadline = time.monotonic() + timeout
        try:
            self._send(msg, deadline)
            reply = self._recv(msg.seq, deadline)
            if reply is None:
                what = "load" if isinstance(msg, (proto.Init, proto.Load)) else type(msg).__name__.lower()
                raise _Terminal(f"policy_timeout: {what} took longer than {timeout:g} s")
            if isinstance(reply, proto.Failed):
                raise _Terminal(_reason(reply.reason))
            if isinstance(reply, (proto.Action, np.ndarray)):
                raise _Terminal("protocol_error: action in reply to a control message")
            return reply
        except _Terminal as exc:
            self._kill()
            raise PolicyError(str(exc)) from None

    def _send(self, msg: Any, deadline: float) -> None:
        self._send_raw(proto.frame(self._enc.encode(msg)), deadline)

    def _send_raw(self, data: bytes, deadline: float) -> None:
        fd = self._wfd
        try:  # the usual case: a small frame goes into the pipe buffer in one write
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except BrokenPipeError:
            raise self._death() from None
        if n == len(data):
            return
        view = memoryview(data)[n:]
        while view:
            try:
                view = view[os.write(fd, view) :]
                continue
            except BlockingIOError:
                pass
            except BrokenPipeError:
                raise self._death() from None
            remaining = deadline - time.monotonic()
            # A child that stopped reading: a partial frame would desync the stream, so give up on it.
            if remaining <= 0 or not self._poll_out.poll(math.ceil(remaining * 1000)):
                raise _Terminal("policy_timeout: not reading its input")

    def _recv(self, seq: int, deadline: float, sent: bool = False) -> proto.Reply | np.ndarray | None:
        """The reply for `seq` (an action frame decodes to an array), skipping late replies to earlier
        requests; None at the deadline. `sent`: the request just went out, so the first read can wait
        at once instead of trying (and failing) a non-blocking read."""
        assert self._waiter is not None
        stale = reads = 0
        while True:
            body = self._pop_frame()
            if body is not None:
                try:
                    if body[:1] == b"\xc1":
                        reply_seq, reply = proto.fast_unpack(body)
                    else:
                        reply = self._dec.decode(body)
                        reply_seq = reply.seq
                except (msgspec.DecodeError, ValueError) as exc:
                    raise _Terminal(f"protocol_error: {proto.describe(exc)}") from None
                if reply_seq == seq:
                    return reply
                if reply_seq > seq:
                    raise _Terminal(f"protocol_error: reply for request {reply_seq} not yet sent")
                # A late answer to a step we already gave up on. A child that keeps sending them cannot
                # hold the deadline off: it is checked before every read after the first (below).
                stale += 1
                if stale > MAX_STALE_FRAMES:
                    raise _Terminal(f"protocol_error: more than {MAX_STALE_FRAMES} stale replies in one wait")
                continue
            # After the first read, the deadline holds also when a child trickles a frame byte by byte.
            if reads and time.monotonic() >= deadline:
                return None
            reads += 1
            chunk = self._waiter.read(proto.want(self._inbuf), deadline, try_first=not sent)
            sent = False
            if chunk is None:
                return None
            if not chunk:
                raise self._death()
            if self._inbuf:
                self._inbuf += chunk
            else:
                self._inbuf = bytearray(chunk)

    def _pop_frame(self) -> bytes | None:
        buf = self._inbuf
        if len(buf) < proto.HEADER:
            return None
        n = int.from_bytes(buf[: proto.HEADER], "big")
        if n > self.limits.max_output_bytes:
            raise _Terminal(f"output_too_large: reply frame of {n} bytes > {self.limits.max_output_bytes}")
        if len(buf) < proto.HEADER + n:
            return None
        if len(buf) == proto.HEADER + n:  # the usual case: exactly one frame buffered
            self._inbuf = bytearray()
            return bytes(buf[proto.HEADER :])
        body = bytes(buf[proto.HEADER : proto.HEADER + n])
        del buf[: proto.HEADER + n]
        return body

    @staticmethod
    def _decode_action(reply: proto.Action) -> np.ndarray:
        try:
            if len(reply.shape) > 8:
                raise ValueError(f"{len(reply.shape)} dimensions")
            dtype = np.dtype(reply.dtype)
            if dtype.kind not in "biuf":
                raise ValueError(f"dtype {reply.dtype!r} is not numeric")
            if any(d < 0 for d in reply.shape) or math.prod(reply.shape) * dtype.itemsize != len(reply.data):
                raise ValueError(f"shape {tuple(reply.shape)} does not match {len(reply.data)} bytes")
            return np.frombuffer(reply.data, dtype=dtype).reshape(reply.shape)
        except (TypeError, ValueError) as exc:
            raise _Terminal(f"protocol_error: bad action ({proto.describe(exc)})") from None
