"""Hostile peers on the bus (issue #13): forged, lease-less, foreign and replayed reports, frames from
another run, and a peer holding one cell's key speaking for another."""

from __future__ import annotations

import time

import pytest
import structlog
import trio

from actors.judge import Judge
from actors.lease_queue import LeaseQueue
from actors.runtime import ActorSystem
from bus import messages as m
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import Attempt, EpisodeReport, EvalRequest, Hello, Lease, LeaseRequest, PolicySpec, Verdict
from bus.transport import (
    REPLAYED,
    STALE_RUN,
    AuthError,
    RequestClient,
    RequestServer,
    cell_key,
    open_frame,
    seal_frame,
)
from enpire import config as cfg
from enpire import seal
from enpire.bundles import BundleStore

POLICY = PolicySpec("c0ffee", {"gain": 1.0})
KEY = b"k" * 32
WIN = Verdict(True, 1.0, "success", "pusht_state")
NOW = time.time_ns()


class _Fleet:
    """Cells' messages to the lease queue, agents' to the judge, as the daemon routes them."""

    def __init__(self, queue, judge):
        self.queue, self.judge = queue, judge

    async def ask(self, msg, timeout=30.0):
        return await (self.judge if isinstance(msg, EvalRequest) else self.queue).ask(msg, timeout)


async def _start(nursery, tmp_path, config):
    board = Blackboard(tmp_path / "bb")
    system, events = ActorSystem(nursery), EventHub()
    bundles = BundleStore(lambda c: {"policy.py": b"x"})
    queue = await system.spawn("queue", lambda: LeaseQueue(config, board, bundles, tmp_path, "run", events,
                                                           verdict_key=KEY))
    judge = await system.spawn("judge", lambda: Judge(config, board, queue, events))
    return _Fleet(queue, judge), board


async def _scheduler(nursery, tmp_path):
    ref, board = await _start(nursery, tmp_path, cfg.Config(cells=cfg.CellsConfig(task="pusht")))
    for cell in ("cell-0", "cell-1"):
        await ref.ask(Hello(cell_id=cell, driver="pusht", tasks=["pusht"], host="h", pid=1))
    nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1, 2]))
    return ref, board


def _report(lease_id: str, episode_id: str, cell: str, verdict: Verdict, signature: bytes = b"") -> EpisodeReport:
    return EpisodeReport(cell_id=cell, lease_id=lease_id, episode_id=episode_id, verdict=verdict,
                         attempts=[Attempt(verdict, 10, signature)], steps=10, reset_s=0.0, run_s=0.1, verify_s=0.0)


