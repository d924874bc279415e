"""The held-out pool of a task: every judging, confirmation and final judging draws the next seeds no
earlier draw took, so no held-out seed is ever judged twice (and agents, who only see aggregates of
judgings on seeds they never saw again, cannot fit a fixed held-out set by repeated promotions)."""

from __future__ import annotations

from bus.blackboard import Blackboard
from bus.records import HeldoutRecord
from enpire.config import Config


class PoolExhausted(RuntimeError):
    pass


def draw(board: Blackboard, config: Config, task: str, k: int) -> tuple[list[int], HeldoutRecord]:
    """Blocking (a durable write): the next `k` never-drawn seeds of `task`'s heldout_seeds."""
    pool = config.task(task).heldout_seeds
    with board.write() as w:
        record = w.get("heldout", task, HeldoutRecord) or HeldoutRecord(task)
        if record.used + k > pool.count:
            raise PoolExhausted(f"held-out pool of task {task!r} exhausted: {record.used} of {pool.count} seeds "
                                f"used, {k} more needed (raise tasks.{task}.heldout_seeds.count)")
        seeds = list(range(pool.start + record.used, pool.start + record.used + k))
        record.used, record.draws, record.total = record.used + k, record.draws + 1, pool.count
        record.low = running_low(config, record)
        w.put("heldout", task, record)
    return seeds, record


def running_low(config: Config, record: HeldoutRecord) -> bool:
    """Fewer seeds left than one more judging and one confirmation's minimum need."""
    left = config.task(record.task).heldout_seeds.count - record.used
    return left < config.scheduler.promote_seeds + config.fleet.min_heldout
