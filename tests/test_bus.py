"""Messages and the nng transport: round trips, malformed bytes, late joiners, duplicates, auth, pub/sub."""

import multiprocessing as mp
import os

import numpy as np
import pynng
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import messages as m
from bus.transport import (
    PING,
    PROBE,
    AuthError,
    Publisher,
    RequestClient,
    RequestServer,
    RequestTimeout,
    Subscriber,
    ipc_url,
    open_frame,
    seal_frame,
)

SPEC = m.PolicySpec("c0ffee", {"gain": 1.5}, "")
VERDICT = m.Verdict(True, 0.97, "success", "pusht_state")
ARRAY = m.Array.of(np.arange(6, dtype=np.float32).reshape(2, 3))
EXAMPLES = [
    m.Hello(cell_id="c", driver="pusht", tasks=["pusht"], host="h", pid=1),
    m.Welcome(run_id="r", heartbeat_s=1.0),
    m.LeaseRequest(cell_id="c"),
    m.Lease(lease_id="l", episode_id="e", job_id="j", kind="agent", task="pusht", seed=3, attempts=2,
            policy=SPEC, bundle="b" * 32, deadline_s=60, horizon=300, max_delta=100),
    m.BundleRequest(digest="b" * 32),
    m.PolicyBundle(digest="b" * 32, files={"policy.py": b"x = 1", "weights.npz": b"PK\x03\x04\xff\x00"}),
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
    m.TrainRequest(job_id="t", agent="a", task="pusht", recipe="bc", options={"epochs": "3"}),
    m.TrainResult(job_id="t", ok=True, artifact="ab12", metrics={"loss": 0.1}),
    m.TrainerHello(trainer_id="t", host="h", pid=1, device="cuda:0", gpu="NVIDIA H200", processes=2),
    m.TrainJobRequest(trainer_id="t", wait_s=1.0),
    m.TrainJob(lease_id="l", job_id="j", task="pusht", recipe="bc", time_budget_s=60.0, max_rss_mb=2048,
               options={"hidden": "32"}, episodes=[m.EpisodeRef("e", "ab" * 16, True)], init_artifact=""),
    m.DataRequest(trainer_id="t", lease_id="l", hashes=["ab" * 16]),
    m.DataReply(files={"ab" * 16: b"npz bytes"}),
    m.TrainerHeartbeat(trainer_id="t", lease_id="l", state="training"),
    m.TrainDone(trainer_id="t", lease_id="l", job_id="j", ok=True, metrics={"samples_per_s": 1e5},
                info={"device": "cuda:0"}, weights=b"w"),
    m.CellStateChanged(cell_id="c", state="idle", t=1.0),
    m.Progress(t=1.0, episodes=3, champion="x", champion_success=0.5, champion_n=4, mru=0.8, tokens=10),
    m.QueueDepth(waiting=3, background=1, cells=2, t=1.0),
    m.RoomReleased(agent="a", t=1.0),
    m.ChampionChanged(task="pusht", policy=SPEC, agent="a", judged_successes=9, judged_n=10, successes=3, n=4,
                      decision="", t=1.0),
    m.HeldoutUsage(task="pusht", used=10, total=100, low=False, t=1.0),
    m.FindingPosted(finding_id="f", agent="a", t=1.0),
    m.TokensUsed(call=m.TokenCall(agent="a", model="m", t=1.0, input_tokens=10, cached_input_tokens=2, output_tokens=3)),
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


def _server(url, calls, **kw):
    async def handler(env):
        calls.append(env.id)
        await trio.sleep(0.05)
        return m.NoWork(retry_after_s=float(len(calls)))

    return RequestServer(url, handler, **kw)


def _mutate(frame: bytes, data) -> bytes:
    """A valid frame truncated, bit-flipped or with bytes inserted."""
    frame = bytearray(frame)
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    i = data.draw(st.integers(0, len(frame) - 1))
    if kind == "truncate":
        return bytes(frame[:i])
    if kind == "flip":
        frame[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(frame)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_mutated_frames_never_crash_the_decoder(body, data):
    frame = _mutate(m.encode(m.Envelope(id="1", sender="s", body=body)), data)
    try:
        env = m.decode(frame)
    except m.DecodeError:
        return
    assert isinstance(env, m.Envelope)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data(), st.booleans())
def test_server_answers_any_frame_with_an_envelope(body, data, secret):
    """Whatever bytes arrive, the server's answer is a decodable envelope and the frame is counted."""
    key = b"k" if secret else None
    calls = []

    async def handler(env):
        calls.append(env.id)
        return m.Ack()

    server = RequestServer("inproc://unused", handler, secret=key)
    payload = m.encode(m.Envelope(id="1", sender="s", body=body))
    valid = seal_frame(payload, key, "s", server.run_id, 1) if key else payload
    frame = data.draw(st.binary(max_size=256)) if data.draw(st.booleans()) else _mutate(valid, data)
    reply = trio.run(server.answer, frame)
    try:
        reply = m.decode(open_frame(reply, lambda _s: key)[1] if key else reply)
    except AuthError:  # a refusal is sent unsealed: the peer does not hold the key
        reply = m.decode(reply)
        assert reply.body == m.Failure(error="unauthenticated")
    assert isinstance(reply, m.Envelope)
    s = server.stats
    assert s["bad_frames"] + s["unauthenticated"] + s["requests"] + s["pings"] + s["replayed"] == 1
    if isinstance(reply.body, m.Failure) and reply.body.error in ("unauthenticated", "undecodable frame"):
        assert not calls


async def test_late_joining_server_still_gets_the_request(tmp_path):
    url = ipc_url(tmp_path, "bus")
    calls = []
    with RequestClient(url, sender="c") as client:  # dials before anyone listens
        async with trio.open_nursery() as nursery:
            async def start_late():
                await trio.sleep(0.4)
                await nursery.start(_server(url, calls).serve)

            nursery.start_soon(start_late)
            reply = await client.request(m.LeaseRequest(cell_id="c"), timeout=0.2, retries=20)
            assert reply == m.NoWork(retry_after_s=1.0) and len(calls) == 1
            nursery.cancel_scope.cancel()


async def test_wait_ready_before_and_after_the_server_starts(tmp_path):
    url = ipc_url(tmp_path, "bus")
    calls = []
    with RequestClient(url, sender="c") as client:
        with pytest.raises(RequestTimeout, match="not ready"):
            await client.wait_ready(timeout=0.3)
        async with trio.open_nursery() as nursery:
            server = await nursery.start(_server(url, calls).serve)
            await client.wait_ready(timeout=5)
            assert calls == [] and server.stats["pings"] >= 1  # the ping never reaches the handler
            nursery.cancel_scope.cancel()


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
        assert server.stats["duplicates"] == 3 and server.stats["requests"] == 4
        # the same id from another sender is another request
        other = RequestClient(url, sender="d")
        assert await other.request(m.LeaseRequest(cell_id="d"), id="same-id") == m.NoWork(retry_after_s=2.0)
        for c in (client, other):
            c.close()
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
        server = await nursery.start(RequestServer(url, slow_first).serve)
        with RequestClient(url, sender="c") as client:
            reply = await client.request(m.LeaseRequest(cell_id="c"), timeout=0.2, retries=10)
        assert reply.detail == "done"
        assert len(seen) == 1  # the retries joined the in-flight first copy instead of running again
        assert server.stats["duplicates"] >= 1
        with RequestClient(ipc_url(tmp_path, "nobody"), sender="c") as lost:
            with pytest.raises(RequestTimeout, match=r"nobody.*LeaseRequest"):
                await lost.request(m.LeaseRequest(cell_id="c"), timeout=0.05, retries=1)
        nursery.cancel_scope.cancel()


async def test_slow_request_does_not_block_others_and_errors_become_retryable_failures(tmp_path):
    url = ipc_url(tmp_path, "bus")
    attempts = []

    async def handler(env):
        if isinstance(env.body, m.LeaseRequest):
            await trio.sleep(env.body.wait_s)  # a long-poll
            return m.NoWork(retry_after_s=0)
        attempts.append(env.id)
        if len(attempts) == 1:
            raise RuntimeError("boom")
        return m.Ack(detail="ok")

    with RequestClient(url, sender="c") as client:  # outlives the nursery and its long-polls
        async with trio.open_nursery() as nursery:
            server = await nursery.start(RequestServer(url, handler, workers=4).serve)
            for _ in range(2):
                nursery.start_soon(client.request, m.LeaseRequest(cell_id="c", wait_s=3.0))
            await trio.sleep(0.1)
            with trio.fail_after(1):  # served while two long-polls hold workers
                failed = await client.request(m.NoWork(retry_after_s=0), id="x")
                assert failed == m.Failure(error="RuntimeError: boom", retry=True)
                # a retryable failure is not cached: the resend runs the handler again
                assert await client.request(m.NoWork(retry_after_s=0), id="x") == m.Ack(detail="ok")
            assert attempts == ["x", "x"] and server.stats["handler_errors"] == 1
            nursery.cancel_scope.cancel()


async def test_garbage_frames_do_not_kill_the_server(tmp_path):
    url = ipc_url(tmp_path, "bus")
    calls = []
    valid = m.encode(m.Envelope(id="1", sender="s", body=m.LeaseRequest(cell_id="c")))
    junk = [b"", b"\xff" * 100, b"\x92\x01", os.urandom(1000), valid[:-3], valid.replace(b"LeaseRequest", b"LeaseRequesX")]
    async with trio.open_nursery() as nursery:
        server = await nursery.start(_server(url, calls).serve)
        with pynng.Req0(dial=url) as raw:
            for frame in junk:
                await raw.asend(frame)
                reply = m.decode(await raw.arecv())
                assert isinstance(reply.body, m.Failure)
        with RequestClient(url, sender="c") as client:
            assert isinstance(await client.request(m.LeaseRequest(cell_id="c")), m.NoWork)
        assert server.stats["bad_frames"] == len(junk) and calls and len(calls) == 1
        nursery.cancel_scope.cancel()


async def test_tcp_peers_need_the_shared_secret():
    calls = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(_server("tcp://127.0.0.1:0", calls, secret=b"s3cret").serve)
        url = server.url
        assert not url.endswith(":0")
        with RequestClient(url, sender="good", secret=b"s3cret") as good:
            await good.wait_ready(timeout=5)
            assert isinstance(await good.request(m.LeaseRequest(cell_id="c")), m.NoWork)
        for secret in (b"wrong", None):
            with RequestClient(url, sender="bad", secret=secret) as bad:
                with pytest.raises(AuthError, match="refused"):
                    await bad.request(m.LeaseRequest(cell_id="c"))
        assert server.stats["unauthenticated"] == 2 and len(calls) == 1
        nursery.cancel_scope.cancel()


async def test_client_with_a_secret_refuses_an_unsealed_server(tmp_path):
    url = ipc_url(tmp_path, "bus")
    async with trio.open_nursery() as nursery:
        await nursery.start(_server(url, []).serve)  # no secret: it cannot read our sealed frame
        with RequestClient(url, sender="c", secret=b"k") as client:
            with pytest.raises(AuthError):
                await client.wait_ready(timeout=3)
        nursery.cancel_scope.cancel()


def _progress(i: int) -> m.Progress:
    return m.Progress(t=i, episodes=i, champion="", champion_success=0, champion_n=0, mru=0, tokens=0)


async def test_pub_sub_after_the_ready_barrier(tmp_path):
    url = ipc_url(tmp_path, "telemetry")
    with Publisher(url, secret=b"k") as pub, Subscriber(url, secret=b"k") as sub:
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.heartbeat, 0.02)
            with trio.fail_after(5):
                await sub.wait_joined()
                for i in range(200):
                    await pub.publish(_progress(i))
                got = []
                async for env in sub:  # heartbeat probes are skipped
                    got.append(env.body.episodes)
                    if len(got) == 200:
                        break
            assert got == list(range(200))
            # a frame without a valid MAC (from a rogue publisher the subscriber also hears) is dropped
            rogue_url = ipc_url(tmp_path, "rogue")
            with pynng.Pub0(listen=rogue_url) as rogue:
                sub._sock.dial(rogue_url)
                await trio.sleep(0.3)
                await rogue.asend(m.encode(m.Envelope(id="x", sender="rogue", body=m.Ack(detail="forged"))))
                await rogue.asend(b"\x00" * 40)
                await trio.sleep(0.1)
                await pub.publish(m.Ack(detail="after"))
                with trio.fail_after(5):
                    assert (await sub.receive()).body == m.Ack(detail="after")
            assert sub.stats["unauthenticated"] == 2 and sub.stats["received"] == 201
            nursery.cancel_scope.cancel()


