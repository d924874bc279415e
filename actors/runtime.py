"""The actor runtime: mailboxes, a start/ready/stop lifecycle, and supervision with restart.

An actor is a small object with `setup()` (load durable state), `main()` (its own proactive loop, if
any) and `handle(msg)` (answer one message). The supervisor owns the mailbox, so an actor that crashes
is rebuilt with the same address: messages sent meanwhile wait in the mailbox, and whoever was waiting
on the crashed handler gets a `Failure` reply instead of hanging.

Every actor runs in a nursery owned by the supervisor; stopping is cancellation of that nursery.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from bus.backoff import backoff_delay
from bus.messages import Ack, Failure, Message


class AskTimeout(TimeoutError):
    pass


@dataclass
class Ref:
    """The address of an actor: what other actors and the bus use to reach it."""

    name: str
    _send: trio.MemorySendChannel

    async def ask(self, msg: Message, timeout: float = 30.0) -> Message:
        reply_send, reply_recv = trio.open_memory_channel(1)
        await self._send.send((msg, reply_send))
        with trio.move_on_after(timeout) as scope:
            return await reply_recv.receive()
        assert scope.cancelled_caught
        raise AskTimeout(f"{self.name} did not answer {type(msg).__name__} within {timeout}s")

    async def tell(self, msg: Message) -> None:
        await self._send.send((msg, None))


class Actor:
    """Base class. Subclasses set `name` and override what they need."""

    name: str = "actor"
    # Handle messages one at a time (the actor model) unless the actor's handlers may wait (long-polls).
    concurrent_handlers: bool = False

    def __init__(self) -> None:
        self.log = structlog.get_logger().bind(actor=self.name)

    async def setup(self) -> None:
        """Load durable state; called at every (re)start before the actor is ready."""

    async def main(self) -> None:
        """The actor's own loop; the default just waits for messages."""
        await trio.sleep_forever()

    async def handle(self, msg: Message) -> Message | None:
        raise NotImplementedError(f"{self.name} does not handle {type(msg).__name__}")


@dataclass
class RestartPolicy:
    """Exponential backoff between restarts; a run that lasted `stable_s` resets the backoff."""

    initial_s: float = 0.1
    max_s: float = 5.0
    stable_s: float = 30.0
    max_restarts: float = math.inf
    # An actor whose setup fails this often in a row before it was ever ready fails its spawn: at start-up
    # that is damaged state (an unreadable record), not a passing fault, and retrying would hang the start.
    start_tries: int = 3

    def delay(self, failures: int) -> float:
        return backoff_delay(max(1, failures), self.initial_s, self.max_s)


class ActorStartError(RuntimeError):
    """An actor never became ready: its setup failed `RestartPolicy.start_tries` times in a row."""


@dataclass
class Supervised:
    """Bookkeeping of one supervised actor, readable by status and tests."""

    ref: Ref
    restarts: int = 0
    last_error: str = ""
    current: Actor | None = field(default=None, repr=False)


def _leaves(e: BaseException):
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


def _crash(e: BaseException) -> Exception | None:
    """The error that crashed an actor, or None when it was cancelled (the fleet is stopping) or
    interrupted (KeyboardInterrupt, SystemExit): those are not the actor's crash and pass through.

    Nurseries wrap errors in groups, and a crash that races a stop arrives beside a `Cancelled`: it
    still counts as a crash (the restart's sleep then ends the supervisor as the stop asks)."""
    leaves = list(_leaves(e))
    if any(not isinstance(x, Exception | trio.Cancelled) for x in leaves):
        return None
    return next((x for x in leaves if isinstance(x, Exception)), None)


async def _deliver(actor: Actor, msg: Message, reply: trio.MemorySendChannel | None) -> None:
    try:
        result = await actor.handle(msg)
    except trio.Cancelled:
        # A sibling handler (or main) crashed and the actor is restarting, or the fleet is stopping:
        # this caller is answered now instead of waiting for its own timeout.
        _answer(reply, Failure(error=f"{actor.name}: interrupted (the actor crashed or stopped)", retry=True))
        raise
    except BaseException as e:
        _answer(reply, Failure(error=f"{actor.name}: {type(e).__name__}: {e}", retry=True))
        raise
    _answer(reply, result if result is not None else Ack())


def _answer(reply: trio.MemorySendChannel | None, msg: Message) -> None:
    if reply is None:
        return
    try:
        reply.send_nowait(msg)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the asker already gave up (timeout) and dropped its end


async def _run_once(actor: Actor, inbox: trio.MemoryReceiveChannel, started: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        await actor.setup()
        started()
        nursery.start_soon(actor.main)
        async for msg, reply in inbox:
            if actor.concurrent_handlers:
                nursery.start_soon(_deliver, actor, msg, reply)
            else:
                await _deliver(actor, msg, reply)


async def supervise(
    factory: Callable[[], Actor],
    slot: Supervised,
    inbox: trio.MemoryReceiveChannel,
    policy: RestartPolicy,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an actor forever, rebuilding it after a crash; ready once its first setup() finished."""
    log = structlog.get_logger().bind(actor=slot.ref.name)
    ready = False
    failures = 0

    def started() -> None:
        nonlocal ready
        if not ready:
            ready = True
            task_status.started(slot.ref)
        log.info("actor_started", restarts=slot.restarts)

    while True:
        actor = factory()
        slot.current = actor
        began = trio.current_time()
        try:
            await _run_once(actor, inbox, started)
            log.info("actor_stopped")
            return
        except BaseException as e:  # a crash of one actor never takes the fleet down
            cause = _crash(e)
            if cause is None:
                raise
            failures = 1 if trio.current_time() - began > policy.stable_s else failures + 1
            slot.restarts += 1
            slot.last_error = f"{type(cause).__name__}: {cause}"
            if slot.restarts > policy.max_restarts:
                log.error("actor_gave_up", error=slot.last_error, restarts=slot.restarts)
                raise
            if not ready and slot.restarts >= policy.start_tries:
                log.error("actor_not_started", error=slot.last_error, tries=slot.restarts)
                raise ActorStartError(f"{slot.ref.name} could not start: {slot.last_error}") from None
            delay = policy.delay(failures)
            log.error("actor_crashed", error=slot.last_error, restarts=slot.restarts, backoff_s=delay)
            await trio.sleep(delay)


class ActorSystem:
    """Starts actors under supervision inside a nursery the caller owns."""

    def __init__(self, nursery: trio.Nursery, policy: RestartPolicy | None = None, mailbox_size: int = 1024):
        self._nursery = nursery
        self._policy = policy or RestartPolicy()
        self._mailbox_size = mailbox_size
        self.actors: dict[str, Supervised] = {}

    async def spawn(self, name: str, factory: Callable[[], Actor]) -> Ref:
        """Start an actor and return its address once it is ready (its setup() finished)."""
        if name in self.actors:
            raise ValueError(f"an actor named {name!r} already runs")
        send, recv = trio.open_memory_channel(self._mailbox_size)
        slot = Supervised(Ref(name, send))
        self.actors[name] = slot
        return await self._nursery.start(supervise, factory, slot, recv, self._policy)
