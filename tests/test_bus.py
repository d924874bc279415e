"""Messages and the nng transport: round trips, malformed bytes, late joiners, duplicates, auth."""

import multiprocessing as mp
import os

import msgspec
import numpy as np
import pynng
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import messages as m
from bus.transport import (
    AuthError,
    Publisher,
    RequestClient,
    RequestServer,
    RequestTimeout,
    Subscriber,
    ipc_url,
)

SPEC = m.PolicySpec("c0ffee", {"gain": 1.5}, "")
VERDICT = m.Verdict(True, 0.97, "success", "pusht_state")
ARRAY = m.Array.of(np.arange(6, dtype=np.float32).reshape(2, 3))
EXAMPLES = [
    m.Hello(cell_id="c", driver="pusht", tasks=["pusht"], host="h", pid=1),
    m.Welcome(run_id="r", heartbeat_s=1.0),
    m.LeaseRequest(cell_id="c"),
    m.Lease(lease_id="l", episode_id="e", job_id="j", kind="agent", task="pusht", seed=3, attempts=2,
            policy=m.PolicyBundle(SPEC, {"policy.py": "x = 1"}), deadline_s=60, horizon=300, max_delta=100),
    m.NoWork(retry_after_s=0.5),
    m.Heartbeat(cell_id="c", state="running", segments=[m.Segment("running", 0.0, 1.0, "agent")]),
    m.EpisodeReport(cell_id="c", lease_id="l", episode_id="e", verdict=VERDICT,
                    attempts=[m.Attempt(VERDICT, 10)], steps=10, reset_s=0.1, run_s=1.0, verify_s=0.01,
                    trajectory=m.Trajectory(ARRAY, ARRAY, ARRAY)),
    m.Ack(), m.Failure(error="nope", retry=True),
    m.VerifyRequest(episode_id="e", task="pusht", state={"block_pose": [1.0, 2.0, 0.5]}, frame=ARRAY),
    m.VerifyReply(episode_id="e", verdict=VERDICT, at_reset=VERDICT),
    m.EvalRequest(job_id="j", agent="a", task="pusht", policy=SPEC, seeds=[1, 2]),
    m.EvalResult(job_id="j", policy=SPEC, task="pusht",
                 episodes=[m.EpisodeSummary("e", 1, True, True, 0.99, "success", 50)]),
    m.PromoteRequest(job_id="p", agent="a", task="pusht", policy=SPEC),
    m.PromoteResult(job_id="p", policy=SPEC, promoted=True, successes=9, n=10, champion_successes=0,
                    champion_n=0, detail="d"),
    m.CellStateChanged(cell_id="c", state="idle", t=1.0),
    m.Progress(t=1.0, episodes=3, champion="x", champion_success=0.5, champion_n=4, mru=0.8, tokens=10),
]


def test_every_message_type_is_covered():
    assert {type(e) for e in EXAMPLES} == set(m.BusMessage.__args__)


@pytest.mark.parametrize("body", EXAMPLES, ids=lambda b: type(b).__name__)
def test_messages_round_trip(body):
    env = m.Envelope(id="1", sender="s", body=body)
    assert m.decode(m.encode(env)) == env


