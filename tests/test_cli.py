"""The installed `enpire` command: version, help, every subcommand reachable, `python -m` kept."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

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


def test_a_command_is_one_registration(tmp_path, monkeypatch, capsys):
    (tmp_path / "extra_cmd.py").write_text(
        "def main(argv=None, prog='python -m extra_cmd'):\n    print(prog, argv)\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "extra", ("extra_cmd", "a command added by one line"))
    assert cli.main(["extra", "--flag", "x"]) == 7
    assert capsys.readouterr().out == "enpire extra ['--flag', 'x']\n"
