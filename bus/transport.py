"""nng transport under trio: an acked request/reply path and lossy pub/sub for telemetry.

Acked path (anything that must not be lost: assignments, results, jobs, findings):
`RequestClient.request` sends an Envelope with an id and waits for the reply; on timeout it resends
the SAME id with backoff (`bus.backoff`). `RequestServer` answers each (sender, id) once: replies are cached (bounded
LRU) and a duplicate, even one arriving while the first copy is still being handled, gets the first
reply without running the handler again. The ready barrier is `RequestClient.wait_ready`: a ping
the server answers itself, so a client knows the server is up before it relies on it.

Pub/sub (telemetry ONLY): nng drops silently when a subscriber is slow, not yet joined, or its
queue is full. Nothing that must arrive may travel there. `Publisher.heartbeat` + `Subscriber.wait_joined`
is its ready barrier: once a probe has arrived, the subscription is live and later events reach it
(unless dropped for being slow).

Frames are msgpack Envelopes. With a secret, a request-path frame is
`0xE5 | len(sender) | sender | run id (16 bytes) | counter (u64) | MAC(key, all before it + payload) | payload`
(MAC: keyed BLAKE2b-256, `_mac`):
- the key is the sender's own: with `per_sender_keys` the server derives it from its secret and the
  sender's name (`cell_key`), so a peer holding one cell's key can speak only as that cell, and the
  envelope's sender must match the sealed one;
- the run id is the server's (random per start, learned from the ready ping): a frame captured in
  another run is refused (`stale run`; an honest client re-learns the run id and resends);
- the counter is the sender's clock in ns, strictly increasing per client: the server keeps, per
  sender, the counters seen in the last `REPLAY_WINDOW_NS` and refuses a repeat or an older frame
  (`replayed`). A resend is a new frame (same envelope id, new counter), so at-most-once still holds.
Replies are sealed the same way with the requester's key. Pub/sub frames (telemetry only) carry just
MAC(secret, payload) || payload. The receiver checks the MAC (constant time) before decoding. Frames
that fail authentication or decoding are refused (a `Failure` reply on the request path, dropped on
pub/sub), logged without their content and counted; they never stop a reader.

Fast path: no request, reply or event goes through an nng thread's callback into trio (pynng's
`arecv`/`asend` cost a thread hand-off and a trio wake-up each, as much as the rest of a request).
Readers take what is waiting at once (a non-blocking recv, or for a server context an aio with a zero
timeout) and otherwise wait on the socket's readiness fd in trio's own poll. A Rep0 socket's fd is
readable while any request waits for a context; a client uses one Req0 socket per request in flight
(pooled), whose fd signals its reply. Replies are handed to nng without waiting for them to leave.
Per request, the trio machinery itself is kept off the path where it cost most (bench/bus.py, CPU per
request): a server worker answers what it received in its own task and hands the listening on only if
the answer has to wait (`_unless_it_waits`), and the MAC is one keyed BLAKE2b (`_mac`). A
client's wait for a reply stays a plain cancel scope (`move_on_after`): a timer task with flags saved
30-60 µs per request but made timeouts a flag instead of a scope.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import itertools
import math
import os
import re
import struct
import time
import types
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import pynng
import structlog
import trio
from pynng import ffi, lib
from pynng.exceptions import check_err

from bus.backoff import backoff_delay
from bus.messages import Ack, DecodeError, Envelope, Failure, Message, PolicyBundle, decode, encode

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
    return _mac(secret, b"", payload) + payload


def unseal(frame: bytes, secret: bytes | None) -> bytes:
    """The payload of an authenticated frame; raises AuthError when the MAC is missing or wrong."""
    if not secret:
        return frame
    if len(frame) < MAC_SIZE:
        raise AuthError("frame shorter than its MAC")
    mac, payload = frame[:MAC_SIZE], frame[MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(secret, b"", payload)):
        raise AuthError("frame failed authentication")
    return payload


def cell_key(secret: bytes, sender: str) -> bytes:
    """A peer's own key, derived from the fleet secret and its name: give a remote cell only this."""
    return hmac.new(secret, b"enpire-peer:" + sender.encode(), hashlib.sha256).hexdigest().encode()


