"""Bus benchmark: enpire's transport against raw blocking pynng, cross-process, in the same run.

    python bench/bus.py [--seconds S] [--rounds R] [--quick]

Prints one JSON object: request/reply throughput and latency (p50/p99 microseconds) with 1 and N
concurrent requesters, pub/sub event throughput, for (a) bus.transport (msgspec envelopes, ids, dedup
cache, MAC) and (b) raw pynng Req0/Rep0 and Pub0/Sub0 with plain blocking calls and raw bytes, plus
the ratios transport/raw. Request/reply also measures (c) the trio floor: the transport's own nng I/O
(`_Requester`, `_Slot`: a frame handed to nng, the reply waited for on the socket's fd in trio's poll)
echoing bytes, with no envelope, MAC, timeout scope, replay guard or duplicate cache. It says how much
of the gap to raw is trio's wait itself and how much is the transport's work. Request/reply runs in
rounds that rotate the three (the median of the per-round ratios is reported), so that all see the same
load on a shared machine. The peer always runs in a separate process. Every loop is bounded by time and
count and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pynng  # noqa: E402
import trio  # noqa: E402

from bus import messages as m  # noqa: E402

# _Requester and _Slot: the transport's own nng I/O, which the trio floor measures alone
from bus.transport import Publisher, RequestClient, RequestServer, Subscriber, _Requester, _Slot, ipc_url  # noqa: E402

SECRET = b"bench-secret"
REQUEST = m.LeaseRequest(cell_id="bench")
EVENT = m.Progress(t=0.0, episodes=1, champion="c", champion_success=0.9, champion_n=100, mru=0.9, tokens=1)
MAX_COUNT = 200_000


# ----------------------------------------------------------------------------- peers (separate processes)


def transport_server(url: str, ready, seconds: float) -> None:
    async def handler(env):
        return m.NoWork(retry_after_s=0.0)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(RequestServer(url, handler, secret=SECRET).serve)
            ready.set()
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()

    trio.run(main)


def raw_server(url: str, ready, seconds: float) -> None:
    with pynng.Rep0(listen=url, recv_timeout=200) as sock:
        ready.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sock.send(sock.recv())
            except pynng.Timeout:
                pass


def floor_server(url: str, ready, seconds: float) -> None:
    """Echoes on Rep0 contexts with the transport server's I/O (`_Slot`) and nothing else."""
    async def main():
        with pynng.Rep0(listen=url) as sock:
            slots = [_Slot(sock.new_context()) for _ in range(4)]
            ready.set()
            with trio.move_on_after(seconds):
                while True:
                    slot = next((s for s in slots if s.settled()[0]), None)
                    if slot is None:  # every context's reply still leaving: rare
                        await trio.sleep(0)
                        continue
                    frame = slot.try_recv()
                    while frame is None:
                        await trio.lowlevel.wait_readable(sock.recv_fd)
                        frame = slot.try_recv()
                    slot.reply(frame)
            for slot in slots:
                slot.close()

    trio.run(main)


def transport_subscriber(url: str, ready, out, seconds: float) -> None:
    async def main():
        with Subscriber(url, secret=SECRET) as sub:
            await sub.wait_joined(timeout=30)  # the publisher's heartbeat reached us: the barrier
            ready.set()
            count, first, last = 0, None, None
            with trio.move_on_after(seconds):
                while True:
                    with trio.move_on_after(1.0 if count else seconds) as idle:
                        await sub.receive()
                    if idle.cancelled_caught:
                        break  # the publisher has stopped
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    count += 1
        out.put((count, (last - first) if first and last else 0.0))

    trio.run(main)


def raw_subscriber(url: str, ready, out, seconds: float) -> None:
    with pynng.Sub0(dial=url, recv_timeout=300) as sock:
        sock.subscribe(b"")
        ready.set()
        count, first, last = 0, None, None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sock.recv()
            except pynng.Timeout:
                if count:
                    break  # the publisher has stopped
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
    out.put((count, (last - first) if first and last else 0.0))


