from pathlib import Path

import pytest

from enpire import config as cfg
from enpire import fleet


def test_embedded_default_is_valid():
    c = cfg.Config()
    cfg.check(c)
    assert (c.cells.count, c.agents.count, c.cells.task) == (2, 1, "peg-insert-side-v3")


def test_repository_enpire_toml_is_valid():
    c = cfg.load("enpire.toml")
    assert c.cells.task in c.tasks
    assert c == cfg.Config(), "enpire.toml says it shows the embedded defaults; keep them in step"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[fleet]\nbudget_minutz = 3\n", "fleet"),  # unknown key
        ("[cells]\nreal = true\n", "real"),  # gone: a real robot joins as `enpire cell --real`, never as a local cell
        ("[cells]\ncount = 'two'\n", "cells.count"),  # wrong type
        ("[cells]\ncount = -1\n", "cells.count"),  # impossible value
        ("[cells]\ntask = 'stack-blocks'\n", "cells.task"),  # missing task
        ("[tasks.pusht]\nhorizon = 0\n", "tasks.pusht.horizon"),
        ("[tasks.pusht]\nheldout_seeds = {start = 0, count = 500}\n", "tasks.pusht.heldout_seeds"),
        ("[fleet]\ntarget = 1.5\n", "fleet.target"),
        ("[fleet]\nfinal_seeds = 200000\n", "fleet.final_seeds 200000"),  # more than the held-out pool
        ("[scheduler]\npromote_seeds = 200000\n", "scheduler.promote_seeds 200000"),
        ("[agents]\nnotes_dir = '/nonexistent/notes'\n", "agents.notes_dir"),  # a typo, found at start
        # a verifier that does not exist or cannot judge that way: refused at start, not at every verdict
        ("[tasks.pusht]\nverifier_kind = 'nope'\n", "tasks.pusht.verifier_kind: unknown verifier kind 'nope'"),
        ("[tasks.pusht]\nverifier_kind = 'no.such.module:fn'\n", "tasks.pusht.verifier_kind"),
        ("[tasks.peg-insert-side-v3]\nverifier = 'vision'\n", "tasks.peg-insert-side-v3.verifier: 'vision'"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(text, key):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.decode(text, "enpire.toml")
    message = str(err.value)
    assert message.startswith("enpire.toml: ") and key in message and "\n" not in message


def test_the_built_in_verifier_kinds_are_those_the_verifier_dispatches():
    from enpire.verify import TASK_KINDS
    from hw.plugins import BUILTIN_METHODS

    assert set(BUILTIN_METHODS) == set(TASK_KINDS)
    cfg.decode("[tasks.pusht]\nverifier = 'vision'\nverifier_kind = 'pusht'\n")  # accepted: Push-T judges frames


def test_unknown_key_is_named():
    with pytest.raises(cfg.ConfigError, match="budget_minutz"):
        cfg.decode("[fleet]\nbudget_minutz = 3\n", "enpire.toml")


def test_a_byte_order_mark_is_read_and_an_endless_file_is_refused(tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[cells]\ncount = 1\n")  # as some Windows editors save it
    assert cfg.load(bom).cells.count == 1
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load("/dev/zero")  # read up to a bound, never whole
    assert "/dev/zero: larger than 1 MiB" in str(e.value)


def test_command_line_overrides_are_validated():
    c = cfg.with_overrides(cfg.Config(), **{"cells.count": 4, "fleet.target": None})
    assert c.cells.count == 4 and c.fleet.target == 0.9
    with pytest.raises(cfg.ConfigError, match="cells.count"):
        cfg.with_overrides(cfg.Config(), **{"cells.count": -2})


def test_print_config_round_trips():
    c = cfg.Config()
    assert cfg.decode(cfg.to_toml(c)) == c


@pytest.mark.parametrize(
    "text, key",
    [
        ("[sandbox]\nmemory_mb = 9223372036854775807\n", "sandbox.memory_mb"),
        ("[sandbox]\ncpu_seconds = 9223372036854775807\n", "sandbox.cpu_seconds"),
        ("[cells]\ncount = 1000000\n", "cells.count"),
        ("[agents]\ncount = 1000000\n", "agents.count"),
        ("[fleet]\nbudget_minutes = inf\n", "fleet.budget_minutes"),
        ("[fleet]\nbudget_minutes = nan\n", "fleet.budget_minutes"),
        ("[agents]\nwall_budget_minutes = inf\n", "agents.wall_budget_minutes"),
        ("[fleet]\nmap_size_mb = 1000000000\n", "fleet.map_size_mb"),
        ("[scheduler]\nlease_s = 1e300\n", "scheduler.lease_s"),
        ("[tasks.pusht]\ntuning_seeds = {start = 4294967000, count = 1000}\n", "tasks.pusht.tuning_seeds"),
    ],
)
def test_absurd_numbers_are_refused_in_one_line(text, key):
    with pytest.raises(cfg.ConfigError) as e:
        cfg.decode(text, "x.toml")
    assert str(e.value).startswith(f"x.toml: {key}") and "\n" not in str(e.value), e.value


def test_state_dir_checks(tmp_path):
    assert cfg.state_dir_problem(tmp_path / "state") is None
    assert cfg.state_dir_problem(tmp_path) is None  # an existing empty dir of its own is fine
    for bad in ("/", "/proc/self", "/sys/kernel", "/etc", "/usr/lib/enpire", "/tmp", "/root/..", "~"):
        problem = cfg.state_dir_problem(bad)
        assert problem and "\n" not in problem, bad
    (tmp_path / "file").write_text("x")
    assert "not a directory" in (cfg.state_dir_problem(tmp_path / "file") or "")
    assert "empty" in (cfg.state_dir_problem("") or "")  # an unset variable: never the current directory
    # A folder with other files and no fleet state (a project, /var/log) is never adopted (nor chmod-ed)
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.csv").write_text("1,2\n")
    assert "holds other files (e.g. 'data.csv')" in (cfg.state_dir_problem(project) or "")
    (project / "daemon.lock").write_text("")  # a fleet's state dir (one that started here before) is its own
    assert cfg.state_dir_problem(project) is None


@pytest.mark.parametrize("state_dir", ["/proc/self", "FILE", "/sys/kernel"])
def test_daemon_refuses_a_bad_state_dir_with_exit_2(state_dir, tmp_path):
    import subprocess
    import sys

    if state_dir == "FILE":
        state_dir = str(tmp_path / "file")
        Path(state_dir).write_text("x")
    r = subprocess.run([sys.executable, "-m", "enpire.fleet", "--state-dir", state_dir, "--cells", "0",
                        "--agents", "0", "--budget-minutes", "0.01", "--quiet"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "state_dir" in r.stderr


def test_a_gpu_the_daemon_cannot_train_on_is_refused_at_start_in_one_line(tmp_path):
    """[trainer] device = "cuda:7" on a machine without it: exit 2 before anything starts, not a failed
    training job minutes into the run. With local_slots = 0 only joined trainers train: no check here."""
    import subprocess
    import sys

    import torch

    argv = [sys.executable, "-m", "enpire.fleet", "--state-dir", str(tmp_path / "state"), "--cells", "0",
            "--agents", "0", "--budget-minutes", "0.01", "--quiet", "--config"]
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    (tmp_path / "gpu.toml").write_text("[trainer]\ndevice = 'cuda:7'\n")
    r = subprocess.run([*argv, str(tmp_path / "gpu.toml")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "trainer.device" in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()
    assert fleet.trainer_device_problem("cpu") is None and fleet.trainer_device_problem("auto") is None


def test_what_would_fail_every_episode_is_refused_at_load_naming_the_key(tmp_path):
    """A starting policy that does not compile, driver options the driver does not take: each ran a whole
    budget doing nothing, now one line."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "policy.py").write_text("def act(obs:\n    return [0.0, 0.0]\n")
    cases = {
        f'[fleet]\nbaseline = "{bad}"\n[agents]\ncount = 0\n': "fleet.baseline: '" + str(bad / "policy.py")
        + "' does not compile (line 1",
        '[tasks.peg-insert-side-v3]\ndriver = "peg-insert-side-v3"\n[tasks.peg-insert-side-v3.driver_options]\n'
        'foo = 1\n': "tasks.peg-insert-side-v3.driver_options: driver 'peg-insert-side-v3' (MetaWorldDriver) "
        "does not take them: got an unexpected keyword argument 'foo'",
    }
    for text, error in cases.items():
        with pytest.raises(cfg.ConfigError) as e:
            cfg.check(cfg.decode(text, "t.toml"), "t.toml")
        assert str(e.value).startswith(f"t.toml: {error}"), str(e.value)
    # the options a driver takes pass
    cfg.check(cfg.decode('[cells]\ntask = "pusht"\n[tasks.pusht]\ndriver = "pusht"\n[tasks.pusht.driver_options]\n'
                         'frame_size = 64\n', "t.toml"))


def test_a_task_the_built_in_agent_cannot_work_on_is_refused_at_start_in_one_line(tmp_path):
    """door-open-v3 has no template of the built-in agent: a traceback before; one line, exit 2 now, and
    judged after the command line's flags (with --agents 0 there is no built-in agent to refuse)."""
    import subprocess
    import sys

    config = tmp_path / "door.toml"
    config.write_text('[cells]\ntask = "door-open-v3"\n[tasks.door-open-v3]\ndriver = "door-open-v3"\n')

    def start(*flags: str) -> list[str]:
        r = subprocess.run([sys.executable, "-m", "enpire.fleet", "--config", str(config), "--state-dir",
                            str(tmp_path / "s"), "--quiet", *flags], capture_output=True, text=True, timeout=60,
                           cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 2, r.stderr
        return r.stderr.strip().splitlines()

    lines = start()
    assert len(lines) == 1 and "no policy template for driver 'door-open-v3'" in lines[0], lines
    assert "no policy template" not in start("--agents", "0")[0]  # refused for another reason: no policy at all
