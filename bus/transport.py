"""nng transport under trio: an acked request/reply path and lossy pub/sub for telemetry.

Acked path (anything that must not be lost): `RequestClient.request` sends an Envelope with an id and
waits for the reply; on timeout it resends the SAME id with backoff. `RequestServer` answers each id
once: replies are cached (bounded LRU) and a duplicate, even one arriving while the first is still
being handled, gets the first reply without running the handler again.

Pub/sub (telemetry only): nng drops silently when a subscriber is slow or not yet joined.

Frames are msgpack Envelopes; with a shared secret each frame is prefixed by its HMAC-SHA256, and
frames that fail the check are refused, logged and counted. A frame that fails to decode is answered
with a `Failure`, logged and counted; it never stops a reader.

Readers use the fast path: a non-blocking receive first, an awaited receive only when nothing is
waiting (per-message awaits cap throughput at a few thousand messages per second).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import pynng
import structlog
import trio

from bus.messages import Ack, DecodeError, Envelope, Failure, Message, decode, encode

MAX_FRAME = 64 << 20  # a frame above this is refused by nng before we see it
_MAC = 32

Handler = Callable[[Envelope], Awaitable[Message]]


class RequestTimeout(TimeoutError):
    pass


class AuthError(ValueError):
    pass


def ipc_url(state_dir: str | os.PathLike, name: str) -> str:
    """An ipc:// url for a socket in the state dir, or under /tmp when that path is too long for unix sockets."""
    path = Path(state_dir).resolve() / f"{name}.sock"
    if len(str(path)) > 100:
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
        path = Path("/tmp") / f"enpire-{digest}-{name}.sock"
    return f"ipc://{path}"


def seal(payload: bytes, secret: bytes | None) -> bytes:
    if not secret:
        return payload
    return hmac.new(secret, payload, hashlib.sha256).digest() + payload


def unseal(frame: bytes, secret: bytes | None) -> bytes:
    if not secret:
        return frame
    mac, payload = frame[:_MAC], frame[_MAC:]
    if len(frame) < _MAC or not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()):
        raise AuthError("frame failed authentication")
    return payload


async def _fast_recv(sock) -> bytes:
    """Take a waiting message without a trio round trip; await only when the queue is empty."""
    try:
        return sock.recv(block=False)
    except pynng.TryAgain:
        return await sock.arecv()


