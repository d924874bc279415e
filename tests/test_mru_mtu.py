"""bench/mru_mtu.py --quick end to end: the real fleet against the simulated model; the JSON is complete
and internally consistent (MTU x minutes = tokens, utilizations in [0, 1], every cell accounted for)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 3 minutes of paced fleet runs; run with -m slow
def test_quick_benchmark_json_is_complete_and_consistent(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "mru_mtu.py"), "--quick", "--sizes", "2", "--ablations", "unpooled",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "mru_mtu.json").read_text())
    assert (out / "mru_mtu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "paper" in doc and "ratios" in doc and "settings" in doc and doc["quick"] is True
    runs = {r["label"]: r for r in doc["runs"]}
    assert set(runs) == {"pooled-2", "unpooled-2"}
    for r in runs.values():
        for key in ("mru", "mru_after_first_eval", "agent_share", "mtu", "tokens", "tokens_to_success",
                    "time_to_success_s", "elapsed_s", "cells_detail", "cpu", "model_sim", "episodes_by_kind"):
            assert key in r, (r["label"], key)
        # every cell of the run is accounted for, with utilizations in [0, 1]
        assert set(r["cells_detail"]) == {f"cell-{i}" for i in range(r["cells"])}
        for u in [r["mru"], r["agent_share"], *(c["mru"] for c in r["cells_detail"].values()),
                  *(c["agent_share"] for c in r["cells_detail"].values())]:
            assert 0.0 <= u <= 1.0
        if r["mru_after_first_eval"] is not None:
            assert 0.0 <= r["mru_after_first_eval"] <= 1.0
        assert abs(r["mru"] - sum(c["mru"] for c in r["cells_detail"].values()) / r["cells"]) < 1e-3
        # MTU x minutes = tokens (MTU is rounded to 0.1 token/min)
        t = r["tokens"]
        assert t["total"] == t["input"] + t["output"] and 0 <= t["cached_input"] <= t["input"]
        assert t["total"] > 0 and t["calls"] > 0
        assert abs(r["mtu"] * r["elapsed_s"] / 60 - t["total"]) <= 0.1 * r["elapsed_s"] / 60 + 1 + 1e-3 * t["total"]
        # the ledger holds what the simulated model reported (a reply cut off by the stop may be missing)
        sim = r["model_sim"]
        assert t["calls"] <= sim["calls"] and t["total"] <= sim["input_tokens"] + sim["output_tokens"]
        if r["outcome"] == "target":
            assert r["time_to_success_s"] is not None and 0 < r["time_to_success_s"] <= r["elapsed_s"] + 1
            assert r["tokens_to_success"] is not None and 0 < r["tokens_to_success"] <= t["total"]
        else:
            assert r["time_to_success_s"] is None and r["tokens_to_success"] is None
        assert r["cpu"]["busy_share"] is None or 0.0 <= r["cpu"]["busy_share"] <= 1.0
    # unpooled: no background work at all
    assert runs["unpooled-2"]["episodes_by_kind"].get("background", 0) == 0
    assert not runs["unpooled-2"]["pooled"] and runs["pooled-2"]["pooled"]


def test_simulated_model_reads_the_leaderboard_and_divides_the_work(model_sim):
    """The simulated agents read the leaderboard the product writes: they promote an entry with enough
    evidence, top up the evaluation of a promising one (minus what teammates already run) and sample new
    candidates around the team's best; judged entries are left alone."""
    from bus.messages import PolicySpec
    from bus.records import CandidateRecord
    from enpire import leaderboard

    sim = model_sim
    policy = sim.Policy(sim.SearchConfig(population=3, n_seeds=5, validation_seeds=20, target=0.9, margin=0.05))
    ready = CandidateRecord("pusht", PolicySpec("c0ffee0000", {"push_gain": 0.9}), "agent-1", 19, 20, 19.0, 1400)
    judged = CandidateRecord("pusht", PolicySpec("c0ffee0000", {"push_gain": 0.8}), "agent-2", 20, 20, 20.0, 1300,
                             judged="rejected")
    promising = CandidateRecord("pusht", PolicySpec("c0ffee0000", {"push_gain": 0.7}), "agent-0", 10, 10, 10.0, 600,
                                pending=5)
    briefing = ("## Team digest\n(no findings yet)\n## Team's best candidates (tuning seeds, all agents)\n"
                + leaderboard.board_text([ready, judged, promising], 120, 5) + "\n## Champion\ncommit c0ffee0000 "
                'params {}: judged 27/40 held-out, confirmed 3/4\n\n## Your budget\n...')
    messages = [{"role": "system", "content": "..."}, {"role": "user", "content": briefing}]
    assert policy.decide("agent-3", messages)[1][0]["name"] == "read_file"
    text, calls = policy.decide("agent-3", messages)
    names = [c["name"] for c in calls]
    assert names == ["promote", "evaluate", "evaluate", "evaluate"]  # the top-up counts in the population
    assert calls[0]["arguments"] == {"params": {"push_gain": 0.9}}
    assert calls[1]["arguments"] == {"params": {"push_gain": 0.7}, "n_seeds": 5}  # 20 - 10 done - 5 running
    assert all(c["arguments"]["n_seeds"] == 5 and len(c["arguments"]["params"]) == 15 for c in calls[2:])


def test_simulated_model_sizes_a_top_up_to_the_fleet(model_sim):
    """A promising entry is topped up at once on a fleet that runs it in about one round, by doubling on a small one."""
    from bus.messages import PolicySpec
    from bus.records import CandidateRecord
    from enpire import leaderboard

    sim = model_sim
    lucky = CandidateRecord("pusht", PolicySpec("c0ffee0000", {"push_gain": 0.7}), "agent-0", 5, 5, 5.0, 300)
    for cells, n_seeds in ((8, 15), (1, 5)):
        policy = sim.Policy(sim.SearchConfig(population=1, n_seeds=5, validation_seeds=20, target=0.9))
        briefing = ("## Team's best candidates (tuning seeds, all agents)\n" + leaderboard.board_text([lucky], 120, 5)
                    + f"\n## Fleet\n{cells} cells, 0 episodes queued")
        messages = [{"role": "user", "content": briefing}]
        policy.decide("agent-0", messages)  # reads the code first
        calls = policy.decide("agent-0", messages)[1]
        assert calls[0]["arguments"] == {"params": {"push_gain": 0.7}, "n_seeds": n_seeds}


def test_the_benchmark_seed_gives_the_simulated_team_another_search(model_sim):
    """One seed replays one search (a run is one sample of it); `--seed` draws another."""
    def first_candidate(seed):
        policy = model_sim.Policy(model_sim.SearchConfig(seed=seed))
        messages = [{"role": "user", "content": "briefing"}]
        policy.decide("agent-0", messages)  # the reading turn
        _, calls = policy.decide("agent-0", messages)
        return next(c["arguments"]["params"] for c in calls if c["name"] == "evaluate")

    assert first_candidate(0) == first_candidate(0) and first_candidate(3) == first_candidate(3)
    assert first_candidate(0) != first_candidate(3)