async def test_wait_joined_keeps_an_event_that_beats_the_probe(tmp_path):
    url = ipc_url(tmp_path, "telemetry")
    with Publisher(url) as pub, Subscriber(url) as sub:
        async def spam():
            while True:
                await pub.publish(_progress(7))
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(spam)  # no heartbeat: any event counts as joined
            await sub.wait_joined(timeout=5)
            assert (await sub.receive()).body == _progress(7)
            nursery.cancel_scope.cancel()
        with pytest.raises(TimeoutError, match="heartbeat"):
            await Subscriber(ipc_url(tmp_path, "silent")).wait_joined(timeout=0.1)


def test_probes_are_not_ordinary_messages():
    assert PING != PROBE and PING != m.Ack() and PROBE != m.Ack()


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
    with RequestClient(url, sender="c", secret=b"x") as client:
        proc.start()  # after the client dialled: the barrier, not luck, orders them
        try:
            await client.wait_ready(timeout=30)
            reply = await client.request(m.LeaseRequest(cell_id="c"))
            assert reply.detail == f"pid {proc.pid}"
        finally:
            proc.kill()
            proc.join()


def test_ipc_url_stays_short_and_stable(tmp_path):
    long_dir = tmp_path / ("x" * 150)
    url = ipc_url(long_dir, "bus")
    assert len(url.removeprefix("ipc://").encode()) <= 100 and url == ipc_url(long_dir, "bus")
    assert ipc_url(long_dir, "a") != ipc_url(long_dir, "b")
    assert ipc_url(tmp_path, "bus") == f"ipc://{tmp_path.resolve()}/bus.sock"