def new_run_id() -> bytes:
    return os.urandom(RUN_BYTES)


class _Ids:
    """Envelope ids unique across peers and restarts: a random prefix per process object and a counter
    (a uuid4 per request costs more than the rest of building the frame)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._next = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._next):x}"


class Sealed:
    """The authenticated header of a request-path frame."""

    __slots__ = ("counter", "run", "sender")

    def __init__(self, sender: str, run: bytes, counter: int) -> None:
        self.sender, self.run, self.counter = sender, run, counter


def _mac(key: bytes, head: bytes, payload: bytes) -> bytes:
    """Keyed BLAKE2b-256 of head + payload (RFC 7693's MAC mode), without joining them: one hashlib
    object per frame, against five for an HMAC-SHA256 from cached pads (README: 5-13% more requests/s
    at 8 requesters in 3 alternating pairs; within bench/bus.py's noise). A key longer than BLAKE2b's
    64 bytes is hashed down first, as HMAC does."""
    mac = hashlib.blake2b(head, key=key if len(key) <= 64 else _long_key(key), digest_size=MAC_SIZE)
    mac.update(payload)
    return mac.digest()


@functools.lru_cache(maxsize=64)  # a pure function of the key; long keys are rare (fleet secrets are 32 bytes, peers' keys 64)
def _long_key(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=64).digest()


def seal_prefix(sender: str, run: bytes) -> bytes:
    """The part of a sealed frame's header that is the same for every frame of one sender in one run."""
    name = sender.encode()
    if len(name) > 255 or len(run) != RUN_BYTES:
        raise ValueError(f"cannot seal for sender {sender[:40]!r} / run of {len(run)} bytes")
    return bytes((SEALED_MAGIC, len(name))) + name + run


def seal_frame(payload: bytes, key: bytes, sender: str, run: bytes, counter: int, *, prefix: bytes = b"") -> bytes:
    """`prefix`: seal_prefix(sender, run) when the caller keeps it (it seals many frames)."""
    head = (prefix or seal_prefix(sender, run)) + _COUNTER.pack(counter)
    return b"".join((head, _mac(key, head, payload), payload))


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
    if not hmac.compare_digest(mac, _mac(key_for(sender), head, payload)):
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


async def _fast_recv(sock: pynng.Socket, fd: int, yielder: _Yielder) -> bytes:
    """Take a waiting message without a trio round trip; when none waits, wait for the socket's
    readiness fd in trio's own poll (no nng thread hand-off, unlike pynng's arecv)."""
    while True:
        try:
            frame = sock.recv(block=False)
        except pynng.TryAgain:
            yielder.count = 0
            await trio.lowlevel.wait_readable(fd)
            continue
        await yielder.tick()
        return frame


NNG_NOW = 0  # an aio timeout of zero: nng completes the operation at once or fails it with NNG_ETIMEDOUT
REPLY_TIMEOUT_MS = 30_000  # a reply a stalled peer never takes is dropped then (its requester resends)
MAX_CLIENT_SOCKETS = 32  # a client's concurrent requests beyond this wait for a free socket


def _new_aio(timeout_ms: int):
    """An nng aio without a completion callback: nothing of it ever runs Python or wakes trio."""
    aio_p = ffi.new("nng_aio **")
    check_err(lib.nng_aio_alloc(aio_p, ffi.NULL, ffi.NULL))
    lib.nng_aio_set_timeout(aio_p[0], timeout_ms)
    return aio_p[0]


def _nng_msg(data: bytes, msg_p: Any = None):
    """A new nng message holding `data`; `msg_p`: an nng_msg** of the caller's to reuse."""
    msg_p = msg_p or ffi.new("nng_msg **")
    check_err(lib.nng_msg_alloc(msg_p, 0))
    check_err(lib.nng_msg_append(msg_p[0], data, len(data)))
    return msg_p[0]


class _Slot:
    """One server context and its two callback-free aios: a receive that completes at once or fails
    (zero timeout), and a reply handed to nng without waiting for it to leave. Nothing here wakes trio:
    the server waits on the socket's readiness fd instead (see RequestServer)."""

    def __init__(self, ctx: pynng.Context) -> None:
        self.ctx = ctx
        self._ctx = ctx.context  # the nng handle itself (pynng's property costs a call per use)
        self._msg = ffi.new("nng_msg **")
        self._recv = _new_aio(NNG_NOW)
        self._reply = _new_aio(REPLY_TIMEOUT_MS)
        self._replying = False

    def try_recv(self) -> bytes | None:
        lib.nng_ctx_recv(self._ctx, self._recv)
        lib.nng_aio_wait(self._recv)  # returns at once: zero timeout
        err = lib.nng_aio_result(self._recv)
        if err == lib.NNG_ETIMEDOUT:
            return None
        check_err(err)
        msg = lib.nng_aio_get_msg(self._recv)
        try:
            return ffi.buffer(lib.nng_msg_body(msg), lib.nng_msg_len(msg))[:]
        finally:
            lib.nng_msg_free(msg)

    def reply(self, data: bytes) -> None:
        # Never with a zero timeout: a Rep0 send that finds its pipe busy would fail and drop the
        # request's return route. This one waits in nng (behind the pipe's previous reply), not here.
        lib.nng_aio_set_msg(self._reply, _nng_msg(data, self._msg))
        lib.nng_ctx_send(self._ctx, self._reply)
        self._replying = True

    def settled(self) -> tuple[bool, str]:
        """(whether the last reply has left or failed, so the context is free; its error or "")."""
        if not self._replying:
            return True, ""
        if lib.nng_aio_busy(self._reply):
            return False, ""
        self._replying = False
        err = lib.nng_aio_result(self._reply)
        if not err:
            return True, ""
        lib.nng_msg_free(lib.nng_aio_get_msg(self._reply))  # not sent: still ours
        return True, ffi.string(lib.nng_strerror(err)).decode()

    def close(self) -> None:
        self.ctx.close()  # aborts anything pending, so the frees below do not wait
        lib.nng_aio_free(self._recv)
        lib.nng_aio_free(self._reply)
        if self._replying and lib.nng_aio_result(self._reply):
            lib.nng_msg_free(lib.nng_aio_get_msg(self._reply))


@types.coroutine
def _unless_it_waits(coro: Coroutine[Any, Any, Any], on_wait: Callable[[], None]) -> Generator[Any, Any, Any]:
    """Await `coro` in the calling task, calling `on_wait()` once, just before its first yield to trio
    (a trio coroutine yields only to wait or to checkpoint). This is `await coro` (PEP 380's
    delegation, spelled out) with that one hook: the yielded values are trio's own, passed through
    unchanged in the same task, so cancellation and errors behave as with a plain await."""
    try:
        trap = coro.send(None)
    except StopIteration as done:
        return done.value
    on_wait()
    while True:
        try:
            value = yield trap
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # trio resumes the task with an error (Cancelled, ...): pass it in
            try:
                trap = coro.throw(e)
            except StopIteration as done:
                return done.value
        else:
            try:
                trap = coro.send(value)
            except StopIteration as done:
                return done.value


# ----------------------------------------------------------------------------- acked path


class _Pending:
    """The first copy of a request being handled; duplicates wait on it and share its reply (the Event
    is made by the first duplicate: most requests have none)."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done: trio.Event | None = None
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
        dedup_max_bytes: int = 64 << 20,  # bounds memory too (policy bundles are never kept)
    ) -> None:
        self.url = url
        self.handler = handler
        self.sender = sender
        self.secret = secret
        self.per_sender_keys = per_sender_keys
        self.run_id = run_id or new_run_id()
        self._prefix, self._prefix_run = b"", b""  # seal_prefix(sender, run_id), made at the first sealed reply
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
            slots = [_Slot(sock.new_context()) for _ in range(self.workers)]
            try:
                async with trio.open_nursery() as nursery:
                    listening, idle = trio.Lock(), list(slots)
                    for _ in range(self.workers):
                        nursery.start_soon(self._worker, sock.recv_fd, listening, idle)
                    task_status.started(self)
            finally:
                for slot in slots:  # contexts before the socket, so none outlives it
                    slot.close()

    async def _worker(self, fd: int, listening: trio.Lock, idle: list[_Slot]) -> None:
        """Workers take turns listening (leader/follower): the one holding `listening` takes the next
        request into a free context, waiting on the socket's readiness fd in trio's own poll when none
        waits (no thread hand-off), and answers it itself at once. It hands the turn on only if answering
        has to wait (the handler, or a duplicate waiting for its first copy, yields to trio): at that
        moment, before any other task runs, so a long-poll holds its worker and context, never the
        listening. An answer that does not wait (most) costs no task switch: handing the turn on at every
        request cost ~45 µs of the server's ~170 µs per request at 8 requesters (bench/bus.py). There are
        as many workers as contexts, so the listener always finds a context that is not in use."""
        holding = False

        def hand_off() -> None:
            nonlocal holding
            holding = False
            listening.release()

        while True:
            if not holding:
                try:
                    listening.acquire_nowait()  # no scheduling round trip when no other worker waits for the turn
                except trio.WouldBlock:
                    await listening.acquire()
                holding = True
            try:
                slot = await self._free_slot(idle)
                frame = slot.try_recv()
                while frame is None:
                    await trio.lowlevel.wait_readable(fd)
                    frame = slot.try_recv()
            except BaseException:
                hand_off()
                raise
            try:
                reply = await _unless_it_waits(self.answer(frame), hand_off)
            except Exception as e:  # a bug here must cost one request, not the server
                self.log.exception("request_failed", bytes=len(frame), error=type(e).__name__)
                reply = self._reply("", Failure(error="internal error", retry=True))
            except BaseException:  # cancelled (always at a yield, so after hand_off) or interrupted
                if holding:
                    hand_off()
                raise
            slot.reply(reply)
            idle.append(slot)

    async def _free_slot(self, idle: list[_Slot]) -> _Slot:
        looks = 0
        while True:
            for i, slot in enumerate(idle):
                done, error = slot.settled()
                if error:  # the requester went away; it resends if it cares
                    self.stats["send_errors"] += 1
                    self.log.info("reply_not_sent", error=error)
                if done:
                    return idle.pop(i)
            # Every idle context's reply still waits behind others on its pipe (rare): look again soon.
            looks += 1
            await trio.sleep(backoff_delay(looks, 0.0002, 0.02))

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
            if pending.done is None:
                pending.done = trio.Event()
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
            # A retryable failure runs again on resend; a policy bundle is content-addressed (answering
            # again is always right), so its megabytes never sit in the duplicate-reply cache.
            if not (isinstance(body, Failure) and body.retry) and not isinstance(body, PolicyBundle):
                self._remember(key, pending.reply)
            return pending.reply
        finally:
            del self._inflight[key]
            if pending.done is not None:
                pending.done.set()

    async def _handle(self, envelope: Envelope) -> Message:
        try:
            body = await self.handler(envelope)
            if not isinstance(body, Message):
                raise TypeError(f"handler returned {type(body).__name__}, not a Message")
            return body
        except Exception as e:
            self.stats["handler_errors"] += 1
            self.log.error("handler_failed", request=type(envelope.body).__name__, sender=envelope.sender, id=envelope.id,
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
        if self._prefix_run != self.run_id:
            self._prefix, self._prefix_run = seal_prefix(self.sender, self.run_id), self.run_id
        return seal_frame(payload, self.key_for(to), self.sender, self.run_id, self._counter, prefix=self._prefix)


class _Requester:
    """One Req0 socket of a client. A request is handed to nng by a callback-free aio and not waited
    for (nng's own "non-blocking" send waits for an nng thread to confirm it); the reply is waited for
    on the socket's readiness fd."""

    def __init__(self, url: str) -> None:
        # resend_time=-1: nng must not resend on its own; we resend ourselves, with the same id.
        self.sock = pynng.Req0(recv_max_size=MAX_FRAME, resend_time=-1)
        self.sock.reconnect_time_min = 20  # ms: a late server is found quickly
        self.sock.reconnect_time_max = 500
        self.sock.dial(url, block=False)
        self.fd = self.sock.recv_fd
        self._sock = self.sock.socket  # the nng handle itself (pynng's property costs a call per use)
        self._msg_out, self._msg_in = ffi.new("nng_msg **"), ffi.new("nng_msg **")
        self._send = _new_aio(-1)  # no timeout: a request waits in nng for the server to appear
        self._sending = False

    def post(self, frame: bytes) -> None:
        """Send a request (abandoning the previous one: a late reply to it is dropped by nng)."""
        self._settle()
        lib.nng_aio_set_msg(self._send, _nng_msg(frame, self._msg_out))
        lib.nng_send_aio(self._sock, self._send)
        self._sending = True

    def _settle(self) -> None:
        if not self._sending:
            return
        if lib.nng_aio_busy(self._send):  # an abandoned request that never found a server: withdraw it
            lib.nng_aio_cancel(self._send)
            lib.nng_aio_wait(self._send)  # prompt once cancelled
        self._sending = False
        if lib.nng_aio_result(self._send):
            lib.nng_msg_free(lib.nng_aio_get_msg(self._send))  # not sent: still ours

    async def reply(self) -> bytes:
        while True:  # a reply takes a round trip: wait before the first look
            await trio.lowlevel.wait_readable(self.fd)
            err = lib.nng_recvmsg(self._sock, self._msg_in, lib.NNG_FLAG_NONBLOCK)
            if err == lib.NNG_EAGAIN:  # woken for nothing (the fd is a hint): wait again
                continue
            check_err(err)
            msg = self._msg_in[0]
            try:
                return ffi.buffer(lib.nng_msg_body(msg), lib.nng_msg_len(msg))[:]
            finally:
                lib.nng_msg_free(msg)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # outside trio nothing waits on the fd
            trio.lowlevel.notify_closing(self.fd)
        self.sock.close()  # aborts a pending send, so the free below does not wait
        lib.nng_aio_free(self._send)
        if self._sending and lib.nng_aio_result(self._send):
            lib.nng_msg_free(lib.nng_aio_get_msg(self._send))


class RequestClient:
    """Acked requests to one server. Safe to use from many trio tasks at once: each request in flight
    has a Req0 socket of its own (a small pool, grown on demand up to MAX_CLIENT_SOCKETS), and waits
    for its reply on that socket's readiness fd in trio's own poll, never through an nng thread's
    callback. Dials at construction; nng keeps redialling in the background, so a client may be
    created (and may send) before the server exists."""

    def __init__(self, url: str, *, sender: str, secret: bytes | None = None) -> None:
        """`secret`: this peer's own key (`cell_key(fleet secret, sender)` for a server with per-sender
        keys, else the shared secret)."""
        self.url = url
        self.sender = sender
        self.secret = secret
        self.run = bytes(RUN_BYTES)  # the server's run id, learned from its first authenticated reply
        self._prefix, self._prefix_run = b"", b""  # seal_prefix(sender, run) and the run it was made for
        self._counter = time.time_ns()  # a clock, so a restarted client never reuses a counter
        self._ids = _Ids()
        self._sockets: list[_Requester] = []
        self._idle: list[_Requester] = [self._open()]
        self._free = trio.Semaphore(MAX_CLIENT_SOCKETS)

    def _open(self) -> _Requester:
        requester = _Requester(self.url)
        self._sockets.append(requester)
        return requester

    async def request(
        self, body: Message, *, timeout: float = 2.0, retries: int = 5, id: str | None = None
    ) -> Message:
        """Send `body` and return the reply body. On each `timeout` the same id is resent (after a
        backoff of 50 ms doubling up to 2 s), so the server runs it at most once. Raises RequestTimeout
        after `retries` resends, AuthError when the server refuses our credentials."""
        envelope = Envelope(id=id or self._ids(), sender=self.sender, body=body)
        payload = encode(envelope)
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
                await trio.sleep(backoff_delay(attempt + 1, 0.05, 2.0))
        raise RequestTimeout(
            f"{self.url}: no reply to {type(body).__name__} (id {envelope.id}) after {retries + 1} tries of {timeout}s"
        )

    async def _exchange(self, frame: bytes, timeout: float) -> bytes | None:
        try:
            self._free.acquire_nowait()  # no scheduling round trip when a socket is free (the usual case)
        except trio.WouldBlock:
            await self._free.acquire()
        requester = self._idle.pop() if self._idle else self._open()
        try:
            requester.post(frame)
            with trio.move_on_after(timeout):
                return await requester.reply()
            return None  # the next request on this socket abandons this one
        finally:
            self._idle.append(requester)
            self._free.release()

    def _seal(self, payload: bytes) -> bytes:
        """A fresh frame for each try: a resend is not a replay."""
        if not self.secret:
            return payload
        self._counter = max(self._counter + 1, time.time_ns())
        if self._prefix_run != self.run:
            self._prefix, self._prefix_run = seal_prefix(self.sender, self.run), self.run
        return seal_frame(payload, self.secret, self.sender, self.run, self._counter, prefix=self._prefix)

    def _own_key(self, _sender: str) -> bytes:
        return self.secret  # type: ignore[return-value]  # replies come sealed with our own key

    def _read_reply(self, reply: bytes, request_id: str) -> Message | None:
        """The reply body; None for a frame to ignore (a resend follows)."""
        try:
            if self.secret:
                head, payload = open_frame(reply, self._own_key)
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
        tries = 0
        with trio.move_on_after(timeout):
            while True:
                tries += 1
                try:  # each try waits longer, so a slow (remote) link still gets an answer in
                    await self.request(PING, timeout=backoff_delay(tries, 0.25, 2.0), retries=0)
                    return
                except RequestTimeout:
                    pass
        raise RequestTimeout(f"{self.url}: server not ready after {timeout}s")

    def close(self) -> None:
        for requester in self._sockets:
            requester.close()
        self._sockets.clear()
        self._idle.clear()

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
        self._ids = _Ids()

    async def publish(self, body: Message) -> None:
        envelope = Envelope(id=self._ids(), sender=self.sender, body=body)
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
        self._fd = self._sock.recv_fd
        self.last_heard = -math.inf  # trio time of the publisher's last frame, probes included (-inf: none yet)
        self._early: Envelope | None = None  # an event that arrived during wait_joined
        self._yielder = _Yielder()

    async def _next(self) -> Envelope:
        """The next valid envelope, probes included."""
        while True:
            frame = await _fast_recv(self._sock, self._fd, self._yielder)
            try:
                envelope = decode(unseal(frame, self.secret))
                self.last_heard = trio.current_time()
                return envelope
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
            if envelope.body != PROBE:
                self.stats["received"] += 1
                return envelope

    async def wait_joined(self, timeout: float = 10.0) -> None:
        """The ready barrier: returns once a frame from the publisher has arrived (its heartbeat must
        be running). Events published afterwards reach this subscriber unless it falls behind. Tell the
        publisher's side over the acked path if it must wait for you. Raises TimeoutError."""
        with trio.move_on_after(timeout):
            while self.last_heard == -math.inf:
                envelope = await self._next()
                if envelope.body != PROBE:  # an event came first: keep it for receive()
                    self.stats["received"] += 1
                    self._early = envelope
        if self.last_heard == -math.inf:
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
