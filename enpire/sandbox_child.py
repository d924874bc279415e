"""Child side of the policy sandbox: runs agent-written `policy.py` in its own process.

Started by `enpire.sandbox.PolicySandbox` as `python -I -B <this file>`, normally inside a jail of the
isolation engine (`enpire/isolation.py`: namespaces, seccomp, cgroup limits, a fresh tmpfs scratch),
with a stripped environment. The policy's files arrive in the `Init` frame and are written into the
scratch directory here. This file must stay self-contained (stdlib + numpy + msgspec): in isolated
mode the project is not on `sys.path`, and importing the project's trusted packages is refused anyway.
The parent imports the protocol structs below so both sides share one definition.

Layers inside the child, applied before any agent code is imported (each is best effort and reported
to the parent in `Ready.isolation`; the jail around the process is what holds if they are bypassed):
1. rlimits: CPU seconds, address space, open files, file size, no core dumps.
2. a fresh network namespace (only when the process may create one, e.g. root): no network at all.
3. Landlock (Linux >= 5.13): the kernel confines file access to read-only Python/system library trees
   plus the scratch directory, denies TCP connect/bind (ABI >= 4) and signals/abstract sockets to
   processes outside the sandbox (ABI >= 6). This is the layer that holds if layer 4 is bypassed.
4. an audit hook that refuses process creation, signals, sockets, ctypes, imports of trusted packages,
   file access outside the allowed trees and introspection used to tamper with the hook. It is a
   tripwire that gives clear reasons (`sandbox_denied: <event> ...`), not a security boundary on its
   own: CPython documents audit hooks as unsuitable for sandboxing (policy code running inside the
   hook, e.g. a PathLike's `__fspath__`, can switch it off). Only a friendly early error.

Wire format: 4-byte big-endian length + body, one message per frame, on the pipes the parent gave as
stdin/stdout. A body is msgpack, except on the act() hot path: a 1-D float64 observation and a 1-D
float64 action travel as a fixed binary body (`FAST_MAGIC`, a big-endian u64 sequence number, then the
raw little-endian float64 values) -- no generic encoding, no dtype/shape strings. Every request carries a
sequence number and the reply repeats it, so a late reply to a step whose deadline passed is never taken
for the next step's answer.

Waiting: both sides may spin (non-blocking reads) for up to `spin_us` before blocking in poll, which
skips the scheduler wake-up when the answer comes quickly. The spin is adaptive: a side spins only while
its recent waits (a moving average) fit in the budget, so a waiting side never burns CPU for nothing
when the other side is regularly slower than that (e.g. the child while the cell steps a slow simulator).
"""

from __future__ import annotations

import math
import os
import select
import struct
import sys
import time
import traceback
from typing import Any

import msgspec
import numpy as np

# ----------------------------------------------------------------------------- protocol


class Init(msgspec.Struct, tag=True, frozen=True):
    """First frame: how to confine the process, then which policy parameters to construct it with."""

    seq: int
    params: dict[str, float]
    scratch: str
    cpu_seconds: int
    memory_mb: int
    max_files: int
    max_file_bytes: int
    max_output_bytes: int
    audit_hook: bool = True  # False only in tests of the kernel layer
    spin_us: float = 0.0  # busy-wait budget before blocking for the next request (adaptive, see above)
    files: dict[str, bytes] = {}  # the policy's files (policy.py, helpers, weights), written into scratch


class Load(msgspec.Struct, tag=True, frozen=True):
    """Construct a fresh `Policy(params)` from the already imported code."""

    seq: int
    params: dict[str, float]


class Reset(msgspec.Struct, tag=True, frozen=True):
    seq: int


class Act(msgspec.Struct, tag=True, frozen=True):
    seq: int
    dtype: str
    shape: list[int]
    data: bytes


class Blob(msgspec.Struct, frozen=True, array_like=True):
    dtype: str
    shape: list[int]
    data: bytes


