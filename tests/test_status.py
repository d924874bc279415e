"""`enpire status` from the blackboard: cells' live state, time left, tokens through the ledger."""

import time

from bus.blackboard import Blackboard
from bus.records import CellRecord, DaemonRecord, TokenRecord
from enpire import status


def test_status_shows_live_cell_state_time_left_and_tokens(tmp_path):
    now = time.time()
    board = Blackboard(tmp_path / "blackboard.lmdb")
    board.put("meta", "daemon", DaemonRecord(123, now - 100, now - 1, "running", 2, 1, "pusht", budget_s=600, target=0.9))
    board.put("cells", "cell-0", CellRecord("cell-0", "pusht", "h", 1, now - 100, now - 0.5, state="running"))
    board.put("cells", "cell-1", CellRecord("cell-1", "pusht", "h", 2, now - 100, now - 0.5, state="verifying"))
    for t in (now - 50, now - 10):
        board.append("tokens", TokenRecord("agent-0", "m", t, 1000, 400, 200))
    board.append("tokens", TokenRecord("agent-1", "m", now - 5, 300, 0, 100))
    board.close()
    s = status.collect(tmp_path, now=now)
    assert {c: v["state"] for c, v in s["cells"].items()} == {"cell-0": "running", "cell-1": "verifying"}
    assert s["daemon"]["time_left_s"] == 500.0 and s["daemon"]["target"] == 0.9
    assert s["tokens"] == {"agent-0": 2400, "agent-1": 400} and s["tokens_total"] == 2800
    assert s["tokens_cached_input"] == 800 and s["tokens_per_min"] == 1680.0  # 2800 tokens in 100 s
    text = status.render(s)
    assert "500s left" in text and "2,800 (800 cached input), 1,680/min" in text and "running" in text
    # once the daemon is gone nobody is running and no time is left
    s = status.collect(tmp_path, now=now + 3600)
    assert s["daemon"]["state"] == "not responding" and s["daemon"]["time_left_s"] is None
    assert {v["state"] for v in s["cells"].values()} == {"offline"}