async def test_a_reply_that_cannot_be_encoded_is_a_retryable_failure():
    async def handler(env):
        return m.Ack(detail=object())  # a handler bug

    server = RequestServer("inproc://unused", handler)
    reply = m.decode(await server.answer(m.encode(m.Envelope(id="1", sender="s", body=m.LeaseRequest(cell_id="c")))))
    assert isinstance(reply.body, m.Failure) and reply.body.retry and server.stats["handler_errors"] == 1


async def test_many_concurrent_requests_each_get_their_own_reply(tmp_path, monkeypatch):
    import bus.transport as transport

    monkeypatch.setattr(transport, "MAX_CLIENT_SOCKETS", 4)  # more requests than sockets: the rest wait
    url = ipc_url(tmp_path, "bus")

    async def echo(env):
        await trio.sleep(0.01 * (hash(env.id) % 3))  # replies finish out of order
        return m.Ack(detail=env.body.detail)

    replies = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(RequestServer(url, echo, workers=3).serve)  # fewer contexts than requests
        with RequestClient(url, sender="c") as client:
            async def ask(i):
                replies[i] = await client.request(m.Ack(detail=str(i)), timeout=10)

            with trio.fail_after(30):
                async with trio.open_nursery() as asks:
                    for i in range(60):
                        asks.start_soon(ask, i)
            assert len(client._sockets) <= 4
        nursery.cancel_scope.cancel()
    assert replies == {i: m.Ack(detail=str(i)) for i in range(60)}


