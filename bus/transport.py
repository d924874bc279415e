"""nng transport under trio: an acked request/reply path and lossy pub/sub for telemetry.

Acked path (anything that must not be lost: assignments, results, jobs, findings):
`RequestClient.request` sends an Envelope with an id and waits for the reply; on timeout it resends
the SAME id with backoff. `RequestServer` answers each (sender, id) once: replies are cached (bounded
LRU) and a duplicate, even one arriving while the first copy is still being handled, gets the first
reply without running the handler again. The ready barrier is `RequestClient.wait_ready`: a ping
the server answers itself, so a client knows the server is up before it relies on it.

Pub/sub (telemetry ONLY): nng drops silently when a subscriber is slow, not yet joined, or its
queue is full. Nothing that must arrive may travel there. `Publisher.heartbeat` + `Subscriber.wait_joined`
is its ready barrier: once a probe has arrived, the subscription is live and later events reach it
(unless dropped for being slow).

Frames are msgpack Envelopes. With a secret, a request-path frame is
`0xE5 | len(sender) | sender | run id (16 bytes) | counter (u64) | HMAC-SHA256(key, all before it + payload) | payload`:
- the key is the sender's own: with `per_sender_keys` the server derives it from its secret and the
  sender's name (`cell_key`), so a peer holding one cell's key can speak only as that cell, and the
  envelope's sender must match the sealed one;
- the run id is the server's (random per start, learned from the ready ping): a frame captured in
  another run is refused (`stale run`; an honest client re-learns the run id and resends);
- the counter is the sender's clock in ns, strictly increasing per client: the server keeps, per
  sender, the counters seen in the last `REPLAY_WINDOW_NS` and refuses a repeat or an older frame
  (`replayed`). A resend is a new frame (same envelope id, new counter), so at-most-once still holds.
Replies are sealed the same way with the requester's key. Pub/sub frames (telemetry only) carry just
HMAC(secret, payload) || payload. The receiver checks the MAC (constant time) before decoding. Frames
that fail authentication or decoding are refused (a `Failure` reply on the request path, dropped on
pub/sub), logged without their content and counted; they never stop a reader.

Fast path: a reader tries a non-blocking receive first and awaits only when nothing is waiting (one
await per message caps a trio reader at a few thousand messages per second). pynng 0.9's `Context`
has no non-blocking recv (its `recv` blocks the thread), so the request path, which needs contexts
for concurrency, always awaits; the subscriber (a single-socket reader) uses the fast path, and the
publisher sends without awaiting (Pub0 never blocks: it drops instead).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pynng
import structlog
import trio

from bus.messages import Ack, DecodeError, Envelope, Failure, Message, decode, encode

MAX_FRAME = 64 << 20  # nng refuses larger frames before we see them
MAC_SIZE = 32
IPC_PATH_LIMIT = 100  # sun_path is 108 bytes on Linux (104 on macOS): stay clear of both
PING = Ack(detail="__ping__")  # the request path's ready probe; answered by the server itself
PROBE = Ack(detail="__probe__")  # the pub/sub ready probe; never handed to subscribers' readers
REFUSED = Failure(error="unauthenticated")  # the reply to a frame that failed authentication
STALE_RUN = Failure(error="stale run", retry=True)  # sealed for another run of the server: re-ping, resend
REPLAYED = Failure(error="replayed frame")  # a counter this server already saw (or too old)
SEALED_MAGIC = 0xE5
RUN_BYTES = 16
_COUNTER = struct.Struct(">Q")
REPLAY_WINDOW_NS = 120 * 10**9  # a sender's frames may arrive this much out of order (and no older)

Handler = Callable[[Envelope], Awaitable[Message]]


class RequestTimeout(TimeoutError):
    """No reply after every retry (or the server never became ready)."""


class AuthError(ValueError):
    """A frame failed authentication, or the server refused our credentials."""


# ----------------------------------------------------------------------------- helpers


def ipc_url(state_dir: str | os.PathLike[str], name: str) -> str:
    """An ipc:// url for a socket in the state dir, or a short, stable path under /tmp when that path
    would exceed the unix socket path limit (same inputs -> same url, so every process agrees)."""
    path = Path(state_dir).resolve() / f"{name}.sock"
    if len(str(path).encode()) > IPC_PATH_LIMIT:
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:20]
        path = Path("/tmp") / f"enpire-{digest}.sock"
    return f"ipc://{path}"


def seal(payload: bytes, secret: bytes | None) -> bytes:
    if not secret:
        return payload
    return hmac.new(secret, payload, hashlib.sha256).digest() + payload


def unseal(frame: bytes, secret: bytes | None) -> bytes:
    """The payload of an authenticated frame; raises AuthError when the MAC is missing or wrong."""
    if not secret:
        return frame
    if len(frame) < MAC_SIZE:
        raise AuthError("frame shorter than its MAC")
    mac, payload = frame[:MAC_SIZE], frame[MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()):
        raise AuthError("frame failed authentication")
    return payload


def cell_key(secret: bytes, sender: str) -> bytes:
    """A peer's own key, derived from the fleet secret and its name: give a remote cell only this."""
    return hmac.new(secret, b"enpire-peer:" + sender.encode(), hashlib.sha256).hexdigest().encode()


