"""Paced turns on a pooled fleet: an agent asks its model again only while the fleet's queue, plus the
episodes teammates about to ask hold, is short (`pace_per_cell` per cell). Robots never wait for a model,
and an idea never only queues behind the team's.

Room goes first come, first served. An agent whose results wake it the moment room appears would
otherwise win every race against a teammate that has nothing running (one back from a pause, say), which
then never thinks again. A teammate waiting for room marks it in the team's `Room`; an agent that came
later lets it go first. A mark lapses unless renewed, so one that stopped waiting (paused, crashed) holds
no one up for longer than `MARK_S`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bus.messages import RoomReleased
from bus.records import QueueRecord

MARK_S = 10.0  # a waiting mark's life; renewed at every look while the agent still waits
HOLD_S = 120.0  # how long an admitted turn holds its expected episodes, at most (the model's answer ends it)


@dataclass
class Hold:
    """An agent about to ask for `episodes`: teammates count them as queued until `until`."""

    episodes: int
    until: float


@dataclass
class Wait:
    """An agent waiting for room since `since`: teammates that came later let it go first (until `until`)."""

    since: float
    until: float


@dataclass
class Room:
    """The team's holds and waiting marks, shared by the agents of one daemon. In memory: each lives for
    seconds, so none needs to outlive the process (after a restart every agent starts afresh), and taking
    room is one step of the event loop, never a read or write of the blackboard."""

    holds: dict[str, Hold] = field(default_factory=dict)
    waits: dict[str, Wait] = field(default_factory=dict)


class Pacer:
    """One agent's side of the pacing: `admit` before a turn, `hold` episodes the queue does not show yet.
    `lapse` is when the next teammate's hold or mark runs out (room may appear then, with no event)."""

    def __init__(self, pace_per_cell: float, clock: Callable[[], float] = time.time):
        self.pace_per_cell, self.clock = pace_per_cell, clock
        self.lapse = math.inf
        self.since = 0.0  # when this agent began to wait for room (0: it does not wait)

    def admit(self, tools, expected: int) -> bool:
        """Room for a turn, and no teammate waiting longer: hold our `expected` episodes and go. Otherwise
        mark that we wait, and say no."""
        me, now, room = tools.agent, self.clock(), tools.room
        self.since = self.since or now
        queue = tools.queue_depth() or tools.board.get("meta", "queue", QueueRecord)  # the board: before any event
        holds = [h for agent, h in room.holds.items() if agent != me and h.until > now]
        waits = {agent: w for agent, w in room.waits.items() if agent != me and w.until > now}
        self.lapse = min([h.until for h in holds] + [w.until for w in waits.values()], default=math.inf)
        if queue is None or queue.cells == 0:
            ok = True  # no figures from a scheduler yet: nothing to pace by
        elif any((w.since, agent) < (self.since, me) for agent, w in waits.items()):
            ok = False  # a teammate has waited longer: it goes first
        else:
            ok = queue.waiting + sum(h.episodes for h in holds) < self.pace_per_cell * queue.cells
        if ok:
            room.holds[me] = Hold(expected, now + HOLD_S)
            room.waits.pop(me, None)
            self.since = 0.0
        else:
            room.waits[me] = Wait(self.since, now + MARK_S)
        return ok

    def hold(self, tools, episodes: int, seconds: float) -> None:
        """Count `episodes` as queued for teammates for `seconds` (0 episodes: hold nothing, e.g. paused).
        It only ever shortens the hold `admit` took, so teammates waiting for room are told to look again:
        they would otherwise sleep until the old hold lapsed, with no event to wake them."""
        now = self.clock()
        tools.room.holds[tools.agent] = Hold(episodes, now + seconds)
        if tools.events is not None:
            tools.events.publish(RoomReleased(agent=tools.agent, t=now))