class ActDict(msgspec.Struct, tag=True, frozen=True):
    """An observation of several named arrays (a camera frame and the pusher's position): the policy's
    act() gets a dict of numpy arrays."""

    seq: int
    arrays: dict[str, Blob]


class Notify(msgspec.Struct, tag=True, frozen=True):
    seq: int
    info: dict[str, Any]


class Ready(msgspec.Struct, tag=True, frozen=True):
    seq: int
    isolation: list[str] = []


class Done(msgspec.Struct, tag=True, frozen=True):
    seq: int


class Action(msgspec.Struct, tag=True, frozen=True):
    seq: int
    dtype: str
    shape: list[int]
    data: bytes


class Failed(msgspec.Struct, tag=True, frozen=True):
    seq: int
    reason: str


Request = Init | Load | Reset | Act | ActDict | Notify
Reply = Ready | Done | Action | Failed

HEADER = 4  # bytes of big-endian frame length
MAX_REASON = 300  # characters of an error message that travel back
FAST_MAGIC = 0xC1  # first body byte of a binary act/action frame; never the first byte of msgpack
FAST_HEAD = struct.Struct(">IBQ")  # frame length, FAST_MAGIC, seq: then the float64 payload
FAST_BODY = FAST_HEAD.size - HEADER  # body bytes before the payload
F8 = np.dtype("<f8")


def fast_frame(seq: int, arr: np.ndarray) -> bytes:
    """A whole frame for a 1-D little-endian float64 array (the caller checked dtype and ndim)."""
    data = arr.tobytes()
    return FAST_HEAD.pack(FAST_BODY + len(data), FAST_MAGIC, seq) + data


def fast_unpack(body: bytes) -> tuple[int, np.ndarray]:
    """(seq, writable contiguous float64 array) of a binary frame body; ValueError if malformed."""
    n = len(body) - FAST_BODY
    if n < 0 or n % 8:
        raise ValueError(f"binary frame of {len(body)} bytes")
    seq = int.from_bytes(body[1:FAST_BODY], "big")
    return seq, np.frombuffer(body, dtype=F8, offset=FAST_BODY).copy()


class Waiter:
    """Adaptive spin-then-block wait for a readable non-blocking fd.

    Spins (non-blocking reads) for at most `spin_s`, but only while the moving average of recent waits
    fits in that budget; otherwise it goes straight to poll. Each wait's length updates the average, so
    spinning resumes when the other side speeds up again."""

    def __init__(self, fd: int, spin_us: float) -> None:
        self.fd = fd
        self.spin_s = max(0.0, spin_us) / 1e6
        self.avg = 0.0  # seconds; starts optimistic
        self.cap = 2 * self.spin_s  # one long wait (a load, a pause between episodes) counts as this
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    def read(self, size: int, deadline: float | None, try_first: bool = True) -> bytes | None:
        """Up to `size` bytes (b"" at EOF), or None when `deadline` (monotonic) passed first.
        `try_first=False` skips the opening non-blocking read when the caller knows nothing is there yet."""
        fd, clock, read = self.fd, time.monotonic, os.read
        t0 = clock()
        if try_first:
            try:
                chunk = read(fd, size)
                self.avg *= 0.9
                return chunk
            except BlockingIOError:
                pass
        spin_s = self.spin_s
        if spin_s and self.avg < spin_s:
            end = t0 + spin_s if deadline is None else min(t0 + spin_s, deadline)
            yield_ = os.sched_yield
            while clock() < end:
                try:
                    chunk = read(fd, size)
                except BlockingIOError:
                    yield_()  # let a runnable process on this core (e.g. the other side) go first
                    continue
                self.avg = 0.9 * self.avg + 0.1 * min(clock() - t0, self.cap)
                return chunk
        while True:
            if deadline is None:
                ready = self.poll.poll()
            else:
                remaining = deadline - clock()
                if remaining <= 0:
                    self.avg = 0.9 * self.avg + 0.1 * min(clock() - t0, self.cap)
                    return None
                ready = self.poll.poll(math.ceil(remaining * 1000))
            try:
                chunk = read(fd, size)
            except BlockingIOError:
                if not ready and deadline is not None and clock() >= deadline:
                    self.avg = 0.9 * self.avg + 0.1 * min(clock() - t0, self.cap)
                    return None
                continue
            self.avg = 0.9 * self.avg + 0.1 * min(clock() - t0, self.cap)
            return chunk


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER, "big") + body