async def test_a_late_reply_to_an_abandoned_request_is_never_taken_for_the_next(tmp_path):
    url = ipc_url(tmp_path, "bus")

    async def handler(env):
        if env.body.detail == "slow":
            await trio.sleep(0.5)
        return m.Ack(detail=env.body.detail)

    async with trio.open_nursery() as nursery:
        await nursery.start(RequestServer(url, handler).serve)
        with RequestClient(url, sender="c") as client:
            with pytest.raises(RequestTimeout):
                await client.request(m.Ack(detail="slow"), timeout=0.1, retries=0)
            assert await client.request(m.Ack(detail="fast"), timeout=2) == m.Ack(detail="fast")
            await trio.sleep(0.6)  # the abandoned request's reply has been sent by now
            assert await client.request(m.Ack(detail="after"), timeout=2) == m.Ack(detail="after")
            assert len(client._sockets) == 1  # one socket, reused for every request
        nursery.cancel_scope.cancel()


async def test_a_requester_that_went_away_costs_the_server_nothing(tmp_path):
    url = ipc_url(tmp_path, "bus")

    async def handler(env):
        await trio.sleep(0.3 if env.body.detail == "slow" else 0)
        return m.Ack(detail=env.body.detail)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(RequestServer(url, handler, workers=2).serve)
        for _ in range(4):  # each leaves before its reply is ready; the server replies into nothing
            gone = RequestClient(url, sender="gone")
            with pytest.raises(RequestTimeout):
                await gone.request(m.Ack(detail="slow"), timeout=0.05, retries=0)
            gone.close()
        await trio.sleep(0.5)
        with RequestClient(url, sender="c") as client, trio.fail_after(5):
            assert await client.request(m.Ack(detail="next")) == m.Ack(detail="next")
        assert server.stats["requests"] == 5
        nursery.cancel_scope.cancel()


