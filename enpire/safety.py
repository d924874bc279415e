"""Cell-side action checks: pure functions, run on every action before it reaches the simulator/robot.

The action comes from untrusted policy code, so `check_action` accepts anything and never raises: junk
is a reason string (the episode ends as `safety_violation`), not an exception in the cell.
"""

from __future__ import annotations

import msgspec
import numpy as np


class ActionLimits(msgspec.Struct, frozen=True, kw_only=True):
    dim: int
    low: float | list[float]  # one bound for all components, or one per component
    high: float | list[float]
    max_delta: float | None = None  # largest change of any component between consecutive actions


def check_action(action: object, previous: np.ndarray | None, limits: ActionLimits) -> str | None:
    """None when `action` is safe to execute after `previous`; otherwise a `safety_violation: ...` reason."""
    try:
        return _check(action, previous, limits)
    except Exception as exc:  # noqa: BLE001 - numpy can raise on truly odd inputs; the answer is still "unsafe"
        return f"safety_violation: unreadable action ({type(exc).__name__})"


def _check(action: object, previous: np.ndarray | None, limits: ActionLimits) -> str | None:
    try:
        raw = np.asarray(action)
    except Exception as exc:  # noqa: BLE001 - any junk the policy sent
        return f"safety_violation: action is not an array ({type(exc).__name__})"
    if raw.dtype.kind not in "iuf":  # bools, strings, objects, complex: never a command
        return f"safety_violation: action dtype {raw.dtype} is not real-valued"
    if raw.shape != (limits.dim,):
        return f"safety_violation: action shape {raw.shape} != ({limits.dim},)"
    a = raw if raw.dtype == np.float64 else raw.astype(np.float64)
    low, high = np.asarray(limits.low, dtype=np.float64), np.asarray(limits.high, dtype=np.float64)
    prev = None
    if previous is not None and limits.max_delta is not None:
        prev = np.asarray(previous, dtype=np.float64)
        if prev.shape != a.shape:
            prev = None
    # Every step passes through here: one cheap test for the common case (all checks pass; NaN fails
    # every comparison; an infinite bound would let inf through, hence the finiteness test), and the
    # reason is worked out only for an action that fails.
    if np.isfinite(a).all() and (a >= low).all() and (a <= high).all() and (prev is None or abs(a - prev).max() <= limits.max_delta):
        return None
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        return f"safety_violation: action non-finite at index {int(bad[0])}"
    low, high = np.broadcast_to(low, a.shape), np.broadcast_to(high, a.shape)
    out = np.flatnonzero((a < low) | (a > high))
    if out.size:
        i = int(out[0])
        return (
            f"safety_violation: action out of bounds: a[{i}]={a[i]:.4g} not in [{low[i]:.4g}, {high[i]:.4g}]"
        )
    delta = float(abs(a - prev).max())
    return f"safety_violation: step change {delta:.4g} > {limits.max_delta:g}"


def named_bounds(names: list[str] | None, low: np.ndarray, high: np.ndarray, joints: dict[str, list[float]],
                 require_all: bool = False) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The driver's action bounds narrowed by the task's named limits (`[tasks.X.limits.joints]`).

    Returns (low, high, problem): problem names a limit for an action the robot does not have, or, when
    `require_all` (a real arm), an action without a finite limit."""
    low, high = np.array(low, dtype=np.float64), np.array(high, dtype=np.float64)
    names = list(names or [])
    index = {n: i for i, n in enumerate(names)}
    for name, (lo, hi) in joints.items():
        i = index.get(name)
        if i is None:
            return low, high, f"safety_violation: limit for unknown action {name!r} (robot actions: {', '.join(names) or 'unnamed'})"
        low[i], high[i] = max(low[i], lo), min(high[i], hi)
    if require_all:
        free = [names[i] if i < len(names) else str(i) for i in np.flatnonzero(~(np.isfinite(low) & np.isfinite(high)))]
        if free:
            return low, high, f"safety_violation: no limit for action {free[0]!r}: set it in the task's limits.joints"
    return low, high, None