def new_run_id() -> bytes:
    return os.urandom(RUN_BYTES)


class Sealed:
    """The authenticated header of a request-path frame."""

    __slots__ = ("counter", "run", "sender")

    def __init__(self, sender: str, run: bytes, counter: int) -> None:
        self.sender, self.run, self.counter = sender, run, counter


def seal_frame(payload: bytes, key: bytes, sender: str, run: bytes, counter: int) -> bytes:
    name = sender.encode()
    if len(name) > 255 or len(run) != RUN_BYTES:
        raise ValueError(f"cannot seal for sender {sender[:40]!r} / run of {len(run)} bytes")
    head = bytes((SEALED_MAGIC, len(name))) + name + run + _COUNTER.pack(counter)
    return head + hmac.new(key, head + payload, hashlib.sha256).digest() + payload


def open_frame(frame: bytes, key_for: Callable[[str], bytes]) -> tuple[Sealed, bytes]:
    """(header, payload) of a sealed frame whose MAC checks out under the key of its sender."""
    if len(frame) < 2 or frame[0] != SEALED_MAGIC:
        raise AuthError("frame is not sealed")
    end = 2 + frame[1]
    mac_at = end + RUN_BYTES + _COUNTER.size
    if len(frame) < mac_at + MAC_SIZE:
        raise AuthError("frame shorter than its header")
    try:
        sender = frame[2:end].decode()
    except UnicodeDecodeError:
        raise AuthError("sender is not UTF-8") from None
    head, mac, payload = frame[:mac_at], frame[mac_at : mac_at + MAC_SIZE], frame[mac_at + MAC_SIZE :]
    if not hmac.compare_digest(mac, hmac.new(key_for(sender), head + payload, hashlib.sha256).digest()):
        raise AuthError("frame failed authentication")
    return Sealed(sender, frame[end : end + RUN_BYTES], _COUNTER.unpack_from(frame, end + RUN_BYTES)[0]), payload


class ReplayGuard:
    """Per sender: counters seen within the window (refuse repeats) and the newest (refuse older ones)."""

    def __init__(self, window_ns: int = REPLAY_WINDOW_NS, max_senders: int = 10_000) -> None:
        self.window = window_ns
        self.max_senders = max_senders
        self._senders: OrderedDict[str, tuple[list[int], set[int], deque[int]]] = OrderedDict()

    def accept(self, sender: str, counter: int) -> bool:
        entry = self._senders.get(sender)
        if entry is None:
            entry = self._senders[sender] = ([counter], set(), deque())
            while len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
        self._senders.move_to_end(sender)
        newest, seen, order = entry
        if counter in seen or counter <= newest[0] - self.window:
            return False
        seen.add(counter)
        order.append(counter)
        if counter > newest[0]:
            newest[0] = counter
        floor = newest[0] - self.window
        while order and order[0] <= floor:  # arrival order is nearly counter order
            seen.discard(order.popleft())
        return True


