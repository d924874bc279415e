"""The held-out pool of a task: every judging, confirmation and final judging draws the next seeds no
earlier draw took, so no held-out seed is ever judged twice (and agents, who only see aggregates of
judgings on seeds they never saw again, cannot fit a fixed held-out set by repeated promotions).

Which seeds those are is a secret of the fleet: every seed from `heldout_seeds.start` up to 2**32 is held
out, and the draws walk them in an order keyed by a random key made at the first draw and kept in the
task's `HeldoutRecord` on the blackboard (in the state dir, which no agent's jail holds). The package
source and the config say only where the space starts: an agent that runs the simulator in its worktree
on any seeds of its choosing hits a judged one by chance alone (about `used` in 4 billion per seed).
The key and the count of seeds used are all a resume needs; episodes and final records keep the seeds.
"""

from __future__ import annotations

import hashlib
import secrets

from bus.blackboard import Blackboard
from bus.messages import Purpose
from bus.records import HeldoutRecord, JobRecord
from enpire.config import Config, HeldoutSeeds

ROUNDS = 6  # Feistel rounds of the keyed permutation (4 already make a pseudo-random permutation)


class PoolExhausted(RuntimeError):
    pass


def _permute(key: bytes, x: int, half: int) -> int:
    """A keyed permutation of [0, 2**(2 * half)): a balanced Feistel network with keyed BLAKE2b rounds."""
    mask = (1 << half) - 1
    left, right = x >> half, x & mask
    for r in range(ROUNDS):
        digest = hashlib.blake2b(r.to_bytes(1, "big") + right.to_bytes(8, "big"), key=key, digest_size=8).digest()
        left, right = right, left ^ (int.from_bytes(digest, "big") & mask)
    return (left << half) | right


def seed_at(key: str, pool: HeldoutSeeds, index: int) -> int:
    """The `index`-th held-out seed of the order keyed by `key` (hex): distinct indices, distinct seeds."""
    space = pool.seeds()
    half = max(1, ((len(space) - 1).bit_length() + 1) // 2)
    x = _permute(bytes.fromhex(key), index, half)
    while x >= len(space):  # cycle-walking: a permutation of the larger domain restricted to the space
        x = _permute(bytes.fromhex(key), x, half)
    return space.start + x


def order(record: HeldoutRecord, pool: HeldoutSeeds, positions: range) -> list[int]:
    """The seeds at `positions` of the order of `record` (positions below `record.used` were drawn)."""
    return [seed_at(record.key, pool, i) for i in positions]


def draw(board: Blackboard, config: Config, task: str, k: int) -> tuple[list[int], HeldoutRecord]:
    """Blocking (a durable write): the next `k` never-drawn seeds of `task`'s held-out order."""
    pool = config.task(task).heldout_seeds
    with board.write() as w:
        record = w.get("heldout", task, HeldoutRecord) or HeldoutRecord(task)
        if record.used + k > pool.count:
            raise PoolExhausted(f"held-out pool of task {task!r} exhausted: {record.used} of {pool.count} seeds "
                                f"used, {k} more needed (raise tasks.{task}.heldout_seeds.count)")
        record.key = record.key or secrets.token_hex(32)
        seeds = order(record, pool, range(record.used, record.used + k))
        record.used, record.draws, record.total = record.used + k, record.draws + 1, pool.count
        record.low = running_low(config, record)
        w.put("heldout", task, record)
    return seeds, record


def unfinished_final_seeds(board: Blackboard, task: str, k: int) -> list[int] | None:
    """Blocking (a scan of the jobs): the `k` seeds of `task`'s final judging if one was cut short before
    its jobs finished, so that judging goes on where it was (same seeds and job ids, episodes kept)."""
    cut = [j for j in board.values("jobs", JobRecord) if j.purpose == Purpose.FINAL and j.task == task
           and len(j.seeds) == k and not (j.done or j.cancelled)]
    return max(cut, key=lambda j: j.submitted).seeds if cut else None


def running_low(config: Config, record: HeldoutRecord) -> bool:
    """Fewer seeds left than one more judging and one confirmation's minimum need."""
    left = config.task(record.task).heldout_seeds.count - record.used
    return left < config.scheduler.promote_seeds + config.fleet.min_heldout
