"""One isolation engine for untrusted code: policy sandboxes, training recipes and CLI coding agents.

Built on bubblewrap (`bwrap`, the tool under Flatpak and the Linux sandboxes of Claude Code and Codex).
`wrap(jail, argv)` returns an argv that runs `argv` confined; the caller starts it with its own
`subprocess.Popen` (pipes, stderr, cwd as usual). What a jail gets:

- new PID, IPC, UTS (and, unless `network=True`, network) namespaces: every process it starts dies with
  it (the namespace's init is killed with bwrap), and `--die-with-parent` kills it when its parent dies;
- `--new-session` (no terminal injection), all capabilities dropped, no new privileges;
- a mount namespace with only the system libraries, the paths named in `read_only` (bound read-only at
  the same path), `writable` (bound read-write), a fresh /proc and /dev, and a size-limited tmpfs at /tmp
  that vanishes with the jail: no state directory, no bus sockets, nothing else of the host;
- a seccomp filter (generated here as classic BPF) refusing ptrace, new namespaces, keyctl, mounts,
  module loading, bpf, perf, userfaultfd, io_uring, handle-based opens, TIOCSTI and the like;
- a cgroup of its own (v1 here; v2 where our cgroup delegates memory and pids) capping its memory
  (anonymous memory, tmpfs scratch and memfds all count), its number of processes/threads, and
  measuring its CPU time; RLIMIT_CPU per process, and RLIMIT_FSIZE on every file it writes.

How: the returned argv starts this file as a small launcher (`python -I -S isolation.py SPEC`) that
creates the cgroup, moves itself into it, sets rlimits, writes the seccomp program to a memfd, then
execs bwrap (same pid, so `Popen.pid` is bwrap's pid and `usage(pid)`/`release(pid)` find the cgroup).
This file is stdlib-only for that reason.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_PREFIX = "enpire-j"  # jail cgroups: <our cgroup>/enpire-j<launcher pid>
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
MAX_MB = 1 << 20  # 1 TiB: anything larger is a configuration error, not a limit


@dataclass(frozen=True)
class Jail:
    """What a confined process may see and use. `env` is the WHOLE environment it gets."""

    read_only: tuple[Path, ...] = ()  # bound read-only at the same path (code, libraries, venv)
    writable: tuple[Path, ...] = ()  # bound read-write at the same path (e.g. an agent worktree)
    scratch_mb: int = 64  # fresh size-limited tmpfs at /tmp, gone with the jail
    network: bool = False  # False: own (empty) net namespace; True: the host's (loopback model servers)
    memory_mb: int = 1024  # cgroup memory limit (RSS + tmpfs + memfds); the scratch is added on top
    pids: int = 64  # processes + threads
    cpu_seconds: int = 600  # RLIMIT_CPU of each process (SIGXCPU, SIGKILL one second later)
    file_mb: int = 256  # RLIMIT_FSIZE: no file it writes (a writable bind, an inherited log) grows past this
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # default /tmp

    def __post_init__(self) -> None:
        for name in ("scratch_mb", "memory_mb", "pids", "cpu_seconds", "file_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_MB:
                raise ValueError(f"Jail.{name} = {value!r}: expected an integer in [1, {MAX_MB}]")


class IsolationError(RuntimeError):
    """The engine cannot confine a process here; the message is one line saying why."""


# ----------------------------------------------------------------------------- public API


def python_paths() -> tuple[Path, ...]:
    """The interpreter trees a confined Python needs read-only: the venv and the installation behind it."""
    paths = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths.add(Path(sys.prefix))  # the venv as named (its bin/python is a symlink into the base install)
    paths.add(Path(os.path.realpath(sys.executable)).parent.parent)
    return tuple(sorted(p for p in paths if not any(p != q and q in p.parents for q in paths)))


def wrap(jail: Jail, argv: Sequence[str]) -> list[str]:
    """An argv that runs `argv` confined in `jail` (start it with subprocess.Popen)."""
    if not argv:
        raise ValueError("wrap: empty argv")
    spec = {
        "read_only": [str(p) for p in jail.read_only], "writable": [str(p) for p in jail.writable],
        "scratch_mb": jail.scratch_mb, "network": jail.network, "memory_mb": jail.memory_mb,
        "pids": jail.pids, "cpu_seconds": jail.cpu_seconds, "file_mb": jail.file_mb, "env": dict(jail.env),
        "cwd": str(jail.cwd) if jail.cwd else "/tmp", "argv": [str(a) for a in argv],
    }
    return [sys.executable, "-I", "-S", "-B", str(Path(__file__).resolve()), json.dumps(spec)]


_checked: dict[str, str | None] = {}


def check() -> str | None:
    """None if the engine works here (bwrap runs a confined process with its cgroup limits), else a
    one-line reason. Cached per process."""
    if "result" not in _checked:
        _checked["result"] = _check()
    return _checked["result"]


def _check() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if _seccomp_table() is None:
        return f"no seccomp syscall table for {platform.machine()}"
    try:
        _cgroup_dirs(os.getpid())
    except IsolationError as e:
        return str(e)
    try:
        proc = subprocess.run(wrap(Jail(memory_mb=64, pids=8, scratch_mb=1), ["/bin/sh", "-c", "echo ok"]),
                              capture_output=True, timeout=30, env={})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap failed to start: {e}"
    if proc.returncode != 0 or proc.stdout.strip() != b"ok":
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        return f"bubblewrap cannot confine a process here: {err[-1] if err else f'exit {proc.returncode}'}"
    return None


@dataclass(frozen=True)
class Usage:
    cpu_s: float  # CPU seconds of every process the jail ran
    oom_kills: int  # processes the kernel killed at the memory limit
    memory_peak_mb: float


def usage(pid: int) -> Usage | None:
    """What the jail started as `pid` (its Popen pid) used so far; None once released or without cgroups."""
    dirs = _existing_dirs(pid)
    if not dirs:
        return None
    cpu = oom = 0.0
    peak = 0.0
    if "cpuacct" in dirs:
        cpu = _read_int(dirs["cpuacct"] / "cpuacct.usage") / 1e9
    if "memory" in dirs:
        mem = dirs["memory"]
        if (mem / "memory.oom_control").exists():  # v1
            oom = _kv(mem / "memory.oom_control").get("oom_kill", 0)
            peak = _read_int(mem / "memory.max_usage_in_bytes") / 2**20
        else:  # v2
            oom = _kv(mem / "memory.events").get("oom_kill", 0)
            peak = _read_int(mem / "memory.peak") / 2**20
            cpu = _kv(mem / "cpu.stat").get("usage_usec", 0) / 1e6
    return Usage(cpu_s=cpu, oom_kills=int(oom), memory_peak_mb=peak)


def release(pid: int) -> None:
    """Kill whatever is left of the jail started as `pid` and remove its cgroup. Call after the Popen
    was waited for; safe to call twice."""
    dirs = _existing_dirs(pid)
    for _ in range(50):  # a fork racing the kill shows up in the next read
        alive = set()
        for d in dirs.values():
            alive.update(_procs(d))
        if not alive:
            break
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    for d in dirs.values():
        try:
            d.rmdir()
        except OSError:
            pass


# ----------------------------------------------------------------------------- cgroups


def _mounts() -> dict[str, Path]:
    """controller -> (v1 mount point); "unified" -> the cgroup2 mount."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rest = left.split(), right.split()
        if len(parts) < 5 or len(rest) < 3:
            continue
        if rest[0] == "cgroup2":
            found.setdefault("unified", Path(parts[4]))
        elif rest[0] == "cgroup":
            for opt in rest[2].split(","):
                if opt in ("memory", "pids", "cpuacct"):
                    found.setdefault(opt, Path(parts[4]))
    return found