def _redact(reason: str) -> str:
    """A decode error without the quoted values msgspec copies from the frame (never log payloads)."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)[:200]


def _count_and_log(stats: dict[str, int], key: str, log: Any, event: str, **fields: Any) -> None:
    """Count a refused frame; log the first few and then every 1000th so a flood cannot flood the log."""
    stats[key] += 1
    n = stats[key]
    if n <= 10 or n % 1000 == 0:
        log.warning(event, count=n, **fields)


class _Yielder:
    """Fast paths complete without a trio checkpoint; yield to the scheduler every `every` calls so a
    reader or writer that never waits cannot starve the other tasks."""

    def __init__(self, every: int = 64) -> None:
        self.every = every
        self.count = 0

    async def tick(self) -> None:
        self.count += 1
        if self.count >= self.every:
            self.count = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()


async def _fast_recv(sock: pynng.Socket, yielder: _Yielder) -> bytes:
    """Take a waiting message without a trio round trip; await only when the queue is empty."""
    try:
        frame = sock.recv(block=False)
    except pynng.TryAgain:
        yielder.count = 0
        return await sock.arecv()
    await yielder.tick()
    return frame


# ----------------------------------------------------------------------------- acked path


class _Pending:
    """The first copy of a request being handled; duplicates wait on it and share its reply."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: bytes | None = None