# ----------------------------------------------------------------------------- measurements


def _summary(latencies: list[float], elapsed: float) -> dict:
    lat = sorted(latencies)
    return {
        "msgs_per_s": round(len(lat) / elapsed, 1) if elapsed else 0.0,
        "p50_us": round(statistics.median(lat) * 1e6, 1) if lat else None,
        "p99_us": round(lat[int(0.99 * (len(lat) - 1))] * 1e6, 1) if lat else None,
        "count": len(lat),
    }


def bench_transport_reqrep(url: str, concurrency: int, seconds: float) -> dict:
    async def main():
        client = RequestClient(url, sender="bench", secret=SECRET)
        await client.wait_ready(timeout=30)
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < end and len(latencies) < MAX_COUNT:
                t = time.perf_counter()
                await client.request(REQUEST, timeout=5)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - start
        client.close()
        return _summary(latencies, elapsed)

    return trio.run(main)


def bench_floor_reqrep(url: str, concurrency: int, seconds: float) -> dict:
    """The transport client's I/O (`_Requester`, one per task) sending the same bytes the transport
    would, without envelope, MAC, ids or a timeout scope."""
    payload = m.encode(m.Envelope(id="x", sender="bench", body=REQUEST))

    async def main():
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def worker(requester):
            while time.perf_counter() < end and len(latencies) < MAX_COUNT:
                t = time.perf_counter()
                requester.post(payload)
                await requester.reply()
                latencies.append(time.perf_counter() - t)

        requesters = [_Requester(url) for _ in range(concurrency)]
        for requester in requesters:  # connected before the clock starts, as the others are
            requester.post(payload)
            await requester.reply()
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for requester in requesters:
                nursery.start_soon(worker, requester)
        elapsed = time.perf_counter() - start
        for requester in requesters:
            requester.close()
        return _summary(latencies, elapsed)

    return trio.run(main)


def bench_raw_reqrep(url: str, concurrency: int, seconds: float) -> dict:
    """Raw pynng, blocking: N threads each with its own Req0 socket (Req0 is one request at a time)."""
    import threading

    payload = m.encode(m.Envelope(id="x", sender="bench", body=REQUEST))
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def worker():
        with pynng.Req0(dial=url, recv_timeout=5000) as sock:
            local = []
            while time.perf_counter() < end and len(local) < MAX_COUNT // concurrency:
                t = time.perf_counter()
                sock.send(payload)
                sock.recv()
                local.append(time.perf_counter() - t)
            with lock:
                latencies.extend(local)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(latencies, time.perf_counter() - start)


