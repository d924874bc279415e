"""The fleet's progress: real tokens, tokens per minute and time left; the warning for a fleet without cells."""

import contextlib
import time

import pytest

from bus.messages import PolicySpec
from bus.records import Champion
from enpire import progress


def test_progress_has_tokens_rate_time_left_and_the_confirmed_champion():
    champ = Champion("pusht", PolicySpec("c" * 40), 27, 30, 0.0, "agent-0", successes=45, n=50)
    p = progress.progress(now=1120.0, started=1000.0, deadline=1900.0, episodes=321, champion=champ, mru=0.8512,
                          tokens=6000)
    assert (p.tokens, p.tokens_per_min, p.time_left_s) == (6000, 3000.0, 780.0)
    assert (p.champion, p.champion_success, p.champion_n, p.mru) == (champ.policy.ref, 0.9, 50, 0.8512)
    fields = progress.log_fields(p, 1000.0)
    assert fields["confirmed"] == "45/50" and fields["elapsed_s"] == 120.0 and fields["tokens"] == 6000
    late = progress.progress(now=2000.0, started=1000.0, deadline=1900.0, episodes=0, champion=None, mru=0.0, tokens=0)
    assert late.time_left_s == 0.0 and late.champion == "" and late.tokens_per_min == 0.0


def test_no_cell_warning_after_the_grace_then_every_minute_until_one_joins():
    watch = progress.NoCellWatch(started=0.0, grace_s=30.0, every_s=60.0)
    assert [watch.check(t, 0) for t in (10.0, 29.0)] == [None, None]
    assert watch.check(31.0, 0) == 31.0  # warned: nothing joined in 31 s
    assert watch.check(60.0, 0) is None and watch.check(91.0, 0) == 91.0  # and again a minute later
    assert watch.check(100.0, 2) is None  # cells came
    assert watch.check(110.0, 0) is None and watch.check(141.0, 0) == 31.0  # they left: a fresh grace


@contextlib.asynccontextmanager
async def _ticking(board, config, queue, events, budget_s: float = 600.0):
    """The fleet's ticks started as the daemon starts them; yields (ticks, their progress events)."""
    import structlog
    import trio

    from bus.messages import Progress
    from bus.records import DaemonRecord
    from enpire.fleet import Ticks

    now = time.time()
    daemon = DaemonRecord(1, now, now, "running", 0, 1, "pusht")
    ticks = Ticks(structlog.get_logger(), board, config, queue, now, now + budget_s, daemon, events, None)
    with events.subscribe(Progress) as progress_events:
        async with trio.open_nursery() as nursery:
            await nursery.start(ticks.count_tokens)
            nursery.start_soon(ticks.run)
            yield ticks, progress_events
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("restarting", [False, True])
async def test_fleet_progress_counts_the_ledger_then_every_token_event(tmp_path, restarting):
    """Episodes and MRU come from asking the lease queue (none while it restarts); tokens from the ledger
    once, then from the agents' events."""
    from bus.blackboard import Blackboard
    from bus.events import EventHub
    from bus.messages import Failure, TokensUsed, Utilization, UtilizationReport, UtilizationRequest
    from bus.records import TokenRecord
    from enpire import config as cfg

    board = Blackboard(tmp_path / "blackboard.lmdb")
    board.append("tokens", TokenRecord("agent-0", "m", 1.0, 1000, 0, 200))  # from before a restart
    config = cfg.with_overrides(cfg.Config(), **{"fleet.progress_s": 0.05})
    events = EventHub()

    class Queue:  # the lease queue's address: restarting (a Failure) or answering with its cells' shares
        async def ask(self, msg, timeout=30.0):
            assert isinstance(msg, UtilizationRequest)
            if restarting:
                return Failure(error="lease queue restarting")
            return UtilizationReport(cells={"c0": Utilization(10.0, 5.0, 5.0, 0.0, {"running": 5.0})}, recorded=7)

    async with _ticking(board, config, Queue(), events) as (_, progress_events):
        first = await progress_events.receive()
        events.publish(TokensUsed(call=TokenRecord("agent-1", "m", time.time(), 300, 100, 50)))
        events.publish(TokensUsed(call=TokenRecord("agent-0", "m", time.time(), 20, 0, 30)))
        later = await progress_events.receive()
        while later.tokens == first.tokens:
            later = await progress_events.receive()
    board.close()
    assert first.tokens == 1200 and later.tokens == 1600
    assert first.agent_tokens == {"agent-0": 1200} and later.agent_tokens == {"agent-0": 1250, "agent-1": 350}
    assert 590 < later.time_left_s <= 600 and later.tokens_per_min > 0
    assert (later.episodes, later.mru) == ((0, 0.0) if restarting else (7, 0.5))


async def test_progress_counts_every_model_call_however_long_its_interval(tmp_path):
    """More calls in one progress interval than an event subscription buffers (1,024): all are counted."""
    import trio

    from bus.blackboard import Blackboard
    from bus.events import EventHub
    from bus.messages import TokensUsed, UtilizationReport
    from bus.records import TokenRecord
    from enpire import config as cfg

    class Queue:
        async def ask(self, msg, timeout=30.0):
            return UtilizationReport(cells={}, recorded=0)

    board = Blackboard(tmp_path / "blackboard.lmdb")
    config = cfg.with_overrides(cfg.Config(), **{"fleet.progress_s": 3600.0})  # one tick, then an hour's wait
    events = EventHub()
    async with _ticking(board, config, Queue(), events, budget_s=7200.0) as (ticks, progress_events):
        await progress_events.receive()
        for _ in range(1500):  # agents' calls, each after some work of their own
            events.publish(TokensUsed(call=TokenRecord("agent-0", "m", time.time(), 7, 0, 3)))
            await trio.sleep(0)
        await ticks.tick()  # what the next progress line says
        later = await progress_events.receive()
    board.close()
    assert later.tokens == 15_000 and later.agent_tokens == {"agent-0": 15_000}
