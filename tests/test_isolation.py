"""The isolation engine (enpire/isolation.py): each promise of a Jail, checked from inside one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enpire import isolation
from enpire.isolation import Jail, release, usage, wrap

pytestmark = pytest.mark.skipif(isolation.check() is not None, reason=f"no isolation engine: {isolation.check()}")

PY = isolation.python_paths()


def run(code: str, jail: Jail | None = None, timeout: float = 60) -> tuple[int, str, str, isolation.Usage | None]:
    jail = jail or Jail(read_only=PY, memory_mb=256, pids=16, scratch_mb=8, cpu_seconds=5)
    proc = subprocess.Popen(wrap(jail, [sys.executable, "-I", "-c", code]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    used = usage(proc.pid)
    release(proc.pid)
    return proc.returncode, out.decode(), err.decode(), used


def test_check_reports_a_working_engine() -> None:
    assert isolation.check() is None


def test_only_what_is_bound_is_visible(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("s")
    rc, out, err, _ = run(f"import os; print(sorted(os.listdir('/'))); print(os.path.exists({str(tmp_path)!r}));"
                          "print(os.listdir('/tmp')); print(sorted(os.environ))")
    assert rc == 0, err
    lines = out.splitlines()
    assert "home" not in lines[0] and "sys" not in lines[0] and "var" not in lines[0]
    # No host files in /tmp: only the folders leading to bound code when the checkout itself is under /tmp.
    bound_in_tmp = {Path(q).parts[2] for q in PY if Path(q).is_relative_to("/tmp") and len(Path(q).parts) > 2}
    assert lines[1] == "False" and set(eval(lines[2])) <= bound_in_tmp
    assert set(eval(lines[3])) <= {"PWD", "LC_CTYPE"}  # bwrap's PWD, Python's C-locale coercion: nothing else


def test_read_only_and_writable_binds(tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "f").write_text("x")
    jail = Jail(read_only=(*PY, ro), writable=(rw,), env={"A": "1"}, cwd=rw)
    code = (f"import os\ntry:\n open({str(ro / 'f')!r}, 'w')\nexcept OSError as e: print('ro', e.errno)\n"
            f"open('out', 'w').write(os.environ['A'] + os.getcwd())")
    rc, out, err, _ = run(code, jail)
    assert rc == 0, err
    assert out.strip() == "ro 30"  # EROFS
    assert (rw / "out").read_text() == "1" + str(rw)


def test_seccomp_refuses_namespaces_ptrace_keyctl() -> None:
    code = ("import ctypes, os\nl = ctypes.CDLL(None, use_errno=True)\n"
            "print(l.unshare(0x10000000), l.syscall(101, 16, 1, 0, 0), l.syscall(250, 0, 0, 0, 0),"
            " l.syscall(165, 0, 0, 0, 0, 0))\n"
            "r = os.fork()\nif r == 0: os._exit(0)\nos.waitpid(r, 0); print('fork ok')")
    rc, out, err, _ = run(code)
    assert rc == 0, err
    assert out.split() == ["-1", "-1", "-1", "-1", "fork", "ok"]


def test_no_network_unless_asked() -> None:
    code = "import socket\ntry:\n socket.create_connection(('1.1.1.1', 80), timeout=2)\nexcept OSError as e: print(e.errno)"
    _rc, out, _err, _ = run(code)
    assert out.strip() == "101"  # ENETUNREACH: an empty network namespace
    code = "import socket; print(len(socket.if_nameindex()) > 1)"
    _rc, out, err, _ = run(code, Jail(read_only=PY, network=True))
    assert out.strip() == "True", err  # the host's interfaces


def test_pids_limit_stops_a_fork_bomb() -> None:
    code = ("import os, time\nn = 0\nwhile n < 200:\n try:\n  if os.fork() == 0:\n   time.sleep(30); os._exit(0)\n"
            "  n += 1\n except OSError:\n  break\nprint(n)")
    rc, out, err, _ = run(code, Jail(read_only=PY, pids=10), timeout=60)
    assert rc == 0, err
    assert int(out) < 10


def test_memory_limit_counts_memfds_and_scratch() -> None:
    hoard = "import os\nfd = os.memfd_create('x')\nb = b'x' * (1 << 20)\nfor _ in range(300): os.write(fd, b)\nprint('kept')"
    rc, out, _err, used = run(hoard, Jail(read_only=PY, memory_mb=128))
    assert rc == 128 + 9 and "kept" not in out  # SIGKILL by the kernel at the cgroup limit
    assert used is not None and used.oom_kills >= 1
    fill = ("b = b'x' * (1 << 20)\nf = open('/tmp/a', 'wb')\ntry:\n for _ in range(100): f.write(b); f.flush()\n"
            "except OSError as e: print(e.errno)")
    rc, out, err, _ = run(fill, Jail(read_only=PY, scratch_mb=8))
    assert rc == 0 and out.strip() == "28", err  # ENOSPC at the scratch size


def test_cpu_limit_and_usage() -> None:
    rc, _out, _err, used = run("while True: pass", Jail(read_only=PY, cpu_seconds=1))
    assert rc == 128 + 24  # SIGXCPU
    assert used is not None and used.cpu_s >= 0.3  # cgroup time (exact) runs below the tick-based rlimit on a VM
    ignore = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    rc, _out, _err, used = run(ignore, Jail(read_only=PY, cpu_seconds=1))
    assert rc == 128 + 9 and used is not None and used.cpu_s >= 0.6  # the hard limit a second later


def test_file_size_limit_covers_binds_and_inherited_files(tmp_path: Path) -> None:
    """RLIMIT_FSIZE: no file the jail writes grows past file_mb, on a writable bind or through a file the
    daemon handed it (its stderr log); the write fails with EFBIG once SIGXFSZ is ignored."""
    rw = tmp_path / "rw"
    rw.mkdir()
    code = ("import signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "for target in (open('big', 'wb'), sys.stderr.buffer):\n"
            " try:\n  [target.write(bytes(1 << 16)) or target.flush() for _ in range(64)]\n"
            " except OSError as e: print(e.errno)")
    jail = Jail(read_only=PY, writable=(rw,), cwd=rw, file_mb=1)
    with open(tmp_path / "stderr.log", "wb") as log:
        proc = subprocess.Popen(wrap(jail, [sys.executable, "-I", "-c", code]), stdout=subprocess.PIPE, stderr=log)
        out, _ = proc.communicate(timeout=60)
        release(proc.pid)
    assert out.split() == [b"27", b"27"]  # EFBIG, twice
    assert (rw / "big").stat().st_size == 1 << 20 and (tmp_path / "stderr.log").stat().st_size == 1 << 20
    rc, _out, _err, _ = run("open('/tmp/x', 'wb').write(bytes(3 << 20))", Jail(read_only=PY, file_mb=4))
    assert rc == 0  # under the limit: no effect


def test_every_descendant_dies_with_the_jail(tmp_path: Path) -> None:
    """A double-forked, setsid'd grandchild cannot outlive the jail."""
    code = ("import os, time\nif os.fork() == 0:\n os.setsid()\n if os.fork() == 0:\n  time.sleep(60); os._exit(0)\n"
            " os._exit(0)\ntime.sleep(0.3)\nprint('parent done')")
    jail = Jail(read_only=PY)
    proc = subprocess.Popen(wrap(jail, [sys.executable, "-c", code]), stdout=subprocess.PIPE)
    proc.communicate(timeout=30)
    cg = isolation._existing_dirs(proc.pid)
    deadline = time.monotonic() + 5  # the kernel tears a pid namespace down asynchronously
    while any(isolation._procs(d) for d in cg.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(isolation._procs(d) for d in cg.values())  # pid namespace gone: nothing left
    release(proc.pid)
    assert not isolation._existing_dirs(proc.pid)
    # Killing the jail from outside while it runs kills the whole tree too.
    proc = subprocess.Popen(wrap(jail, [sys.executable, "-c", "import os, time\nos.fork(); os.fork(); time.sleep(60)"]))
    time.sleep(1.0)
    procs = {p for d in isolation._existing_dirs(proc.pid).values() for p in isolation._procs(d)}
    assert len(procs) >= 4
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() and _state(p) != "Z" for p in procs)
    release(proc.pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_jail_rejects_absurd_limits() -> None:
    with pytest.raises(ValueError, match="Jail.memory_mb"):
        Jail(memory_mb=2**63 - 1)
    with pytest.raises(ValueError, match="Jail.pids"):
        Jail(pids=0)


def test_seccomp_program_shape() -> None:
    prog = isolation.seccomp_program()
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096  # BPF_MAXINSNS
    assert prog[-8:] == (0x06).to_bytes(2, "little") + b"\0\0" + (0x7FFF0000).to_bytes(4, "little")


def test_os_environment_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENPIRE_SECRET", "topsecret")
    rc, out, err, _ = run("import os; print(dict(os.environ))")
    assert rc == 0 and "topsecret" not in out, err
    assert os.environ["ENPIRE_SECRET"] == "topsecret"
