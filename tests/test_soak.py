"""The soak benchmark's CI mode: two minutes of faults against the real fleet, then the ledger audit."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soak_ci_mode_loses_nothing(tmp_path):
    r = subprocess.run([sys.executable, "bench/soak.py", "--ci", "--cells", "2", "--seed", "7",
                        "--state-dir", str(tmp_path / "state")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(r.stdout)
    assert result["episodes_lost"] == 0 and result["duplicates"] == 0, result
    assert result["findings_intact"] and result["champion_consistent"] and result["progress"], result
    assert sum(result["faults_injected"].values()) >= 10
    assert result["faults_injected"] == result["faults_survived"], result
    assert r.returncode == 0
