"""The soak benchmark's CI mode: faults against the real fleet for two minutes and until every kind was
injected once (at most ten minutes), then the ledger and replay audit."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_FAULTS = {"model_rate_limit", "model_server_error", "model_timeout", "model_bad_json", "model_not_completion",
                "model_outage"}


def test_soak_ci_mode_loses_nothing(tmp_path):
    r = subprocess.run([sys.executable, "bench/soak.py", "--ci", "--cells", "2", "--seed", "7",
                        "--state-dir", str(tmp_path / "state")], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    result = json.loads(r.stdout)
    assert result["episodes_lost"] == 0 and result["duplicates"] == 0, result
    assert result["findings_intact"], result["findings"]
    assert result["champion_consistent"], result["champion"]  # its tallies against the recorded episodes
    assert result["leaderboard_consistent"], result["leaderboard"]
    assert result["progress"], result
    assert set(result["faults_injected"]) == set(result["fault_kinds"]), result["faults_injected"]  # each kind, once or more
    assert result["faults_injected"] == result["faults_survived"], result["faults_not_survived"]
    # One agent's outage paused that agent only: the fleet recorded episodes while it was silent.
    assert len(result["outages"]) == result["faults_injected"]["model_outage"], result["outages"]
    # The agents ran on the model simulator, met every kind of backend error and recovered from each.
    assert MODEL_FAULTS <= set(result["faults_survived"]), result
    model = result["model"]
    assert result["tokens_intact"] and result["ledger_ok"] and model["retry_after_honoured"], model
    assert model["pauses_logged"] >= result["faults_injected"]["model_outage"], model
    assert model["key_redactions_logged"] >= 1 and model["files_with_key"] == [], model
    assert model["policy_sandboxes_seen"] > 0 and model["policy_sandboxes_with_key"] == 0, model
    # Hostile policies ran among the candidates; none succeeded, no sandbox process outlived the run, and
    # every recorded episode replays under the policy it is recorded under.
    hostile = result["hostile"]
    assert hostile["evaluations_share"] >= 0.1 and hostile["episodes"] > 0 and hostile["successes"] == 0, hostile
    assert result["sandbox_survivors"] == [], result["sandbox_survivors"]
    assert result["replay"]["ok"] and result["replay"]["policy_replay"]["mismatches"] == 0, result["replay"]
    assert r.returncode == 0


def test_an_outage_follows_the_agent_its_first_failure_met(model_sim):
    """The soak's outage: the first failure takes whoever asks next, the rest only that agent's requests."""
    faults = model_sim.Faults(hold_s=1.0)
    first = faults.arm("server_error")
    tail = [faults.arm("rate_limit", after=first), faults.arm("timeout", after=first)]
    ask = lambda agent: faults.take(json.dumps({"user": agent}).encode())  # noqa: E731
    assert ask("agent-2") is first and first.fired_on == "agent-2"
    assert ask("agent-0") is None and ask("agent-1") is None  # the tail is not theirs
    assert ask("agent-2") is tail[0] and ask("agent-2") is tail[1]
    assert ask("agent-2") is None and faults.disarm() == []