@pytest.mark.bench
def test_request_reply_throughput_against_raw_pynng():
    """bench/bus.py: transport and raw pynng alternate in rounds; the median paired ratio must stay above
    the 0.2 the transport had when every request cost four nng-thread hand-offs. (Measured on 2 cores at
    load average 6-15: 0.38-0.49 with 1 requester, 0.33-0.35 with 8; a raw client's 8 threads get more of
    a loaded machine than one trio thread, so the bound is set below that, not at the 0.5 of a quiet one.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "bus.py"), "--seconds", "1", "--rounds", "5"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    result = json.loads(out)
    ratios = result["ratios_transport_over_raw"]
    assert ratios["reqrep_1_throughput"] >= 0.3 and ratios["reqrep_8_throughput"] >= 0.27, ratios
    # The trio floor is the transport's own nng I/O alone: the transport does all of it and more, so it
    # is slower (0.54-0.66 of the floor on a quiet machine).
    floor = result["ratios_trio_floor"]
    assert 0.2 < floor["transport_over_floor_1"] < 1.0 and floor["floor_over_raw_1"] > ratios["reqrep_1_throughput"], floor


def test_the_frame_mac_is_keyed_blake2b_of_head_and_payload():
    import hashlib

    import bus.transport as transport

    for key_len in (0, 1, 32, 63, 64, 65, 200):  # empty, shorter, equal to and longer than BLAKE2b's 64-byte key
        key = os.urandom(key_len)
        keyed = key if key_len <= 64 else hashlib.blake2b(key, digest_size=64).digest()
        for head, payload in ((b"", b""), (b"h" * 40, b"p"), (os.urandom(50), os.urandom(5000))):
            mac = transport._mac(key, head, payload)
            assert mac == hashlib.blake2b(head + payload, key=keyed, digest_size=32).digest()
            assert len(mac) == transport.MAC_SIZE
            assert transport._mac(key + b"x", head, payload) != mac  # the key counts, to its last byte
    assert transport.unseal(transport.seal(b"event", b"k" * 32), b"k" * 32) == b"event"
    with pytest.raises(transport.AuthError):
        transport.unseal(transport.seal(b"event", b"k" * 32), b"j" * 32)


async def test_a_waiting_handler_hands_the_listening_on_and_a_quick_one_keeps_it(tmp_path):
    url = ipc_url(tmp_path, "bus")
    release = trio.Event()

    async def handler(env):
        if env.body.detail == "hold":
            await release.wait()  # a long-poll: the worker waits, other requests must still be answered
        return m.Ack(detail=env.body.detail)

    async with trio.open_nursery() as nursery:
        await nursery.start(RequestServer(url, handler, workers=2).serve)
        with RequestClient(url, sender="c") as client, trio.fail_after(10):
            async def hold():
                assert await client.request(m.Ack(detail="hold"), timeout=10) == m.Ack(detail="hold")

            async with trio.open_nursery() as asks:
                asks.start_soon(hold)
                await trio.sleep(0.05)
                for i in range(20):  # answered by the other worker while the first waits
                    assert await client.request(m.Ack(detail=str(i)), timeout=2) == m.Ack(detail=str(i))
                release.set()
        nursery.cancel_scope.cancel()


async def test_concurrent_waits_each_time_out_on_their_own_deadline(tmp_path):
    url = ipc_url(tmp_path, "nobody")  # no server: every wait times out
    took = {}

    async def ask(timeout):
        with RequestClient(url, sender=f"c{timeout}") as client:
            start = trio.current_time()
            with pytest.raises(RequestTimeout):
                await client.request(m.Ack(), timeout=timeout, retries=0)
            took[timeout] = trio.current_time() - start

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for timeout in (1.5, 0.2, 0.8):
                nursery.start_soon(ask, timeout)
                await trio.sleep(0.01)
    for timeout, seconds in took.items():
        assert timeout <= seconds < timeout + 0.5