def want(buf: bytearray) -> int:
    """How much to read next: the rest of a large frame in one go, else a small chunk (a big read
    buffer per call costs more than it saves for the usual tiny frames)."""
    if len(buf) >= HEADER:
        return max(1 << 16, HEADER + int.from_bytes(buf[:HEADER], "big") - len(buf))
    return 1 << 16


def truncate(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    msg = str(exc)
    return truncate(f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)


# ----------------------------------------------------------------------------- confinement

TRUSTED_PACKAGES = frozenset({"enpire", "hw", "bus", "actors"})
SYSTEM_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache")
DEVICES = ("/dev/null", "/dev/urandom", "/dev/zero")


def read_roots(scratch: str) -> tuple[str, ...]:
    """Trees the policy may read: the Python installation(s) and shared libraries, never the project."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for entry in sys.path:
        if entry and any(_under(os.path.abspath(entry), r) for r in roots):
            roots.add(os.path.abspath(entry))
    roots.update(p for p in SYSTEM_LIB_DIRS if os.path.exists(p))
    return tuple(sorted(r for r in roots if not _under(scratch, r) or r == scratch))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def set_rlimits(init: Init) -> None:
    import resource

    def cap(kind: int, value: int, grace: int = 0) -> None:
        _soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value, grace = min(value, hard), max(0, min(grace, hard - value))
        resource.setrlimit(kind, (value, value + grace))

    # SIGXCPU at the soft limit (the parent reports that exit as `cpu_limit`); SIGKILL a second later
    # at the hard limit in case the policy catches SIGXCPU.
    cap(resource.RLIMIT_CPU, max(1, init.cpu_seconds), grace=1)
    cap(resource.RLIMIT_AS, init.memory_mb * 1024 * 1024)
    cap(resource.RLIMIT_NOFILE, init.max_files)
    cap(resource.RLIMIT_FSIZE, init.max_file_bytes)
    cap(resource.RLIMIT_CORE, 0)
    import signal

    # Writing past RLIMIT_FSIZE should fail the write (EFBIG), not kill the process silently.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def kernel_confine(scratch: str, roots: tuple[str, ...]) -> list[str]:
    """Network namespace + Landlock via raw syscalls; returns the layers that took effect."""
    import ctypes
    import platform

    layers: list[str] = []
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET: an empty namespace, loopback down
        layers.append("netns")
    if platform.machine() not in ("x86_64", "aarch64"):
        return layers
    nr_create, nr_add, nr_restrict = (444, 445, 446)  # same numbers on x86_64 and aarch64
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(nr_create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._VERSION
    if abi < 1:
        return layers

    read_file, read_dir, write_file = 1 << 2, 1 << 3, 1 << 1
    handled = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        handled |= 1 << 13  # REFER
    if abi >= 3:
        handled |= 1 << 14  # TRUNCATE
    if abi >= 5:
        handled |= 1 << 15  # IOCTL_DEV
    # Scratch: read/write/create/remove regular files and dirs; never exec, symlinks, devices, sockets,
    # fifos, or linking files in from elsewhere (REFER).
    make_dir, make_reg, remove_dir, remove_file = 1 << 7, 1 << 8, 1 << 4, 1 << 5
    scratch_rights = read_file | read_dir | write_file | make_dir | make_reg | remove_dir | remove_file
    if abi >= 3:
        scratch_rights |= 1 << 14

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    attr = RulesetAttr(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = libc.syscall(nr_create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return layers

    def allow(path: str, rights: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        if not os.path.isdir(path):
            rights &= read_file | write_file | (1 << 14) | (1 << 15) | 1  # file-only rights
        rule = PathBeneath(rights & handled, fd)
        libc.syscall(nr_add, ruleset, 1, ctypes.byref(rule), 0)
        os.close(fd)

    for root in roots:
        allow(root, read_file | read_dir)
    for dev in DEVICES:
        allow(dev, read_file | write_file)
    allow(scratch, scratch_rights)
    pr_set_no_new_privs = 38
    ok = libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) == 0
    ok = ok and libc.syscall(nr_restrict, ruleset, ctypes.c_uint32(0)) == 0
    os.close(ruleset)
    if ok:
        layers.append(f"landlock-abi{abi}")
    layers += _drop_capabilities(libc)
    return layers


def _drop_capabilities(libc: Any) -> list[str]:
    """A root child keeps uid 0 but loses every capability: it can no longer raise its rlimits,
    undo its namespaces or override file permissions, even if it gets hold of raw syscalls."""
    import ctypes

    if os.geteuid() != 0:
        return []
    pr_capbset_drop, pr_cap_ambient, pr_cap_ambient_clear_all = 24, 47, 4
    for cap in range(64):
        libc.prctl(pr_capbset_drop, cap, 0, 0, 0)  # EINVAL past the last known cap: ignored
    libc.prctl(pr_cap_ambient, pr_cap_ambient_clear_all, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} sets, all zero
    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    return ["no_capabilities"] if libc.capset(ctypes.byref(header), data) == 0 else []


def install_audit_hook(scratch: str, roots: tuple[str, ...], denials: list[str]) -> None:
    """Refuse dangerous operations. Everything the hook uses is bound now, so patching `os`, `sys`
    or `posixpath` later cannot change its decisions."""
    import posix

    # Builtins and helpers bound into the closure: rebinding `builtins.isinstance` or module globals
    # later cannot change what the hook decides.
    getcwd, fspath, normpath, path_like = posix.getcwd, os.fspath, os.path.normpath, os.PathLike
    _isinstance, _repr, _str, _any, _trunc, _denied = isinstance, repr, str, any, truncate, PermissionError
    _int, _bytes, _strt, _exc, _type, trusted = int, bytes, str, Exception, type, TRUSTED_PACKAGES
    scratch_prefix = scratch.rstrip("/") + "/"
    read_prefixes = tuple(r.rstrip("/") + "/" for r in roots)
    devices = frozenset(DEVICES)
    write_bits = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    always = frozenset(
        {
            "subprocess.Popen",
            "os.system",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.fork",
            "os.forkpty",
            "os.kill",
            "os.killpg",
            "signal.pthread_kill",
            "os.startfile",
            "os.chdir",
            "os.fchdir",
            "os.chroot",
            "os.symlink",
            "os.link",
            "os.chown",
            "os.lchown",
            "os.fchown",
            "sys.addaudithook",
            "sys.setprofile",
            "sys.settrace",
            "sys._current_frames",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "resource.setrlimit",
            "resource.prlimit",
            "builtins.input",
            "builtins.breakpoint",
            "pty.spawn",
            "_posixsubprocess.fork_exec",
            "os.setxattr",
            "os.removexattr",
            "cpython.run_command",
            "cpython.remote_debugger_script",
            "sys.remote_exec",
        }
    )
    path_events = frozenset(
        {
            "os.remove",
            "os.rename",
            "os.rmdir",
            "os.mkdir",
            "os.chmod",
            "os.truncate",
            "os.utime",
            "shutil.rmtree",
            "shutil.move",
            "shutil.copyfile",
            "shutil.copytree",
            "shutil.chown",
        }
    )
    list_events = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr"})

    def resolve(path: Any) -> str | None:
        if _isinstance(path, _int) or path is None:
            return None  # an fd: it was checked when it was opened
        try:
            text = fspath(path)
            if _isinstance(text, _bytes):
                text = text.decode("utf-8", "surrogateescape")
        except _exc:
            return "?"
        return normpath(text if text.startswith("/") else getcwd() + "/" + text)

    def in_scratch(p: str) -> bool:
        return p == scratch or p.startswith(scratch_prefix)

    def readable(p: str) -> bool:
        return in_scratch(p) or p in devices or p + "/" in read_prefixes or p.startswith(read_prefixes)

    def deny(event: str, detail: str) -> None:
        msg = _trunc(f"sandbox_denied: {event} {detail}".rstrip())
        if not denials:
            denials.append(msg)
        raise _denied(msg)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path = resolve(args[0])
            if path is None:
                return
            mode, flags = args[1], args[2]
            writing = (_isinstance(mode, _strt) and _any(c in mode for c in "wax+")) or (
                _isinstance(flags, _int) and flags & write_bits
            )
            if writing and not in_scratch(path):
                deny("open", f"{path} for writing (outside the scratch directory)")
            if not writing and not readable(path):
                deny("open", f"{path} (outside the sandbox)")
        elif event == "ctypes.dlopen":
            return  # loading a library is harmless; looking up or calling its symbols is refused below
        elif event in always or event.startswith(("socket.", "ctypes.", "os.exec", "os.spawn")):
            # For sockets, name the address/family, not the socket object.
            shown = [a for a in args if _type(a).__name__ != "socket"] if event.startswith("socket.") else []
            deny(event, _trunc(_repr(shown)[:120], 120) if shown else "")
        elif event == "import":
            top = _str(args[0]).split(".", 1)[0]
            if top in trusted:
                deny("import", _str(args[0]))
        elif event in path_events:
            for arg in args[:2]:
                path = resolve(arg) if _isinstance(arg, (_strt, _bytes, path_like)) else None
                if path is not None and not in_scratch(path):
                    deny(event, f"{path} (outside the scratch directory)")
        elif event in list_events:
            path = resolve(args[0]) if args else None
            if path is not None and not readable(path):
                deny(event, f"{path} (outside the sandbox)")

    sys.addaudithook(hook)


# ----------------------------------------------------------------------------- main loop


class FastAct:
    """An act request that came as a binary frame: the observation is already a float64 array."""

    __slots__ = ("obs", "seq")

    def __init__(self, seq: int, obs: np.ndarray) -> None:
        self.seq, self.obs = seq, obs


class _Channel:
    """Frames in from the parent, frames out to it; both on private fds, away from fd 0/1."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        os.set_blocking(rfd, False)  # waits go through Waiter, so a peek for newer frames never blocks
        self.buf = bytearray()
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(Request)
        self.waiter = Waiter(rfd, 0.0)

    def _fill(self, block: bool) -> bool:
        if block:  # called when nothing complete is buffered, so a read would mostly find the pipe empty
            chunk = self.waiter.read(want(self.buf), None, try_first=False)
        else:
            try:
                chunk = os.read(self.rfd, want(self.buf))
            except BlockingIOError:
                return False
        if not chunk:
            raise EOFError
        if self.buf:
            self.buf += chunk
        else:
            self.buf = bytearray(chunk)
        return True

    def _pop(self) -> bytes | None:
        buf = self.buf
        if len(buf) < HEADER:
            return None
        n = int.from_bytes(buf[:HEADER], "big")
        if len(buf) < HEADER + n:
            return None
        if len(buf) == HEADER + n:  # the usual case: exactly one frame buffered
            self.buf = bytearray()
            return bytes(buf[HEADER:])
        body = bytes(buf[HEADER : HEADER + n])
        del buf[: HEADER + n]
        return body

    def _decode(self, body: bytes) -> Request | FastAct:
        if body[:1] == b"\xc1":
            return FastAct(*fast_unpack(body))
        return self.decoder.decode(body)

    def recv(self) -> Request | FastAct:
        while (body := self._pop()) is None:
            self._fill(block=True)
        msg = self._decode(body)
        # A slow policy falls behind: answer only the newest observation, the rest are stale.
        while isinstance(msg, (Act, ActDict, FastAct)):
            while (nxt := self._peek()) is None and self._fill(block=False):
                pass
            if nxt is None or not (nxt[:1] == b"\xc1" or isinstance(self.decoder.decode(nxt), (Act, ActDict))):
                break
            msg = self._decode(self._pop() or b"")
        return msg

    def _peek(self) -> bytes | None:
        if len(self.buf) < HEADER:
            return None
        n = int.from_bytes(self.buf[:HEADER], "big")
        if len(self.buf) < HEADER + n:
            return None
        return bytes(self.buf[HEADER : HEADER + n])

    def send(self, msg: Reply) -> None:
        self.send_raw(frame(self.encoder.encode(msg)))

    def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view) :]