class RequestServer:
    def __init__(
        self,
        url: str,
        handler: Handler,
        *,
        sender: str = "server",
        secret: bytes | None = None,
        workers: int = 16,
        dedup_capacity: int = 50_000,
    ):
        self.url = url
        self.handler = handler
        self.sender = sender
        self.secret = secret
        self.workers = workers
        self.dedup_capacity = dedup_capacity
        self.stats = {"requests": 0, "duplicates": 0, "bad_frames": 0, "unauthenticated": 0, "handler_errors": 0}
        self._replies: OrderedDict[str, bytes] = OrderedDict()
        self._inflight: dict[str, trio.Event] = {}
        self.log = structlog.get_logger().bind(actor="bus", url=url)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until cancelled; ready (task_status) once listening."""
        with pynng.Rep0(recv_max_size=MAX_FRAME) as sock:
            sock.listen(self.url)
            async with trio.open_nursery() as nursery:
                for _ in range(self.workers):
                    nursery.start_soon(self._worker, sock.new_context())
                task_status.started(self)

    async def _worker(self, ctx) -> None:
        with ctx:
            while True:
                frame = await ctx.arecv()
                await ctx.asend(await self.answer(frame))

    async def answer(self, frame: bytes) -> bytes:
        """The reply frame for a request frame (public for tests and in-process use)."""
        try:
            envelope = decode(unseal(frame, self.secret))
        except AuthError:
            self.stats["unauthenticated"] += 1
            self.log.warning("frame_unauthenticated", bytes=len(frame))
            return self._reply("", Failure(error="unauthenticated", retry=False), seal_it=False)
        except DecodeError as e:
            self.stats["bad_frames"] += 1
            self.log.warning("frame_undecodable", bytes=len(frame), reason=str(e)[:200])
            return self._reply("", Failure(error="undecodable frame", retry=False))
        self.stats["requests"] += 1
        key = f"{envelope.sender}\x00{envelope.id}"
        cached = self._replies.get(key)
        if cached is not None:
            self.stats["duplicates"] += 1
            return cached
        pending = self._inflight.get(key)
        if pending is not None:  # the first copy is still being handled: share its reply
            self.stats["duplicates"] += 1
            await pending.wait()
            return self._replies.get(key) or self._reply(envelope.id, Failure(error="retry", retry=True))
        done = self._inflight[key] = trio.Event()
        try:
            body = await self._handle(envelope)
            reply = self._reply(envelope.id, body)
            if not (isinstance(body, Failure) and body.retry):  # a retryable failure runs again on retry
                self._replies[key] = reply
                while len(self._replies) > self.dedup_capacity:
                    self._replies.popitem(last=False)
            return reply
        finally:
            del self._inflight[key]
            done.set()

    async def _handle(self, envelope: Envelope) -> Message:
        if isinstance(envelope.body, Ack):  # ping: the ready barrier
            return Ack(detail="ready")
        try:
            return await self.handler(envelope)
        except Exception as e:
            self.stats["handler_errors"] += 1
            self.log.error("handler_failed", request=type(envelope.body).__name__, error=f"{type(e).__name__}: {e}")
            return Failure(error=f"{type(e).__name__}: {e}", retry=True)

    def _reply(self, request_id: str, body: Message, seal_it: bool = True) -> bytes:
        payload = encode(Envelope(id=request_id, sender=self.sender, body=body))
        return seal(payload, self.secret if seal_it else None)


def _refused(body: Message) -> bool:
    return isinstance(body, Failure) and body.error == "unauthenticated"


class RequestClient:
    """Acked requests to one server; safe to use from many trio tasks at once (one nng context each)."""

    def __init__(self, url: str, *, sender: str, secret: bytes | None = None):
        self.url = url
        self.sender = sender
        self.secret = secret
        self._sock = pynng.Req0(recv_max_size=MAX_FRAME, resend_time=-1)  # we resend ourselves, same id
        self._sock.reconnect_time_min = 20
        self._sock.reconnect_time_max = 500
        self._sock.dial(url, block=False)  # dials in the background until the server exists

    async def request(self, body: Message, *, timeout: float = 2.0, retries: int = 5, id: str | None = None) -> Message:
        envelope = Envelope(id=id or uuid.uuid4().hex, sender=self.sender, body=body)
        frame = seal(encode(envelope), self.secret)
        delay = 0.05
        for attempt in range(retries + 1):
            reply = await self._once(frame, timeout)
            if reply is not None:
                answer = self._read_reply(reply)
                if answer is not None:
                    return answer
            if attempt < retries:
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise RequestTimeout(f"{self.url}: no reply to {type(body).__name__} after {retries + 1} tries of {timeout}s")

    def _read_reply(self, reply: bytes) -> Message | None:
        try:
            body = decode(unseal(reply, self.secret)).body
        except DecodeError:
            return None
        except AuthError:
            # The server's refusal is not sealed (it does not trust our key): read it, trust nothing else.
            try:
                body = decode(reply).body
            except DecodeError:
                return None
            if not _refused(body):
                return None
        if _refused(body):
            raise AuthError(f"{self.url}: the server refused our credentials")
        return body

    async def _once(self, frame: bytes, timeout: float) -> bytes | None:
        with self._sock.new_context() as ctx:
            with trio.move_on_after(timeout):
                await ctx.asend(frame)
                return await ctx.arecv()
        return None

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """The ready barrier: returns once the server answers a ping."""
        with trio.move_on_after(timeout):
            while True:
                try:
                    await self.request(Ack(), timeout=0.5, retries=0)
                except RequestTimeout:
                    continue
                return
        raise RequestTimeout(f"{self.url}: server not ready after {timeout}s")

    def close(self) -> None:
        self._sock.close()


_PROBE = Ack(detail="__probe__")


class Publisher:
    """Telemetry out (lossy): listens; subscribers dial."""

    def __init__(self, url: str, *, sender: str = "fleet", secret: bytes | None = None):
        self.sender = sender
        self.secret = secret
        self._sock = pynng.Pub0()
        self._sock.listen(url)

    async def publish(self, body: Message) -> None:
        envelope = Envelope(id=uuid.uuid4().hex, sender=self.sender, body=body)
        await self._sock.asend(seal(encode(envelope), self.secret))

    def close(self) -> None:
        self._sock.close()


class Subscriber:
    """Telemetry in: frames that fail authentication or decoding are dropped and counted."""

    def __init__(self, url: str, *, secret: bytes | None = None):
        self.secret = secret
        self.stats = {"received": 0, "bad_frames": 0, "unauthenticated": 0}
        self._sock = pynng.Sub0(recv_max_size=MAX_FRAME)
        self._sock.subscribe(b"")
        self._sock.dial(url, block=False)

    async def receive(self) -> Envelope:
        while True:
            frame = await _fast_recv(self._sock)
            try:
                envelope = decode(unseal(frame, self.secret))
            except AuthError:
                self.stats["unauthenticated"] += 1
                continue
            except DecodeError:
                self.stats["bad_frames"] += 1
                continue
            if envelope.body == _PROBE:
                continue
            self.stats["received"] += 1
            return envelope

    async def wait_joined(self, publisher: Publisher, timeout: float = 10.0) -> None:
        """The pub/sub ready barrier (same process): probe until one arrives, so later events are not lost
        to a subscription still being set up. Across processes, use the acked path as the barrier."""
        with trio.fail_after(timeout):
            while True:
                await publisher.publish(_PROBE)
                with trio.move_on_after(0.05):
                    frame = await _fast_recv(self._sock)
                    try:
                        if decode(unseal(frame, self.secret)).body == _PROBE:
                            return
                    except (AuthError, DecodeError):
                        pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> Envelope:
        return await self.receive()

    def close(self) -> None:
        self._sock.close()