class RequestServer:
    """Answers requests on a Rep0 socket with `workers` concurrent contexts (so a long-poll holds one
    worker, not the server). Run it in a nursery you own: `server = await nursery.start(srv.serve)`;
    cancelling that nursery stops the workers and closes the socket. `url` is updated to the bound
    address once listening (useful with tcp://host:0)."""

    def __init__(
        self,
        url: str,
        handler: Handler,
        *,
        sender: str = "server",
        secret: bytes | None = None,
        per_sender_keys: bool = False,  # each peer's key is cell_key(secret, its name)
        run_id: bytes | None = None,
        workers: int = 16,
        dedup_capacity: int = 50_000,
        dedup_max_bytes: int = 256 << 20,  # replies can carry policy bundles: bound memory too
    ) -> None:
        self.url = url
        self.handler = handler
        self.sender = sender
        self.secret = secret
        self.per_sender_keys = per_sender_keys
        self.run_id = run_id or new_run_id()
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._replay = ReplayGuard()
        self._counter = time.time_ns()
        self.workers = workers
        self.dedup_capacity = dedup_capacity
        self.dedup_max_bytes = dedup_max_bytes
        self.stats = {
            "requests": 0, "duplicates": 0, "pings": 0, "bad_frames": 0, "unauthenticated": 0,
            "handler_errors": 0, "send_errors": 0, "stale_run": 0, "replayed": 0,
        }
        self._replies: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._reply_bytes = 0
        self._inflight: dict[tuple[str, str], _Pending] = {}
        self.log = structlog.get_logger().bind(actor="bus", url=url)

    async def serve(self, *, task_status: trio.TaskStatus[RequestServer] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until cancelled; reports started (with self) once listening."""
        with pynng.Rep0(recv_max_size=MAX_FRAME) as sock:
            sock.listen(self.url)
            if self.url.startswith("tcp://") and self.url.endswith(":0"):
                # str(), not .port: pynng 0.9's InAddr.port is in network byte order
                port = str(sock.listeners[0].local_address).rsplit(":", 1)[1]
                self.url = f"{self.url[:-2]}:{port}"
                self.log = self.log.bind(url=self.url)
            async with trio.open_nursery() as nursery:
                for _ in range(self.workers):
                    nursery.start_soon(self._worker, sock.new_context())
                task_status.started(self)

    async def _worker(self, ctx: pynng.Context) -> None:
        with ctx:  # closed before the socket, so no context outlives it
            while True:
                frame = await ctx.arecv()
                try:
                    reply = await self.answer(frame)
                except Exception as e:  # a bug here must cost one request, not the server
                    self.log.exception("request_failed", bytes=len(frame), error=type(e).__name__)
                    reply = self._reply("", Failure(error="internal error", retry=True))
                try:
                    await ctx.asend(reply)
                except pynng.NNGException as e:  # the requester went away; it will resend if it cares
                    self.stats["send_errors"] += 1
                    self.log.info("reply_not_sent", error=type(e).__name__)

    def key_for(self, sender: str) -> bytes:
        assert self.secret is not None
        if not self.per_sender_keys:
            return self.secret
        key = self._keys.get(sender)
        if key is None:
            key = self._keys[sender] = cell_key(self.secret, sender)
            if len(self._keys) > 10_000:
                self._keys.popitem(last=False)
        return key

    async def answer(self, frame: bytes) -> bytes:
        """The reply frame for any request frame; never raises for bad input (public for tests)."""
        head = None
        try:
            if self.secret is None:
                envelope = decode(frame)
            else:
                head, payload = open_frame(frame, self.key_for)
                envelope = decode(payload)
                if envelope.sender != head.sender:
                    raise AuthError(f"envelope sender {envelope.sender[:40]!r} is not the sealed one")
        except AuthError as e:
            _count_and_log(self.stats, "unauthenticated", self.log, "frame_unauthenticated", bytes=len(frame),
                           reason=str(e))
            # Unsealed on purpose: the peer does not hold our key, so a MAC would prove nothing to it.
            return self._reply("", REFUSED, sealed=False)
        except DecodeError as e:
            _count_and_log(self.stats, "bad_frames", self.log, "frame_undecodable", bytes=len(frame),
                           reason=_redact(str(e)))
            return self._reply("", Failure(error="undecodable frame"), to=head.sender if head else "")
        if envelope.body == PING:  # answered in any run: the reply tells the client ours
            self.stats["pings"] += 1
            return self._reply(envelope.id, Ack(detail="ready"), to=envelope.sender)
        if head is not None:
            if head.run != self.run_id:
                _count_and_log(self.stats, "stale_run", self.log, "frame_from_another_run", sender=envelope.sender)
                return self._reply(envelope.id, STALE_RUN, to=envelope.sender)
            if not self._replay.accept(head.sender, head.counter):
                _count_and_log(self.stats, "replayed", self.log, "frame_replayed", sender=envelope.sender,
                               request=type(envelope.body).__name__)
                return self._reply(envelope.id, REPLAYED, to=envelope.sender)
        self.stats["requests"] += 1
        key = (envelope.sender, envelope.id)  # sender too: two peers may pick the same id
        cached = self._replies.get(key)
        if cached is not None:
            self.stats["duplicates"] += 1
            self._replies.move_to_end(key)
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            self.stats["duplicates"] += 1
            await pending.done.wait()
            return pending.reply or self._reply(envelope.id, Failure(error="first copy was cancelled", retry=True),
                                                to=envelope.sender)
        pending = self._inflight[key] = _Pending()
        try:
            body = await self._handle(envelope)
            try:
                pending.reply = self._reply(envelope.id, body, to=envelope.sender)
            except Exception as e:  # e.g. a value msgspec cannot encode in the handler's reply
                self.stats["handler_errors"] += 1
                self.log.error("reply_unencodable", request=type(envelope.body).__name__, error=f"{type(e).__name__}: {e}")
                body = Failure(error=f"reply could not be encoded: {type(e).__name__}", retry=True)
                pending.reply = self._reply(envelope.id, body, to=envelope.sender)
            if not (isinstance(body, Failure) and body.retry):  # a retryable failure runs again on resend
                self._remember(key, pending.reply)
            return pending.reply
        finally:
            del self._inflight[key]
            pending.done.set()

    async def _handle(self, envelope: Envelope) -> Message:
        request = type(envelope.body).__name__
        try:
            body = await self.handler(envelope)
            if not isinstance(body, Message):
                raise TypeError(f"handler returned {type(body).__name__}, not a Message")
            return body
        except Exception as e:
            self.stats["handler_errors"] += 1
            self.log.error("handler_failed", request=request, sender=envelope.sender, id=envelope.id,
                           error=f"{type(e).__name__}: {e}")
            return Failure(error=f"{type(e).__name__}: {e}", retry=True)

    def _remember(self, key: tuple[str, str], reply: bytes) -> None:
        self._replies[key] = reply
        self._reply_bytes += len(reply)
        while self._replies and (len(self._replies) > self.dedup_capacity or self._reply_bytes > self.dedup_max_bytes):
            _, old = self._replies.popitem(last=False)
            self._reply_bytes -= len(old)

    def _reply(self, request_id: str, body: Message, *, sealed: bool = True, to: str = "") -> bytes:
        payload = encode(Envelope(id=request_id, sender=self.sender, body=body))
        if not sealed or self.secret is None:
            return payload
        self._counter = max(self._counter + 1, time.time_ns())
        return seal_frame(payload, self.key_for(to), self.sender, self.run_id, self._counter)


class RequestClient:
    """Acked requests to one server. Safe to use from many trio tasks at once: each request has its
    own nng context. Dials at construction; nng keeps redialling in the background, so a client may
    be created (and may send) before the server exists."""

    def __init__(self, url: str, *, sender: str, secret: bytes | None = None) -> None:
        """`secret`: this peer's own key (`cell_key(fleet secret, sender)` for a server with per-sender
        keys, else the shared secret)."""
        self.url = url
        self.sender = sender
        self.secret = secret
        self.run = bytes(RUN_BYTES)  # the server's run id, learned from its first authenticated reply
        self._counter = time.time_ns()  # a clock, so a restarted client never reuses a counter
        # resend_time=-1: nng must not resend on its own; we resend ourselves, with the same id.
        self._sock = pynng.Req0(recv_max_size=MAX_FRAME, resend_time=-1)
        self._sock.reconnect_time_min = 20  # ms: a late server is found quickly
        self._sock.reconnect_time_max = 500
        self._sock.dial(url, block=False)

    async def request(
        self, body: Message, *, timeout: float = 2.0, retries: int = 5, id: str | None = None
    ) -> Message:
        """Send `body` and return the reply body. On each `timeout` the same id is resent (after a
        backoff of 50 ms doubling up to 2 s), so the server runs it at most once. Raises RequestTimeout
        after `retries` resends, AuthError when the server refuses our credentials."""
        envelope = Envelope(id=id or uuid.uuid4().hex, sender=self.sender, body=body)
        payload = encode(envelope)
        delay = 0.05
        for attempt in range(retries + 1):
            reply = await self._exchange(self._seal(payload), timeout)
            if reply is not None:
                answer = self._read_reply(reply, envelope.id)
                if answer == STALE_RUN:  # the server restarted: we now know its run id; resend at once
                    reply = await self._exchange(self._seal(payload), timeout)
                    answer = self._read_reply(reply, envelope.id) if reply is not None else None
                if answer is not None and answer != STALE_RUN:
                    return answer
            if attempt < retries:
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise RequestTimeout(
            f"{self.url}: no reply to {type(body).__name__} (id {envelope.id}) after {retries + 1} tries of {timeout}s"
        )

    async def _exchange(self, frame: bytes, timeout: float) -> bytes | None:
        # A fresh context per try: closing it abandons the old copy, so a late reply to it is dropped.
        with self._sock.new_context() as ctx, trio.move_on_after(timeout):
            await ctx.asend(frame)
            return await ctx.arecv()
        return None

    def _seal(self, payload: bytes) -> bytes:
        """A fresh frame for each try: a resend is not a replay."""
        if not self.secret:
            return payload
        self._counter = max(self._counter + 1, time.time_ns())
        return seal_frame(payload, self.secret, self.sender, self.run, self._counter)

    def _read_reply(self, reply: bytes, request_id: str) -> Message | None:
        """The reply body; None for a frame to ignore (a resend follows)."""
        try:
            if self.secret:
                head, payload = open_frame(reply, lambda _sender: self.secret)  # type: ignore[arg-type,return-value]
                envelope = decode(payload)
                self.run = head.run  # authenticated by our key: the server's current run
            else:
                envelope = decode(reply)
            if envelope.id != request_id and envelope.id:
                return None  # not the answer to this request
            body = envelope.body
        except DecodeError:
            return None
        except AuthError:
            # Not sealed with our key: the server does not share it. Believe only a plain Failure, as a
            # refusal (a forged one can cost a failed request, never a wrong answer).
            try:
                body = decode(reply).body
            except DecodeError:
                return None
            if isinstance(body, Failure):
                raise AuthError(f"{self.url}: the server refused our credentials ({body.error})") from None
            return None
        if body == REFUSED:
            raise AuthError(f"{self.url}: the server refused our credentials ({body.error})")
        return body

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """The ready barrier: returns once the server answers a ping (handled by the server itself,
        never by its handler). Raises RequestTimeout after `timeout`, AuthError if refused."""
        per_try = 0.25  # grows, so a slow (remote) link still gets an answer in
        with trio.move_on_after(timeout):
            while True:
                try:
                    await self.request(PING, timeout=per_try, retries=0)
                    return
                except RequestTimeout:
                    per_try = min(per_try * 2, 2.0)
        raise RequestTimeout(f"{self.url}: server not ready after {timeout}s")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RequestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- telemetry (lossy)


class Publisher:
    """Telemetry out, lossy by nature: listens; subscribers dial. Never put anything here that must
    arrive. Run `heartbeat` in a nursery so subscribers can pass `wait_joined`."""

    def __init__(self, url: str, secret: bytes | None = None, *, sender: str = "fleet", buffer: int = 1024) -> None:
        self.sender = sender
        self.secret = secret
        self._sock = pynng.Pub0(send_buffer_size=buffer)  # per-subscriber queue before nng drops
        self._sock.listen(url)
        self._yielder = _Yielder()

    async def publish(self, body: Message) -> None:
        envelope = Envelope(id=uuid.uuid4().hex, sender=self.sender, body=body)
        frame = seal(encode(envelope), self.secret)
        try:  # Pub0 drops rather than blocks, so this nearly always completes without a trio round trip
            self._sock.send(frame, block=False)
        except pynng.TryAgain:
            await self._sock.asend(frame)
            return
        await self._yielder.tick()

    async def heartbeat(self, interval: float = 0.05, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish a probe every `interval` seconds until cancelled (the pub/sub ready barrier)."""
        task_status.started()
        while True:
            await self.publish(PROBE)
            await trio.sleep(interval)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscriber:
    """Telemetry in: dials (in the background), subscribes to everything. Frames that fail
    authentication or decoding are dropped, logged and counted; heartbeat probes are skipped."""

    def __init__(self, url: str, secret: bytes | None = None, *, buffer: int = 1024) -> None:
        self.url = url
        self.secret = secret
        self.stats = {"received": 0, "bad_frames": 0, "unauthenticated": 0}
        self.log = structlog.get_logger().bind(actor="bus", url=url)
        self._sock = pynng.Sub0(recv_max_size=MAX_FRAME, recv_buffer_size=buffer)
        self._sock.subscribe(b"")
        self._sock.dial(url, block=False)
        self._joined = False
        self._early: Envelope | None = None  # an event that arrived during wait_joined
        self._yielder = _Yielder()

    async def _next(self) -> Envelope:
        """The next valid envelope, probes included."""
        while True:
            frame = await _fast_recv(self._sock, self._yielder)
            try:
                return decode(unseal(frame, self.secret))
            except AuthError as e:
                _count_and_log(self.stats, "unauthenticated", self.log, "frame_unauthenticated",
                               bytes=len(frame), reason=str(e))
            except DecodeError as e:
                _count_and_log(self.stats, "bad_frames", self.log, "frame_undecodable", bytes=len(frame),
                               reason=_redact(str(e)))

    async def receive(self) -> Envelope:
        if self._early is not None:
            envelope, self._early = self._early, None
            return envelope
        while True:
            envelope = await self._next()
            self._joined = True
            if envelope.body != PROBE:
                self.stats["received"] += 1
                return envelope

    async def wait_joined(self, timeout: float = 10.0) -> None:
        """The ready barrier: returns once a frame from the publisher has arrived (its heartbeat must
        be running). Events published afterwards reach this subscriber unless it falls behind. Tell the
        publisher's side over the acked path if it must wait for you. Raises TimeoutError."""
        with trio.move_on_after(timeout):
            while not self._joined:
                envelope = await self._next()
                self._joined = True
                if envelope.body != PROBE:  # an event came first: keep it for receive()
                    self.stats["received"] += 1
                    self._early = envelope
        if not self._joined:
            raise TimeoutError(f"{self.url}: nothing from the publisher after {timeout}s (is its heartbeat running?)")

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Envelope:
        return await self.receive()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