def test_array_round_trip_and_refusals():
    a = np.random.default_rng(0).normal(size=(4, 5))
    assert np.array_equal(m.Array.of(a).numpy(), a)
    with pytest.raises(ValueError, match="needs"):
        m.Array("<f8", (4, 5), b"\0" * 7).numpy()
    with pytest.raises(ValueError, match="object dtype"):
        m.Array("|O", (1,), b"\0" * 8).numpy()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        env = m.decode(data)
    except m.DecodeError:
        return
    assert isinstance(env, m.Envelope)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_mutated_frames_never_crash_the_decoder(body, data):
    frame = bytearray(m.encode(m.Envelope(id="1", sender="s", body=body)))
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    i = data.draw(st.integers(0, len(frame) - 1))
    if kind == "truncate":
        frame = frame[:i]
    elif kind == "flip":
        frame[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        env = m.decode(bytes(frame))
    except m.DecodeError:
        return
    assert isinstance(env, m.Envelope)


def _server(url, calls, **kw):
    async def handler(env):
        calls.append(env.id)
        await trio.sleep(0.05)
        return m.NoWork(retry_after_s=float(len(calls)))

    return RequestServer(url, handler, **kw)


async def test_late_joining_server_still_gets_the_request(tmp_path):
    url = ipc_url(tmp_path, "bus")
    calls = []
    client = RequestClient(url, sender="c")
    async with trio.open_nursery() as nursery:
        async def start_late():
            await trio.sleep(0.4)
            await nursery.start(_server(url, calls).serve)

        nursery.start_soon(start_late)
        reply = await client.request(m.LeaseRequest(cell_id="c"), timeout=0.2, retries=20)
        assert reply == m.NoWork(retry_after_s=1.0) and len(calls) == 1
        nursery.cancel_scope.cancel()
    client.close()


async def test_duplicate_delivery_runs_the_handler_once(tmp_path):
    url = ipc_url(tmp_path, "bus")
    calls = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(_server(url, calls).serve)
        client = RequestClient(url, sender="c")
        replies = []

        async def send():
            replies.append(await client.request(m.LeaseRequest(cell_id="c"), id="same-id"))

        for _ in range(3):  # concurrent duplicates, the first still in flight
            nursery.start_soon(send)
        await trio.sleep(0.3)
        await send()  # and a late one
        assert calls == ["same-id"]
        assert replies == [m.NoWork(retry_after_s=1.0)] * 4
        assert server.stats["duplicates"] == 3
        client.close()
        nursery.cancel_scope.cancel()


async def test_timed_out_request_is_retried_with_the_same_id(tmp_path):
    url = ipc_url(tmp_path, "bus")
    seen = []

    async def slow_first(env):
        seen.append(env.id)
        if len(seen) == 1:
            await trio.sleep(0.5)  # the client gives up on this copy and resends
        return m.Ack(detail="done")

    async with trio.open_nursery() as nursery:
        await nursery.start(RequestServer(url, slow_first).serve)
        client = RequestClient(url, sender="c")
        reply = await client.request(m.LeaseRequest(cell_id="c"), timeout=0.2, retries=10)
        assert reply.detail == "done"
        assert len(seen) == 1  # the retry joined the in-flight first copy instead of running again
        with pytest.raises(RequestTimeout):
            await RequestClient(ipc_url(tmp_path, "nobody"), sender="c").request(m.Ack(), timeout=0.05, retries=1)
        client.close()
        nursery.cancel_scope.cancel()


async def test_garbage_frames_do_not_kill_the_server(tmp_path):
    url = ipc_url(tmp_path, "bus")
    calls = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(_server(url, calls).serve)
        with pynng.Req0(dial=url) as raw:
            for junk in (b"", b"\xff" * 100, b"\x92\x01", os.urandom(1000)):
                await raw.asend(junk)
                reply = m.decode(await raw.arecv())
                assert isinstance(reply.body, m.Failure)
        client = RequestClient(url, sender="c")
        assert isinstance(await client.request(m.LeaseRequest(cell_id="c")), m.NoWork)
        assert server.stats["bad_frames"] == 4
        client.close()
        nursery.cancel_scope.cancel()


async def test_tcp_peers_need_the_shared_secret():
    url = "tcp://127.0.0.1:0"
    calls = []
    async with trio.open_nursery() as nursery:
        server = _server(url, calls, secret=b"s3cret")
        # find the port the listener got
        with pynng.Rep0() as probe:
            probe.listen("tcp://127.0.0.1:0")
            port = probe.listeners[0].local_address.port
        server.url = url = f"tcp://127.0.0.1:{port}"
        await nursery.start(server.serve)
        good = RequestClient(url, sender="good", secret=b"s3cret")
        assert isinstance(await good.request(m.LeaseRequest(cell_id="c")), m.NoWork)
        for secret in (b"wrong", None):
            bad = RequestClient(url, sender="bad", secret=secret)
            with pytest.raises(AuthError):
                await bad.wait_ready(timeout=3)
            bad.close()
        assert server.stats["unauthenticated"] >= 2 and len(calls) == 1
        good.close()
        nursery.cancel_scope.cancel()


async def test_pub_sub_after_the_ready_barrier(tmp_path):
    url = ipc_url(tmp_path, "telemetry")
    pub = Publisher(url, secret=b"k")
    sub = Subscriber(url, secret=b"k")
    with trio.fail_after(5):
        await sub.wait_joined(pub)
        for i in range(20):
            await pub.publish(m.Progress(t=i, episodes=i, champion="", champion_success=0, champion_n=0, mru=0,
                                         tokens=0))
        got = [(await sub.receive()).body.episodes for _ in range(20)]
    assert got == list(range(20))
    # a frame without a valid MAC (from a rogue publisher the subscriber also hears) is dropped
    rogue_url = ipc_url(tmp_path, "rogue")
    rogue = pynng.Pub0(listen=rogue_url)
    sub._sock.dial(rogue_url)
    await trio.sleep(0.3)
    await rogue.asend(m.encode(m.Envelope(id="x", sender="rogue", body=m.Ack(detail="forged"))))
    await trio.sleep(0.1)
    await pub.publish(m.Ack(detail="after"))
    assert (await sub.receive()).body == m.Ack(detail="after")
    assert sub.stats["unauthenticated"] == 1
    for s in (rogue, pub, sub):
        s.close()


def _serve_in_process(url: str, ready) -> None:
    async def main():
        async def handler(env):
            return m.Ack(detail=f"pid {os.getpid()}")

        async with trio.open_nursery() as nursery:
            await nursery.start(RequestServer(url, handler, secret=b"x").serve)
            ready.set()

    trio.run(main)


async def test_cross_process_request_reply(tmp_path):
    url = ipc_url(tmp_path, "xproc")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve_in_process, args=(url, ready), daemon=True)
    proc.start()
    try:
        client = RequestClient(url, sender="c", secret=b"x")
        await client.wait_ready(timeout=30)
        reply = await client.request(m.LeaseRequest(cell_id="c"))
        assert reply.detail == f"pid {proc.pid}"
        client.close()
    finally:
        proc.kill()
        proc.join()


def test_ipc_url_stays_short(tmp_path):
    long_dir = tmp_path / ("x" * 150)
    assert len(ipc_url(long_dir, "bus")) < 110
    assert msgspec.json.encode(ipc_url(tmp_path, "bus"))
