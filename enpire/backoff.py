"""The one backoff rule of the project: exponential from `initial`, capped, stretched to a server's retry-after."""

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
