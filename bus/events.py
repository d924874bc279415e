"""Events: what changed, told to whoever listens, so actors never poll the blackboard.

The actor that owns a fact publishes its changes (the lease queue its depth and cells' states, the judge
the champion and the held-out pool, agents their findings and tokens, the fleet its progress); agents,
the summarizer and the fleet loop subscribe in the daemon's process, and `relay` puts them on the bus's
pub/sub for other processes (`enpire status --follow`). The blackboard stays the durable record: an
event says "this changed", and a subscriber that starts late reads the last value of each type from
`latest` (or, in another process, from the blackboard).

Delivery to a subscriber is bounded: a subscriber that falls `buffer` events behind loses the oldest
ones and `dropped` says how many (telemetry semantics; anything that must not be lost travels on an
acked request instead).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import trio

from bus.messages import Message
from bus.transport import Publisher, ipc_url


class Subscription:
    """Events of the chosen types, in publication order; iterate with `async for`."""

    def __init__(self, hub: EventHub, types: tuple[type[Message], ...], buffer: int):
        self._hub, self.types, self._buffer = hub, types, buffer
        self._queue: deque[Message] = deque()
        self._ready = trio.Event()
        self.dropped = 0

    def _offer(self, event: Message) -> None:
        if len(self._queue) >= self._buffer:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    def pending(self) -> int:
        return len(self._queue)

    async def receive(self) -> Message:
        while not self._queue:
            self._ready = trio.Event()
            await self._ready.wait()
        return self._queue.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        return await self.receive()

    def close(self) -> None:
        self._hub._subs.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Fan-out of events to subscribers in this process; publishing never blocks the publisher."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._latest: dict[type[Message], Message] = {}
        self.published = 0

    def publish(self, event: Message) -> None:
        self._latest[type(event)] = event
        self.published += 1
        for sub in list(self._subs):
            if isinstance(event, sub.types):
                sub._offer(event)

    def subscribe(self, *types: type[Message], buffer: int = 1024) -> Subscription:
        sub = Subscription(self, tuple(types), buffer)
        self._subs.add(sub)
        return sub

    def latest(self, type_: type[Message]) -> Message | None:
        return self._latest.get(type_)

    def latest_of(self, types: Iterable[type[Message]]) -> list[Message]:
        return [e for t in types if (e := self._latest.get(t)) is not None]


def events_url(state_dir) -> str:
    """Where a daemon publishes its events for other processes: a socket in its state dir."""
    return ipc_url(state_dir, "events")


async def relay(hub: EventHub, publisher: Publisher, types: tuple[type[Message], ...]) -> None:
    """Publish every event of `types` on the bus's pub/sub, until cancelled: telemetry, so a subscriber
    that falls behind loses events (nng drops them), and the publisher never waits for one."""
    with hub.subscribe(*types) as events:
        async for event in events:
            await publisher.publish(event)