def _own_cgroups(pid: int) -> dict[str, str]:
    """controller (or "unified") -> the cgroup path of `pid` in that hierarchy."""
    own: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        num, ctrls, path = line.split(":", 2)
        if num == "0" and not ctrls:
            own["unified"] = path
        for c in ctrls.split(","):
            own[c] = path
    return own


def _cgroup_dirs(pid: int) -> dict[str, Path]:
    """controller -> the jail cgroup dir for launcher `pid` (v1: memory, pids, cpuacct; v2: one dir as
    "memory" and "pids"). Raises IsolationError when no writable memory+pids cgroup is at hand."""
    mounts, own = _mounts(), _own_cgroups(os.getpid())
    name = f"{CGROUP_PREFIX}{pid}"
    if "memory" in mounts and "pids" in mounts:
        dirs = {c: mounts[c] / own.get(c, "/").lstrip("/") / name for c in ("memory", "pids", "cpuacct")
                if c in mounts}
        parents = [d.parent for d in dirs.values()]
        if all(os.access(p, os.W_OK) for p in parents):
            return dirs
        raise IsolationError(f"cgroup v1 memory/pids hierarchies are not writable ({parents[0]}): run as root "
                            "or give this user a delegated cgroup")
    if "unified" in mounts:
        parent = mounts["unified"] / own.get("unified", "/").lstrip("/")
        try:
            enabled = (parent / "cgroup.subtree_control").read_text().split()
        except OSError:
            enabled = []
        if "memory" in enabled and "pids" in enabled and os.access(parent, os.W_OK):
            return {"memory": parent / name, "pids": parent / name}
        raise IsolationError(f"cgroup v2 at {parent} does not delegate the memory and pids controllers "
                            "(cgroup.subtree_control); run inside a delegated cgroup, e.g. systemd-run --user -p Delegate=yes")
    raise IsolationError("no cgroup hierarchy with memory and pids controllers is mounted")


