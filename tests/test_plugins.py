"""Drivers as plugins: a driver from a separately installed package (entry point) runs in a fleet."""

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from bus.messages import EvalRequest, EvalResult, PolicySpec
from enpire import config as cfg
from enpire.fleet import open_state_dir, start_core
from hw import PluginError, make_driver, verifier_name

PLUGIN = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """pip-install the plugin package into a folder of its own (as a user's separate package would be)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(PLUGIN)],
        check=True, capture_output=True, timeout=300,
    )
    assert list(target.glob("enpire_reach_plugin-*.dist-info/entry_points.txt"))
    return target


@pytest.fixture
def plugin_path(installed_plugin, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(installed_plugin))  # this process finds the entry point ...
    monkeypatch.setenv("PYTHONPATH", str(installed_plugin))  # ... and so do the cell processes
    return installed_plugin


def test_unknown_driver_is_one_line_error():
    with pytest.raises(PluginError) as e:
        make_driver("no-such-robot")
    assert "\n" not in str(e.value) and "no-such-robot" in str(e.value) and "enpire.drivers" in str(e.value)
    with pytest.raises(cfg.ConfigError, match=r"^x\.toml: tasks\.arm\.driver: unknown driver 'no-such-robot'"):
        cfg.decode('[cells]\ntask = "arm"\n[tasks.arm]\ndriver = "no-such-robot"\n', "x.toml")
    with pytest.raises(cfg.ConfigError, match="cannot import 'nowhere.mod'"):
        cfg.decode('[cells]\ntask = "arm"\n[tasks.arm]\ndriver = "nowhere.mod:Arm"\n', "x.toml")


def test_a_plugin_that_fails_as_it_loads_is_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "broken_verifier.py").write_text("raise RuntimeError('calibration file missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(cfg.ConfigError) as e:
        cfg.decode('[tasks.pusht]\nverifier_kind = "broken_verifier:verify"\n', "x.toml")
    assert str(e.value) == ("x.toml: tasks.pusht.verifier_kind: verifier 'broken_verifier:verify': importing "
                            "'broken_verifier' failed: RuntimeError: calibration file missing")


def test_unknown_driver_stops_a_cell_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "enpire.cell", "--connect", f"ipc://{tmp_path}/bus", "--cell-id", "c",
                        "--driver", "no-such-robot"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown driver 'no-such-robot'" in r.stderr


def test_limits_for_an_action_the_robot_lacks_is_refused():
    import numpy as np

    from enpire.safety import named_bounds

    low, high, problem = named_bounds(["x", "y"], np.zeros(2), np.full(2, 512.0), {"x": [10, 20]})
    assert problem is None and list(low) == [10, 0] and list(high) == [20, 512]
    assert "unknown action 'z'" in named_bounds(["x", "y"], np.zeros(2), np.ones(2), {"z": [0, 1]})[2]
    assert "no limit for action 'y'" in named_bounds(["x", "y"], np.zeros(2), np.array([1, np.inf]), {},
                                                     require_all=True)[2]


def test_entry_point_driver_and_its_verifier_resolve(plugin_path):
    driver = make_driver("reach2d", gain=0.25)
    assert type(driver).__module__ == "enpire_reach_plugin" and driver.gain == 0.25
    assert verifier_name("reach2d") == "enpire_reach_plugin:verify_reach"
    config = cfg.decode('[cells]\ntask = "reach"\n[agents]\ncount = 0\n[tasks.reach]\ndriver = "reach2d"\nhorizon = 20\n', "x.toml")
    assert config.task().driver == "reach2d"
    from enpire.tasks import card

    text = card("reach", config).render()  # the plugin's own task card, in the one task registry
    assert "Point reach (plugin)" in text and "[2:4] goal (unit square)" in text


async def test_plugin_driver_runs_in_a_fleet(plugin_path, tmp_path):
    """A fleet core with one cell process running the plugin's driver; the plugin's verifier judges."""
    text = ('[cells]\ncount = 1\ntask = "reach"\n[agents]\ncount = 0\n[scheduler]\nbackground = false\n'
            '[tasks.reach]\ndriver = "reach2d"\nhorizon = 12\n[tasks.reach.driver_options]\ngain = 0.5\n'
            '[tasks.reach.limits]\nmax_delta = 1.0\n')
    config = cfg.decode(text, "plugin.toml")
    board, meta = open_state_dir(tmp_path / "state")
    results = {}
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, tmp_path / "state", board, meta)
        goal = core.workspace.commit("agent/t", {"policy.py": (PLUGIN / "baseline" / "policy.py").read_text()}, "goal")
        still = core.workspace.commit("agent/t", {"policy.py": "import numpy as np\nclass Policy:\n"
                                                  "    def __init__(self, params): pass\n"
                                                  "    def act(self, obs): return np.asarray(obs[:2])\n"}, "still")
        with trio.fail_after(120):
            for name, commit in (("goal", goal), ("still", still)):
                results[name] = await core.scheduler.ask(
                    EvalRequest(job_id=name, agent="t", task="reach", policy=PolicySpec(commit, {}),
                                seeds=[1, 2, 3]), timeout=120)
        core.stopping.set()
        nursery.cancel_scope.cancel()
    board.close()
    for r in results.values():
        assert isinstance(r, EvalResult), r
    # 12 steps at gain 0.5 leave 0.5**12 of the distance: within tolerance; standing still is not.
    assert [e.success for e in results["goal"].episodes] == [True] * 3
    assert [e.success for e in results["still"].episodes] == [False] * 3
    assert all(e.reason.startswith("distance") for e in results["still"].episodes)
