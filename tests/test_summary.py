"""One summary of a run's figures (enpire/summary.py), the same in report.json, status and report."""

import time

from bus.blackboard import Blackboard
from bus.messages import PolicySpec
from bus.records import Champion, HeldoutRecord
from enpire import config as cfg
from enpire import fleet, status, summary
from enpire.metrics import Utilization


def test_rate_and_champion_carry_both_heldout_tallies():
    assert summary.rate(0, 0) == {"successes": 0, "n": 0, "rate": 0.0, "wilson95": [0.0, 1.0]}
    c = Champion("pusht", PolicySpec("c" * 40, {"k": 1.0}), judged_successes=9, judged_n=10, promoted=0.0,
                 agent="agent-0", successes=95, n=100)
    s = summary.champion(c)
    assert s["heldout_confirm"] == summary.rate(95, 100) and s["heldout_judged"]["rate"] == 0.9
    assert s["heldout_confirm"]["wilson95"][0] < 0.95 < s["heldout_confirm"]["wilson95"][1]
    line = summary.champion_line("pusht", s)
    assert "95/100 = 95.0%" in line and "judged 9/10 at promotion" in line and "by agent-0" in line
    assert summary.champion(None) == {"policy": None} and "none yet" in summary.champion_line("t", {"policy": None})


def test_cells_mean_is_the_fleets_mru():
    per_cell = {"b": Utilization(10.0, 5.0, 4.0, 1.0, {"running": 5.0, "idle": 5.0}),
                "a": Utilization(10.0, 9.0, 9.0, 0.0, {"running": 9.0, "resetting": 1.0})}
    s = summary.cells(per_cell)
    assert s["mru"] == 0.7 and list(s["cells"]) == ["a", "b"] and s["cells"]["b"]["agent_share"] == 0.8
    assert summary.cell_line("b", s["cells"]["b"]) == "b: MRU 50.0%, agent share 80.0%"


def test_status_and_report_json_show_the_same_champion_and_pools(tmp_path):
    board = Blackboard(tmp_path / "blackboard.lmdb")
    config = cfg.Config()
    champion = Champion(config.cells.task, PolicySpec("d" * 40), judged_successes=20, judged_n=20,
                        promoted=time.time(), agent="agent-1", successes=30, n=31)
    board.put("champion", champion.task, champion)
    board.put("heldout", champion.task, HeldoutRecord(champion.task, used=51, draws=3,
                                                      total=config.task().heldout_seeds.count))
    report = fleet.build_report(board, config, fleet.Outcome("budget", 1.0, None), {})
    shown = status._collect(board, time.time())
    assert shown["champions"][champion.task] == report["champion"] == summary.champion(champion)
    assert shown["heldout"][champion.task] == report["heldout_pool"][champion.task]
    assert summary.champion_line(champion.task, report["champion"]) in fleet.format_report(report)
    assert summary.champion_line(champion.task, report["champion"]) in status.render(shown)