def _existing_dirs(pid: int) -> dict[str, Path]:
    try:
        dirs = _cgroup_dirs(pid)
    except (IsolationError, OSError):
        return {}
    return {c: d for c, d in dirs.items() if d.is_dir()}


def _procs(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def _sweep(parent: Path) -> None:
    """Remove jail cgroups left by launchers that are gone (rmdir fails on a cgroup with processes)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for d in entries:
        if d.name.startswith(CGROUP_PREFIX) and d.name[len(CGROUP_PREFIX):].isdigit():
            pid = int(d.name[len(CGROUP_PREFIX):])
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                try:
                    d.rmdir()
                except OSError:
                    pass


def _enter_cgroup(memory_mb: int, scratch_mb: int, pids: int) -> None:
    """Create this launcher's jail cgroup, set its limits and move this process into it."""
    dirs = _cgroup_dirs(os.getpid())
    limit = (memory_mb + scratch_mb) << 20
    for ctrl, d in dirs.items():
        _sweep(d.parent)
        d.mkdir(exist_ok=True)
        if ctrl == "memory":
            if (d / "memory.limit_in_bytes").exists():  # v1
                (d / "memory.limit_in_bytes").write_text(str(limit))
                try:  # no swap either (absent without swap accounting)
                    (d / "memory.memsw.limit_in_bytes").write_text(str(limit))
                except OSError:
                    pass
            else:  # v2
                (d / "memory.max").write_text(str(limit))
                try:
                    (d / "memory.swap.max").write_text("0")
                except OSError:
                    pass
        elif ctrl == "pids":
            (d / "pids.max").write_text(str(pids))
    for d in dict.fromkeys(dirs.values()):  # v2: one dir for both
        (d / "cgroup.procs").write_text(str(os.getpid()))


# ----------------------------------------------------------------------------- seccomp

# Syscalls a jail never needs: tracing other processes, namespaces and mounts, kernel keyrings and
# modules, eBPF/perf, userfaultfd (exploit aid), io_uring (bypasses this filter), handle-based opens
# (escape bind mounts), clock/host changes. Refused with EPERM (ENOSYS for clone3, so libc falls back
# to clone, whose namespace flags are checked below).
_DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr",
    "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "open_by_handle_at", "name_to_handle_at", "acct", "quotactl", "syslog",
    "swapon", "swapoff", "reboot", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "vhangup", "fanotify_init", "lookup_dcookie",
)
_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428,
    "mount_setattr": 442, "keyctl": 250, "add_key": 248, "request_key": 249, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "bpf": 321,
    "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_by_handle_at": 304, "name_to_handle_at": 303, "acct": 163,
    "quotactl": 179, "syslog": 103, "swapon": 167, "swapoff": 168, "reboot": 169, "settimeofday": 164,
    "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170, "setdomainname": 171,
    "vhangup": 153, "fanotify_init": 300, "lookup_dcookie": 212, "iopl": 172, "ioperm": 173,
    "clone": 56, "clone3": 435, "ioctl": 16,
}
_AARCH64 = {
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438,
    "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428,
    "mount_setattr": 442, "keyctl": 219, "add_key": 217, "request_key": 218, "init_module": 105,
    "finit_module": 273, "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294, "bpf": 280,
    "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_by_handle_at": 265, "name_to_handle_at": 264, "acct": 89,
    "quotactl": 60, "syslog": 116, "swapon": 224, "swapoff": 225, "reboot": 142, "settimeofday": 170,
    "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171, "sethostname": 161, "setdomainname": 162,
    "vhangup": 58, "fanotify_init": 262, "lookup_dcookie": 18, "clone": 220, "clone3": 435, "ioctl": 29,
}
_ARCH = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}
CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
TIOCSTI = 0x5412
# classic BPF opcodes and seccomp return values
_LD_ABS, _JEQ, _JSET, _JGE, _RET = 0x20, 0x15, 0x45, 0x35, 0x06
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def _seccomp_table() -> tuple[int, dict[str, int]] | None:
    return _ARCH.get(platform.machine())


