"""Paced turns on a pooled fleet: an agent asks its model again only while the fleet's queue, plus the
episodes teammates about to ask hold, is short (`pace_per_cell` per cell). Robots never wait for a model,
and an idea never only queues behind the team's.

Room goes first come, first served. An agent whose results wake it the moment room appears would
otherwise win every race against a teammate that has nothing running (one back from a pause, say), which
then never thinks again. A teammate waiting for room marks it on the blackboard (table "waiting"); an agent
that came later lets it go first. A mark lapses unless renewed, so one that stopped waiting (paused,
crashed) holds no one up for longer than `MARK_S`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from bus.messages import RoomReleased
from bus.records import QueueRecord, RoomWait, TurnHold

MARK_S = 10.0  # a waiting mark's life; renewed at half of it while the agent still waits
HOLD_S = 120.0  # how long an admitted turn holds its expected episodes, at most (the model's answer ends it)


class Pacer:
    """One agent's side of the pacing: `admit` before a turn, `hold` episodes the queue does not show yet.
    `lapse` is when the next teammate's hold or mark runs out (room may appear then, with no event)."""

    def __init__(self, pace_per_cell: float, clock: Callable[[], float] = time.time):
        self.pace_per_cell, self.clock = pace_per_cell, clock
        self.lapse = math.inf
        self.since = 0.0  # when this agent began to wait for room (0: it does not wait)
        self._marked_until = 0.0

    def admit(self, tools, expected: int) -> bool:
        """Room for a turn, and no teammate waiting longer: hold our `expected` episodes and go. Checked
        read-only first; decided in one write transaction. Otherwise mark that we wait, and say no."""
        me, now = tools.agent, self.clock()
        self.since = self.since or now

        def room(r) -> bool:
            queue = tools.queue_depth() or r.get("meta", "queue", QueueRecord)
            if queue is None or queue.cells == 0:
                return True  # no figures from a scheduler yet: nothing to pace by
            holds = [h for agent, h in r.items("turns", TurnHold) if agent != me and h.until > now]
            waits = {agent: w for agent, w in r.items("waiting", RoomWait) if agent != me and w.until > now}
            self.lapse = min([h.until for h in holds] + [w.until for w in waits.values()], default=math.inf)
            if any((w.since, agent) < (self.since, me) for agent, w in waits.items()):
                return False  # a teammate has waited longer: it goes first
            return queue.waiting + sum(h.episodes for h in holds) < self.pace_per_cell * queue.cells

        with tools.board.read() as r:
            ok = room(r)
        if ok:
            with tools.board.write() as w:
                ok = room(w)
                if ok:
                    w.put("turns", me, TurnHold(expected, now + HOLD_S))
                    w.delete("waiting", me)
        if ok:
            self.since = self._marked_until = 0.0
        elif self._marked_until - now < MARK_S / 2:  # a write only when the mark is new or half spent
            self._marked_until = now + MARK_S
            tools.board.put("waiting", me, RoomWait(self.since, self._marked_until))
        return ok

    def hold(self, tools, episodes: int, seconds: float) -> None:
        """Count `episodes` as queued for teammates for `seconds` (0 episodes: hold nothing, e.g. paused).
        It only ever shortens the hold `admit` took, so teammates waiting for room are told to look again:
        they would otherwise sleep until the old hold lapsed, with no event to wake them."""
        now = self.clock()
        tools.board.put("turns", tools.agent, TurnHold(episodes, now + seconds))
        if tools.events is not None:
            tools.events.publish(RoomReleased(agent=tools.agent, t=now))