async def test_reports_without_the_lease_or_the_verifiers_signature_are_refused_and_logged(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board = await _scheduler(nursery, tmp_path)
        lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
        assert isinstance(lease, Lease)
        signed = seal.sign(KEY, lease.lease_id, lease.episode_id, 0, WIN)
        with structlog.testing.capture_logs() as logs:
            forged = [
                _report("made-up", lease.episode_id, "cell-1", WIN, signed),  # lease-less
                _report(lease.lease_id, lease.episode_id, "cell-1", WIN, signed),  # someone else's lease
                _report(lease.lease_id, lease.episode_id, "cell-0", WIN),  # unsigned success
                _report(lease.lease_id, lease.episode_id, "cell-0", WIN, b"\0" * 32),  # forged signature
                _report(lease.lease_id, lease.episode_id, "cell-0", Verdict(True, 1.0, "success", "pusht_state"),
                        seal.sign(KEY, "other-lease", lease.episode_id, 0, WIN)),  # signed for another lease
            ]
            for report in forged:
                reply = await ref.ask(report)
                assert isinstance(reply, m.Failure) and "report refused" in reply.error, reply
        assert [e["event"] for e in logs].count("report_refused") == len(forged)
        assert board.counter("episodes") == 0
        # The holder's report with the verifier's signature is recorded; a downgrade to a failure too.
        assert isinstance(await ref.ask(_report(lease.lease_id, lease.episode_id, "cell-0", WIN, signed)), m.Ack)
        second = await ref.ask(LeaseRequest(cell_id="cell-1"))
        downgraded = Verdict(False, 1.0, "safety_violation: x", "pusht_state")
        reply = await ref.ask(_report(second.lease_id, second.episode_id, "cell-1", downgraded,
                                      seal.sign(KEY, second.lease_id, second.episode_id, 0, WIN)))
        assert isinstance(reply, m.Ack)
        assert board.counter("episodes") == 2
        nursery.cancel_scope.cancel()


async def _echo(env):
    return m.Ack(detail=type(env.body).__name__)


async def test_a_frame_from_another_run_is_refused():
    calls = []

    async def handler(env):
        calls.append(env.id)
        return m.Ack()

    first, second = (RequestServer("inproc://x", handler, secret=KEY) for _ in range(2))
    payload = m.encode(m.Envelope(id="r1", sender="cell-0", body=m.Ack(detail="report")))
    frame = seal_frame(payload, KEY, "cell-0", first.run_id, 1)
    assert m.decode(open_frame(await first.answer(frame), lambda s: KEY)[1]).body == m.Ack()
    # The daemon restarts (new run, empty dedup): the captured frame is refused, the handler not run.
    reply = m.decode(open_frame(await second.answer(frame), lambda s: KEY)[1]).body
    assert reply == STALE_RUN and calls == ["r1"] and second.stats["stale_run"] == 1


async def test_a_replayed_frame_is_refused_within_a_run():
    calls = []

    async def handler(env):
        calls.append(env.id)
        return m.Ack()

    server = RequestServer("inproc://x", handler, secret=KEY)
    for i, envelope_id in enumerate(("a", "b")):
        payload = m.encode(m.Envelope(id=envelope_id, sender="cell-0", body=m.Ack()))
        frame = seal_frame(payload, KEY, "cell-0", server.run_id, NOW + i)
        await server.answer(frame)
    server._replies.clear()  # even once the reply cache has forgotten it
    reply = m.decode(open_frame(await server.answer(frame), lambda s: KEY)[1]).body
    assert reply == REPLAYED and calls == ["a", "b"] and server.stats["replayed"] == 1
    old = seal_frame(m.encode(m.Envelope(id="c", sender="cell-0", body=m.Ack())), KEY, "cell-0", server.run_id,
                     NOW - 10**12)  # 1000 s older: beyond the window
    assert m.decode(open_frame(await server.answer(old), lambda s: KEY)[1]).body == REPLAYED


async def test_a_cell_key_speaks_only_for_its_cell(tmp_path):
    url = f"ipc://{tmp_path}/b.sock"
    async with trio.open_nursery() as nursery:
        server = await nursery.start(RequestServer(url, _echo, secret=KEY, per_sender_keys=True).serve)
        with RequestClient(url, sender="arm-1", secret=cell_key(KEY, "arm-1")) as arm1:
            await arm1.wait_ready(20)
            assert await arm1.request(m.Ack(), timeout=5) == m.Ack(detail="Ack")
        with RequestClient(url, sender="arm-2", secret=cell_key(KEY, "arm-1")) as thief:  # arm-1's key as arm-2
            with pytest.raises(AuthError):
                await thief.request(m.Ack(), timeout=5, retries=0)
        with RequestClient(url, sender="arm-1", secret=KEY) as holder:  # the fleet secret is not a cell key
            with pytest.raises(AuthError):
                await holder.request(m.Ack(), timeout=5, retries=0)
        # An envelope claiming another sender inside a frame sealed with arm-1's key: refused.
        payload = m.encode(m.Envelope(id="x", sender="arm-2", body=m.Ack()))
        frame = seal_frame(payload, cell_key(KEY, "arm-1"), "arm-1", server.run_id, 5)
        assert m.decode(await server.answer(frame)).body == m.Failure(error="unauthenticated")
        nursery.cancel_scope.cancel()


async def test_a_client_follows_a_restarted_server(tmp_path):
    url = f"ipc://{tmp_path}/r.sock"
    with RequestClient(url, sender="cell-0", secret=KEY) as client:
        for _ in range(2):  # the second server is a new run at the same address
            async with trio.open_nursery() as nursery:
                await nursery.start(RequestServer(url, _echo, secret=KEY).serve)
                with trio.fail_after(30):
                    assert await client.request(m.Ack(), timeout=1) == m.Ack(detail="Ack")
                nursery.cancel_scope.cancel()


async def test_a_late_report_from_the_cell_whose_lease_lapsed_still_counts(tmp_path):
    """A slow cell's lease expires and its episode is re-queued: that cell's late report is still its
    own (and signed for its lease); a report naming that lease from another cell is not."""
    async with trio.open_nursery() as nursery:
        config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                    **{"scheduler.lease_s": 0.3, "scheduler.heartbeat_s": 10.0})
        ref, board = await _start(nursery, tmp_path, config)
        for cell in ("cell-0", "cell-1"):
            await ref.ask(Hello(cell_id=cell, driver="pusht", tasks=["pusht"], host="h", pid=1))
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1]))
        lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
        await trio.sleep(1.5)  # expired and re-queued
        signed = seal.sign(KEY, lease.lease_id, lease.episode_id, 0, WIN)
        foreign = await ref.ask(_report(lease.lease_id, lease.episode_id, "cell-1", WIN, signed))
        assert isinstance(foreign, m.Failure)
        assert isinstance(await ref.ask(_report(lease.lease_id, lease.episode_id, "cell-0", WIN, signed)), m.Ack)
        assert board.counter("episodes") == 1
        nursery.cancel_scope.cancel()