def bench_pubsub(kind: str, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        url = ipc_url(tmp, f"pub-{kind}")
        ready, out = ctx.Event(), ctx.Queue()
        target = transport_subscriber if kind == "transport" else raw_subscriber
        proc = ctx.Process(target=target, args=(url, ready, out, seconds + 30))
        sent = 0
        if kind == "transport":
            async def run():
                nonlocal sent
                with Publisher(url, SECRET) as publisher:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(publisher.heartbeat)
                        proc.start()
                        await trio.to_thread.run_sync(ready.wait, 30)  # the subscriber passed wait_joined
                        end = time.perf_counter() + seconds
                        while time.perf_counter() < end and sent < MAX_COUNT:
                            await publisher.publish(EVENT)
                            sent += 1
                            if sent % 256 == 0:
                                await trio.sleep(0)
                        nursery.cancel_scope.cancel()

            trio.run(run)
        else:
            payload = m.encode(m.Envelope(id="x", sender="bench", body=EVENT))
            with pynng.Pub0(listen=url) as pub_sock:
                proc.start()
                ready.wait(30)
                time.sleep(0.5)  # raw pynng has no barrier: give the dial time to complete
                end = time.perf_counter() + seconds
                while time.perf_counter() < end and sent < MAX_COUNT:
                    pub_sock.send(payload)
                    sent += 1
        received, span = out.get(timeout=seconds + 60)
        proc.join(10)
    return {"sent": sent, "received": received, "events_per_s": round(received / span, 1) if span else 0.0,
            "delivered": round(received / sent, 4) if sent else 0.0}


def with_server(kind: str, seconds_total: float, fn):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        url = ipc_url(tmp, f"rr-{kind}")
        ready = ctx.Event()
        target = {"transport": transport_server, "raw": raw_server, "floor": floor_server}[kind]
        proc = ctx.Process(target=target, args=(url, ready, seconds_total + 5))
        proc.start()
        try:
            assert ready.wait(30), "server did not start"
            return fn(url)
        finally:
            proc.terminate()
            proc.join(10)


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median throughput (its latencies with it), plus every round's throughput."""
    ranked = sorted(rounds, key=lambda r: r["msgs_per_s"])
    return {**ranked[len(ranked) // 2], "rounds_msgs_per_s": [r["msgs_per_s"] for r in rounds]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="transport and raw alternate this many times")
    p.add_argument("--quick", action="store_true", help="0.5 s per measurement, 3 rounds")
    args = p.parse_args(argv)
    s = 0.5 if args.quick else args.seconds
    rounds = 3 if args.quick else args.rounds
    n = args.concurrency
    result = {"seconds_per_measurement": s, "concurrency": n, "rounds": rounds}
    # The three rotate (which goes first changes every round) so that all see the same machine: on a
    # shared machine the load changes within seconds. Ratios are the median of the per-round ratios.
    kinds = {"transport": bench_transport_reqrep, "raw": bench_raw_reqrep, "floor": bench_floor_reqrep}
    order = list(kinds)
    runs: dict[str, dict[str, list[dict]]] = {k: {"1": [], str(n): []} for k in kinds}
    for r in range(rounds):
        for kind in order[r % 3:] + order[: r % 3]:
            bench = kinds[kind]
            got = with_server(kind, 2 * s + 10, lambda url, bench=bench: {"1": bench(url, 1, s), str(n): bench(url, n, s)})
            for c in ("1", str(n)):
                runs[kind][c].append(got[c])
    result["reqrep_transport"] = {c: _median_round(v) for c, v in runs["transport"].items()}
    result["reqrep_raw_pynng"] = {c: _median_round(v) for c, v in runs["raw"].items()}
    result["reqrep_trio_floor"] = {c: _median_round(v) for c, v in runs["floor"].items()}
    result["pubsub_transport"] = bench_pubsub("transport", s)
    result["pubsub_raw_pynng"] = bench_pubsub("raw", s)

    def paired(c: str, key: str, over: str = "raw", kind: str = "transport") -> float:
        ratios = sorted(t[key] / r[key] for t, r in zip(runs[kind][c], runs[over][c], strict=True))
        return round(ratios[len(ratios) // 2], 3)

    result["ratios_transport_over_raw"] = {
        "reqrep_1_throughput": paired("1", "msgs_per_s"),
        f"reqrep_{n}_throughput": paired(str(n), "msgs_per_s"),
        "reqrep_1_p50_latency": paired("1", "p50_us"),
        "reqrep_1_p99_latency": paired("1", "p99_us"),
        f"reqrep_{n}_p50_latency": paired(str(n), "p50_us"),
        "pubsub_throughput": round(result["pubsub_transport"]["events_per_s"]
                                   / max(1.0, result["pubsub_raw_pynng"]["events_per_s"]), 3),
    }
    result["ratios_trio_floor"] = {  # where the gap is: trio's wait itself, or the transport's own work
        "floor_over_raw_1": paired("1", "msgs_per_s", kind="floor"),
        f"floor_over_raw_{n}": paired(str(n), "msgs_per_s", kind="floor"),
        "transport_over_floor_1": paired("1", "msgs_per_s", over="floor"),
        f"transport_over_floor_{n}": paired(str(n), "msgs_per_s", over="floor"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
