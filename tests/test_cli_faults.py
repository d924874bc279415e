"""Two CLI agents on two cells, with faults: a CLI killed mid-run, one that hangs, one that exits non-zero.

Each is stopped and started again with backoff while the cells keep running, and the fleet keeps its
robots busy (MRU >= 0.8 over the run). Minutes long: marked slow (tests/test_cli_backend.py has the fast
restart test of each fault).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.cli_harness import MAIN_TOOL, PROVIDER, require, shell
from tests.scripted_models import Reply, ScriptedModel
from tests.test_cli_fleet import POLICY, start_fleet


def busy_agent(kind: str, faults: dict[str, int]):
    """A stateless script (the reply depends only on the request): write a policy once, then evaluate and
    wait, again and again; the Nth main request of the run hangs, the Mth makes the CLI exit non-zero."""
    count = {"n": 0}

    def script(ex) -> Reply:
        if MAIN_TOOL[kind] not in ex.tools:
            return Reply(text="ok")
        count["n"] += 1
        if count["n"] == faults["hang"]:
            return Reply(text="thinking...", delay_s=900)
        if count["n"] == faults["exit"]:
            return Reply(calls=shell(kind, "kill -TERM $PPID"))
        last = ex.results[-1] if ex.results else ""
        if not ex.results:
            if "READY" in json.dumps(ex.body):  # a resumed run: the policy is there
                return Reply(calls=((ex.tool("jobs"), {}),))
            return Reply(calls=shell(kind, f"test -f policy.py || {{ cat > policy.py <<'EOF'\n{POLICY}EOF\n"
                                           "git add policy.py && git commit -qm pusher; }; echo READY"))
        running = re.search(r'"job":"([^"]+)","kind":"evaluate"[^\n]*"state":"running"', last)
        if running:
            return Reply(calls=((ex.tool("wait"), {"jobs": [running.group(1)], "timeout_s": 120}),))
        if count["n"] % 7 == 0:
            return Reply(text="End of this turn.")
        return Reply(calls=((ex.tool("evaluate"), {"n_seeds": 10, "params": {"step": 30 + count["n"] % 20}}),))

    return script


def _cli_pids(state: Path) -> list[int]:
    """The CLI processes (claude/codex) of the fleet's agents, found by their working directory."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if cwd.startswith(str(state / "cli")) and name in ("claude", "codex", "node", "claude.exe", "MainThread"):
            found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["claude-code", "codex"])
def test_two_cli_agents_survive_faults_and_keep_robots_busy(tmp_path, kind):
    require(kind)
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    (baseline / "policy.py").write_text(POLICY)
    killed = []
    with ScriptedModel(PROVIDER[kind], busy_agent(kind, {"hang": 6, "exit": 14})) as model:
        proc = start_fleet(tmp_path, kind, model.url, agents=2, max_turns=0, turn_minutes=1.0, budget_minutes=2.5,
                           baseline=str(baseline))

        def killer():
            time.sleep(45)  # mid-run: kill one CLI process from outside
            pids = _cli_pids(tmp_path / "state")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        threading.Thread(target=killer, daemon=True).start()
        out, err = proc.communicate(timeout=400)
    assert proc.returncode == 3, f"exit {proc.returncode}\n{err[-3000:]}"  # ran to its budget
    report = json.loads((tmp_path / "state" / "report.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "state" / "logs" / "fleet.jsonl").read_text().splitlines()]
    restarts = [e for e in log if e.get("event") == "cli_restart"]
    reasons = " | ".join(e["reason"] for e in restarts)
    assert killed, "no CLI process found to kill"
    # the hang, the non-zero exit and the kill from outside (its jail's init reports the CLI's SIGKILL as 247)
    # (SIGTERM: Claude Code exits 143 itself; Codex dies of it, which the jail's init reports as 241)
    assert "no result within 60 s" in reasons and re.search(r"exit (143|241)", reasons) and "exit 247" in reasons, \
        reasons
    assert {e["actor"] for e in log if e.get("event") == "cli_turn_finished"} == {"agent-0", "agent-1"}
    episodes = report["episodes_by_kind"]
    print(f"MRU {report['mru']:.3f} over {report['elapsed_s']:.0f} s, episodes {episodes}; restarts: {reasons}")
    assert report["mru"] >= 0.8