def seccomp_program() -> bytes:
    """The filter as bwrap's --seccomp reads it: an array of struct sock_filter (u16 code, u8 jt, u8 jf,
    u32 k). Offsets into struct seccomp_data: nr 0, arch 4, args[i] 16 + 8 i (low word first)."""
    arch, table = _seccomp_table() or (None, None)
    if table is None:
        raise IsolationError(f"no seccomp syscall table for {platform.machine()}")
    ins: list[tuple[int, int, int, int]] = []

    def add(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        ins.append((code, jt, jf, k))

    add(_LD_ABS, 4)
    add(_JEQ, arch, jt=1)
    add(_RET, _KILL)  # a foreign ABI (e.g. 32-bit on x86_64) would bypass the numbers below
    add(_LD_ABS, 0)
    if platform.machine() == "x86_64":
        add(_JGE, 0x40000000, jf=1)  # x32 syscalls
        add(_RET, _ERRNO | _EPERM)
    for name in _DENY:
        add(_JEQ, table[name], jf=1)
        add(_RET, _ERRNO | _EPERM)
    for name in ("iopl", "ioperm"):
        if name in table:
            add(_JEQ, table[name], jf=1)
            add(_RET, _ERRNO | _EPERM)
    add(_JEQ, table["clone3"], jf=1)
    add(_RET, _ERRNO | _ENOSYS)
    for name, offset, test, k in (("clone", 16, _JSET, CLONE_NS_FLAGS), ("ioctl", 24, _JEQ, TIOCSTI)):
        add(_JEQ, table[name], jf=4)
        add(_LD_ABS, offset)
        add(test, k, jf=1)
        add(_RET, _ERRNO | _EPERM)
        add(_LD_ABS, 0)
    add(_RET, _ALLOW)
    return b"".join(struct.pack("<HBBI", *i) for i in ins)


# ----------------------------------------------------------------------------- the launcher


def bwrap_args(spec: dict, seccomp_fd: int) -> list[str]:
    """The bwrap command line for a jail spec (see `wrap`)."""
    args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "jail"]
    if not spec["network"]:
        args.append("--unshare-net")
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL"]
    else:
        args.append("--unshare-user")
    for p in SYSTEM_DIRS:
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
    for p in SYSTEM_FILES:
        args += ["--ro-bind-try", p, p]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(spec["scratch_mb"] << 20), "--perms", "1777", "--tmpfs", "/tmp"]
    for p in spec["read_only"]:
        args += ["--ro-bind", p, p]
    for p in spec["writable"]:
        args += ["--bind", p, p]
    args.append("--clearenv")
    for k, v in spec["env"].items():
        args += ["--setenv", k, v]
    args += ["--chdir", spec["cwd"], "--seccomp", str(seccomp_fd), "--"]
    return args + spec["argv"]


def _launch(spec_json: str) -> None:
    import resource

    spec = json.loads(spec_json)
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise IsolationError("bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)")
    _enter_cgroup(spec["memory_mb"], spec["scratch_mb"], spec["pids"])
    cpu = spec["cpu_seconds"]
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        cpu = min(cpu, hard - 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    size = spec["file_mb"] << 20
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        size = min(size, hard)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    fd = os.memfd_create("seccomp", 0)  # inherited by bwrap (no CLOEXEC), read once at start-up
    os.write(fd, seccomp_program())
    os.lseek(fd, 0, os.SEEK_SET)
    args = bwrap_args(spec, fd)
    os.execv(bwrap, args)


if __name__ == "__main__":
    try:
        _launch(sys.argv[1])
    except (IsolationError, OSError, ValueError, KeyError, IndexError) as exc:
        print(f"isolation: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(125)
