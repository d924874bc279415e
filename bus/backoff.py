"""The one backoff rule of the project: exponential from `initial`, capped, stretched to a server's retry-after.

Every retry loop uses it: the bus's resends and ready barrier, the actor runtime's restarts, the fleet's
restarts of local cell processes, a remote trainer refused by the fleet, a cell refused a lease, the judge
resubmitting a job, model calls and restarts of CLI coding agents. It lives with the bus (the bottom
layer) so that the transport can use it too."""

from __future__ import annotations


def backoff_delay(failures: int, initial: float, maximum: float, *, retry_after: float | None = None,
                  retry_after_max: float = float("inf")) -> float:
    """Seconds to wait after the `failures`-th consecutive failure (1 = the first): initial * 2^(failures-1)
    capped at `maximum`, but never shorter than what the server asked for (itself capped at `retry_after_max`)."""
    if failures < 1:
        return 0.0
    delay = min(maximum, initial * 2 ** min(failures - 1, 62))
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, retry_after_max))
    return delay
