"""A misspelled policy parameter or an empty seed range is refused by name, never dropped silently."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enpire.agents import metaworld_drawer_policy, metaworld_peg_policy, pusht_policy
from enpire.learning import mlp_policy, visuomotor_policy

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("template", [pusht_policy, metaworld_peg_policy, metaworld_drawer_policy])
def test_templates_refuse_unknown_parameters_by_name(template):
    name, value = next(iter(template.INITIAL_PARAMS.items()))
    assert template.Policy({name: value + 1.0}).p[name] == value + 1.0  # a known one is taken
    with pytest.raises(ValueError, match=rf"unknown policy parameter\(s\) {name}x;.*{name}"):
        template.Policy({f"{name}x": 1.0})


@pytest.mark.parametrize("module", [mlp_policy, visuomotor_policy])
def test_trained_policies_take_no_parameters(module):
    weights = {"w0": np.zeros((4, 2)), "b0": np.zeros(2)}  # refused before the weights are looked at
    with pytest.raises(ValueError, match="unknown policy parameter\\(s\\) gain; a trained policy takes none"):
        module.Policy({"gain": 1.0}, weights=weights)


def _policy_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enpire.agents.policy_eval", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_policy_eval_refuses_an_empty_seed_range_and_an_unknown_parameter():
    r = _policy_eval("--seeds", "5:5")
    assert r.returncode == 2 and "'5:5' holds no seed" in r.stderr and not r.stdout
    r = _policy_eval("--seeds", "9:3")
    assert r.returncode == 2 and "holds no seed" in r.stderr
    for outside in ("--seeds=-3:2", "--seeds=4294967296:4294967297"):  # no simulator takes them: one line, not a traceback
        r = _policy_eval(outside)
        assert r.returncode == 2 and "seeds are 0 to 2**32 - 1" in r.stderr and "Traceback" not in r.stderr
    r = _policy_eval("--params", '{"ang_lenn": 80}', "--seeds", "0:1")
    assert r.returncode == 2 and "unknown policy parameter(s) ang_lenn" in r.stderr and not r.stdout
    r = _policy_eval("--params", '{"ang_len": 80}', "--seeds", "0:1")  # the correct name runs
    assert r.returncode == 0, r.stderr[-1000:]
    assert json.loads(r.stdout)["episodes"] == 1
