"""The installed `enpire` command: version, help, every subcommand reachable, `python -m` kept."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from enpire import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "enpire"  # installed by `pip install -e .` (.ci/run does it)


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_installed_command_prints_version_and_lists_commands():
    assert SCRIPT.exists(), f"{SCRIPT} missing: the console script is not installed (pip install -e .)"
    r = _run(str(SCRIPT), "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"enpire {metadata.version('enpire')}"
    r = _run(str(SCRIPT), "--help")
    assert r.returncode == 0
    for name in ("fleet", "status", "logs", "report", "cell"):
        assert f"\n  {name} " in r.stdout
    r = _run(sys.executable, "-m", "enpire", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"enpire {metadata.version('enpire')}"


def test_every_subcommand_runs_under_its_own_name():
    for name in cli.COMMANDS:
        r = _run(str(SCRIPT), name, "--help")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"usage: enpire {name} "), r.stdout[:200]
    r = _run(sys.executable, "-m", "enpire.status", "--help")  # the module entry points keep working
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m enpire.status ")


def test_unknown_command_and_bad_state_dir_are_one_line_errors(tmp_path):
    r = _run(str(SCRIPT), "fleets")
    assert r.returncode == 2 and "invalid choice: 'fleets'" in r.stderr
    r = _run(str(SCRIPT), "status", "--state-dir", str(tmp_path / "none"))
    assert r.returncode == 2 and r.stderr.strip() == f"enpire status: {tmp_path / 'none'}: no fleet state here"
    for bad in ("5", "nan", "-1"):
        r = _run(str(SCRIPT), "report", "--state-dir", str(tmp_path), "--target", bad)
        assert r.returncode == 2 and "a success rate, between 0 and 1" in r.stderr, r.stderr
    for argv, says in ((["cell", "--cell-id", "../arm", "--connect", "tcp://127.0.0.1:7700"], "--cell-id: '../arm'"),
                       (["cell", "--cell-id", "arm-1", "--connect", "localhost:7700"], "--connect: 'localhost:7700'"),
                       (["trainer", "--trainer-id", "gpu 1", "--connect", "tcp://127.0.0.1:7700"], "--trainer-id"),
                       (["trainer", "--connect", "tcp://:7700"], "not an address to dial")):
        r = _run(str(SCRIPT), *argv)
        assert r.returncode == 2 and says in r.stderr.splitlines()[-1], r.stderr


@pytest.mark.parametrize("argv, prefix", [
    (["cell", "--cell-id", "arm-9", "--unconfined"], "enpire-arm-9-"),
    (["trainer", "--trainer-id", "gpu-9", "--device", "cpu"], "enpire-trainer-gpu-9-"),
])
def test_a_stop_signal_ends_a_peer_as_ctrl_c_does_and_it_cleans_up(tmp_path, argv, prefix):
    """SIGTERM (a supervisor's stop, `kill`) ends a cell or a remote trainer the way Ctrl-C does: what it
    holds is let go on the way out (here, while it waits for a fleet, the scratch folder it made itself), exit 130.
    Before, the signal killed it on the spot and every run left its folder behind in /tmp."""
    import signal
    import socket
    import time

    with socket.socket() as s:  # an address nobody listens on: the peer waits for its fleet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ENPIRE_SECRET"} | {"TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([str(SCRIPT), *argv, "--connect", f"tcp://127.0.0.1:{port}", "--connect-timeout", "120"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(prefix) for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.1)
        time.sleep(0.5)  # inside its wait for the fleet
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(prefix)]


def test_a_command_is_one_registration(tmp_path, monkeypatch, capsys):
    (tmp_path / "extra_cmd.py").write_text(
        "def main(argv=None, prog='python -m extra_cmd'):\n    print(prog, argv)\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "extra", ("extra_cmd", "a command added by one line"))
    assert cli.main(["extra", "--flag", "x"]) == 7
    assert capsys.readouterr().out == "enpire extra ['--flag', 'x']\n"


def _damaged_records(state: Path, *records: tuple[bytes, bytes]) -> None:
    """A state dir whose blackboard opens but holds records (table, key) that are not what their table says."""
    import lmdb

    from bus.blackboard import Blackboard

    Blackboard(state / "blackboard.lmdb").close()
    env = lmdb.open(str(state / "blackboard.lmdb"), max_dbs=64)
    with env.begin(write=True) as txn:
        for table, key in records:
            txn.put(key, b"\xc1not msgpack", db=env.open_db(table, txn=txn))
    env.close()


def test_a_damaged_state_dir_is_a_one_line_error_for_every_reader(tmp_path):
    """Not an LMDB file, or one record that does not decode: every command names it in one line, exit 2,
    and the daemon does not hang restarting the actor that cannot load it."""
    unreadable = tmp_path / "unreadable"
    (unreadable / "blackboard.lmdb").mkdir(parents=True)
    (unreadable / "blackboard.lmdb" / "data.mdb").write_bytes(b"\x00garbage" * 1000)
    damaged = tmp_path / "damaged"
    _damaged_records(damaged, (b"jobs", b"job-1"), (b"episodes", b"job-1:0"), (b"champion", b"pusht"))
    for state, reason in ((unreadable, "not a readable blackboard"), (damaged, "not a valid")):
        for argv in (["status"], ["report"], ["replay", "--list"], ["export-policy", "--out", str(tmp_path / "o")]):
            r = _run(str(SCRIPT), *argv, "--state-dir", str(state))
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and reason in r.stderr, (argv, r.stderr)
    r = _run(str(SCRIPT), "fleet", "--state-dir", str(unreadable), "--budget-minutes", "0.1", "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a readable blackboard" in r.stderr, r.stderr
    r = _run(str(SCRIPT), "fleet", "--state-dir", str(damaged), "--budget-minutes", "0.1", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("enpire: queue could not start: RecordError: blackboard table 'jobs' "
                                                "key 'job-1'"), r.stderr
    from enpire.config import Config

    task = Config().cells.task.encode()  # the champion the daemon reads before it starts
    _damaged_records(tmp_path / "champion", (b"champion", task))
    r = _run(str(SCRIPT), "fleet", "--state-dir", str(tmp_path / "champion"), "--budget-minutes", "0.1", "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"blackboard table 'champion' key '{task.decode()}': not a valid Champion" in r.stderr


def test_logs_show_every_line_even_ones_that_are_not_ours(tmp_path, capsys):
    """A torn line, a JSON value that is not an object, fields of unexpected types: shown, never a traceback."""
    from enpire import logs

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "fleet.jsonl").write_bytes(
        b'{"event": "cell_joined", "level": "info", "actor": "queue", "timestamp": "2026-12-03T10:00:00Z"}\n'
        b'[1, 2]\n\xff\xfe torn\n{"event": "odd", "level": ["x"], "timestamp": 5, "actor": {"a": 1}}\n'
        b'{"event": "boom", "level": "error", "actor": "judge"}')
    assert logs.main(["--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and "cell_joined" in out[0] and out[1] == "(unparsed) [1, 2]" and "odd" in out[3]
    assert logs.main(["--state-dir", str(tmp_path), "--level", "error", "--actor", "judge"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if not line.startswith("(unparsed)")] == [" error   judge        boom "]


@pytest.mark.parametrize("how", ["enpire", "python -m"])
def test_a_reader_that_goes_away_stops_a_command_quietly(tmp_path, how):
    """`enpire status | head -1`: the rest of the output has nowhere to go; no traceback."""
    (tmp_path / "chatty_cmd.py").write_text(
        "import sys, time\ndef main(argv=None, prog=''):\n    print('line', 0, flush=True)\n"
        "    time.sleep(0.5)  # the reader is gone by now\n    for i in range(3):\n        print('line', i)\n"
        "    return 0\n"
        "if __name__ == '__main__':\n    from enpire import command\n\n    sys.exit(command.run(main))\n")
    code = ("import sys; from enpire import cli; cli.COMMANDS['chatty'] = ('chatty_cmd', 'prints a lot'); "
            "sys.exit(cli.main(['chatty']))")
    argv = [sys.executable, "-c", code] if how == "enpire" else [sys.executable, "-m", "chatty_cmd"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # the reader goes away
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""


def test_every_command_run_as_a_module_ends_as_the_enpire_command_does():
    """`python -m enpire.status | head -1` as quiet as `enpire status | head -1`: each command's module
    runs its main through `command.run`."""
    for module, _ in cli.COMMANDS.values():
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert source.rstrip().endswith("sys.exit(command.run(main))"), module
