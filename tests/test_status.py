"""`enpire status` from the blackboard: cells' live state, time left, tokens through the ledger."""

import time

from bus.blackboard import Blackboard
from bus.records import CellRecord, DaemonRecord, TokenRecord
from enpire import status
from enpire.statelock import StateLock


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
    lock = StateLock(tmp_path).acquire()  # the daemon holds its state dir while it lives
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
    # killed (SIGKILL, a crash): its record still says running, but nothing holds the lock: seen at once
    lock.release()
    s = status.collect(tmp_path, now=now)
    assert s["daemon"]["state"].startswith("stopped: killed") and s["daemon"]["time_left_s"] is None
    assert {v["state"] for v in s["cells"].values()} == {"offline"}


async def test_status_follow_prints_the_daemons_changes_as_they_happen(tmp_path, monkeypatch):
    """`enpire status --follow`: the daemon's events reach another process's subscriber over the bus, one
    line per change; queue depth is left to the progress line; a daemon gone silent ends the follow."""
    import io

    import trio

    from bus.events import EventHub, events_url
    from bus.messages import CellStateChanged, ChampionChanged, FindingPosted, PolicySpec, QueueDepth
    from enpire.fleet import _publish_events

    monkeypatch.setattr(status, "SILENT_S", 1.5)
    hub, out, why = EventHub(), io.StringIO(), []
    async with trio.open_nursery() as nursery:
        daemon = trio.CancelScope()

        async def publish() -> None:
            with daemon:
                await _publish_events(hub, events_url(tmp_path))

        async def follower() -> None:
            why.append(await status.follow(events_url(tmp_path), 30.0, out))

        nursery.start_soon(publish)
        nursery.start_soon(follower)
        await trio.sleep(1.5)  # joined: the daemon's heartbeat comes every second
        hub.publish(CellStateChanged(cell_id="cell-0", state="running", t=time.time()))
        hub.publish(QueueDepth(waiting=3, background=0, cells=1, t=time.time()))
        hub.publish(ChampionChanged(task="pusht", policy=PolicySpec("c0ffee1"), agent="agent-0", judged_successes=38,
                                    judged_n=40, successes=0, n=0, decision="", t=time.time()))
        hub.publish(FindingPosted(finding_id="agent-0-abc", agent="agent-0", t=time.time()))
        await trio.sleep(0.5)
        daemon.cancel()  # the daemon stops: its heartbeat with it
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "cell cell-0: running",
        f"champion[pusht]: {PolicySpec('c0ffee1').ref} by agent-0; judged 38/40, confirmation 0/0",
        "finding agent-0-abc by agent-0"], lines
    assert why == ["the daemon went silent (2 s without its heartbeat)"]


async def test_status_follow_without_a_daemon_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(status, "SILENT_S", 0.5)
    from bus.events import events_url

    assert "no daemon publishes here" in await status.follow(events_url(tmp_path), 5.0)
    assert status.main(["--state-dir", str(tmp_path), "--follow", "--seconds", "-1"]) == 2


def test_a_progress_line_says_tokens_their_rate_and_time_left():
    from bus.messages import Progress

    p = Progress(t=time.time(), episodes=321, mru=0.85, champion="c0", champion_success=0.9, champion_n=50,
                 tokens=6000, tokens_per_min=3000.0, time_left_s=780.0, agent_tokens={"agent-0": 6000})
    line = status.event_line(p).split(" ", 1)[1]
    assert line == "progress: 321 episodes, MRU 85.0%, champion c0 90.0% (n=50), 6,000 tokens (3,000/min), 780 s left"


def test_after_the_run_status_shows_the_runs_figures_not_its_final_judgings(tmp_path):
    """report.json's MRU and agent share end with the run; the final judging after it (held-out work on
    every cell) must not turn them into other figures in `status` and the report's summary."""
    from bus.messages import Segment
    from bus.records import TimelineRecord

    t0 = 1_000.0
    board = Blackboard(tmp_path / "blackboard.lmdb")
    board.put("meta", "daemon", DaemonRecord(123, t0, t0 + 160, "stopped: budget", 1, 1, "pusht", ended=t0 + 100))
    board.put("cells", "cell-0", CellRecord("cell-0", "pusht", "h", 1, t0, t0 + 160, state="idle"))
    board.append("timeline", TimelineRecord("cell-0", [
        Segment("idle", t0, t0 + 50), Segment("running", t0 + 50, t0 + 100, "agent"),
        Segment("running", t0 + 100, t0 + 160, "heldout")]))  # the final judging, after the run's end
    board.close()
    s = status.collect(tmp_path, now=t0 + 200)
    assert s["mru"] == 0.5 and s["cells"]["cell-0"]["agent_share"] == 1.0 and s["daemon"]["running_s"] == 100.0