def _where(exc: BaseException) -> str:
    """The policy's own frames of a traceback, innermost first: " (at policy.py:41 in act <- policy.py:12 in
    helper)". Frames only (walk_tb reads no source file, so the audit hook sees no open)."""
    scratch = os.getcwd() + os.sep
    own = os.path.dirname(os.path.abspath(__file__)) + os.sep  # a checkout under /tmp lies inside scratch
    frames = [f"{frame.f_code.co_filename[len(scratch):]}:{line} in {frame.f_code.co_name}"
              for frame, line in traceback.walk_tb(exc.__traceback__)
              if frame.f_code.co_filename.startswith(scratch) and not frame.f_code.co_filename.startswith(own)]
    return f" (at {' <- '.join(reversed(frames[-4:]))})" if frames else ""


def write_files(scratch: str, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad file name {name!r}")
        path = os.path.join(scratch, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


# numpy's own allocation failure, a MemoryError subclass; bound before any policy code runs.
_NUMPY_MEMORY_ERROR = getattr(getattr(getattr(np, "_core", None), "_exceptions", None), "_ArrayMemoryError", None)


def _numpy_memory_error(exc: BaseException) -> bool:
    return _NUMPY_MEMORY_ERROR is not None and type(exc) is _NUMPY_MEMORY_ERROR


def _failure(exc: BaseException, denials: list[str]) -> str:
    if denials:
        return denials[0]  # the first refusal, even if the policy caught it and failed otherwise
    if type(exc) is MemoryError or _numpy_memory_error(exc):  # at RLIMIT_AS; a policy's own subclass is not
        return truncate(f"memory_limit: {describe(exc)}")
    text = describe(exc)
    return text if text.startswith("sandbox_denied:") else truncate(f"policy_error: {text}{_where(exc)}")


def _to_action(result: Any, seq: int, max_bytes: int) -> Action | Failed | bytes:
    """The reply to an act request: a ready binary frame for a 1-D float64 action, else a struct."""
    if isinstance(result, (list, tuple)) and len(result) * 8 > max_bytes:
        return Failed(seq, f"output_too_large: sequence of {len(result)} items")
    try:
        arr = np.asarray(result)
        if arr.dtype.kind == "c":  # converting would drop the imaginary part (and warn): not an action
            return Failed(seq, f"safety_violation: action dtype {arr.dtype} is not real-valued")
        if arr.dtype.kind not in "biuf":
            arr = arr.astype(np.float64)
    except Exception as exc:  # noqa: BLE001 - whatever the policy returned
        return Failed(
            seq, f"policy_error: act returned a non-numeric {type(result).__name__} ({describe(exc)})"
        )
    if arr.nbytes > max_bytes:
        return Failed(seq, f"output_too_large: action of {arr.nbytes} bytes")
    if arr.ndim == 1 and arr.dtype == F8:
        return fast_frame(seq, arr)
    arr = np.ascontiguousarray(arr)
    return Action(seq, arr.dtype.str, list(arr.shape), arr.tobytes())


def main() -> None:
    # Keep the parent's pipes on private fds; fd 0 becomes /dev/null and fd 1 goes to stderr, so
    # `print` (or a stray os.write(1, ...)) cannot corrupt the frame stream.
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    sys.stdout = sys.stderr
    chan = _Channel(rfd, wfd)
    try:
        init = chan.recv()
    except EOFError:
        return
    if not isinstance(init, Init):
        return
    chan.waiter = Waiter(rfd, init.spin_us)
    scratch = os.path.realpath(init.scratch)
    os.chdir(scratch)
    try:
        write_files(scratch, init.files)
    except (OSError, ValueError) as exc:
        chan.send(Failed(init.seq, f"policy_error: cannot write the policy's files ({describe(exc)})"))
        return
    sys.dont_write_bytecode = True
    roots = read_roots(scratch)
    # Drop project or user paths (e.g. an editable install's .pth entry); keep the Python trees.
    sys.path[:] = [scratch] + [p for p in sys.path if p and p.startswith(roots)]
    isolation = ["rlimits"]
    set_rlimits(init)
    try:
        isolation += kernel_confine(scratch, roots)
    except Exception as exc:  # noqa: BLE001 - an old kernel or no ctypes: the other layers still apply
        print(f"sandbox: kernel confinement unavailable: {describe(exc)}", file=sys.stderr)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # no ready-made handle for the policy; a re-import gets no symbols/calls
    denials: list[str] = []
    if init.audit_hook:
        install_audit_hook(scratch, roots, denials)
        isolation.append("audit_hook")

    policy: Any = None
    module: Any = None
    try:
        import importlib

        module = importlib.import_module("policy")
        policy = module.Policy(dict(init.params))
        if not callable(getattr(policy, "act", None)):
            raise TypeError("Policy has no act(obs) method")
        chan.send(Ready(init.seq, isolation))
    except BaseException as exc:  # noqa: BLE001 - anything the policy does is its verdict
        chan.send(Failed(init.seq, _failure(exc, denials)))
        return

    while True:
        try:
            msg = chan.recv()
        except EOFError:
            return  # the parent is gone or closed us
        reply: Reply | bytes
        try:
            if type(msg) is FastAct:
                reply = _to_action(policy.act(msg.obs), msg.seq, init.max_output_bytes)
            elif isinstance(msg, Act):
                obs = np.frombuffer(msg.data, dtype=np.dtype(msg.dtype)).reshape(msg.shape).copy()
                reply = _to_action(policy.act(obs), msg.seq, init.max_output_bytes)
            elif isinstance(msg, ActDict):
                obs = {k: np.frombuffer(b.data, dtype=np.dtype(b.dtype)).reshape(b.shape).copy()
                       for k, b in msg.arrays.items()}
                reply = _to_action(policy.act(obs), msg.seq, init.max_output_bytes)
            elif isinstance(msg, Reset):
                if callable(getattr(policy, "reset", None)):
                    policy.reset()
                reply = Done(msg.seq)
            elif isinstance(msg, Notify):
                if callable(getattr(policy, "on_failure", None)):
                    policy.on_failure(dict(msg.info))
                reply = Done(msg.seq)
            elif isinstance(msg, Load):
                policy = module.Policy(dict(msg.params))
                reply = Ready(msg.seq, isolation)
            else:
                reply = Failed(msg.seq, "protocol_error: unexpected Init")
            if denials:  # refused earlier in this call but swallowed by the policy: still terminal
                reply = Failed(msg.seq, denials[0])
        except BaseException as exc:  # noqa: BLE001 - anything the policy does is its verdict
            reply = Failed(msg.seq, _failure(exc, denials))
        if type(reply) is bytes:
            chan.send_raw(reply)
        else:
            chan.send(reply)


if __name__ == "__main__":
    main()
