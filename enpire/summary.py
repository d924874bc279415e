"""A run's figures as a person reads them: one summary of the champion, the final judging, the held-out
pools and the cells' utilization, shared by report.json (`enpire fleet`), `enpire status` and
`enpire report`, so the three never disagree on what a figure means. Pure functions of records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bus.records import Champion, FinalRecord, HeldoutRecord
from enpire.metrics import Utilization, mean_robot_utilization, wilson_interval


def rate(successes: int, n: int) -> dict:
    """A success count with its rate and Wilson 95% interval."""
    lo, hi = wilson_interval(successes, n)
    return {"successes": successes, "n": n, "rate": round(successes / n, 4) if n else 0.0,
            "wilson95": [round(lo, 4), round(hi, 4)]}


def champion(c: Champion | None) -> dict:
    """The champion and its two held-out tallies: the confirmation (seeds never used to choose it, the
    figure to report) and the judging it won at promotion."""
    if c is None:
        return {"policy": None}
    return {"policy": c.policy.ref, "commit": c.policy.commit, "params": c.policy.params, "agent": c.agent,
            "heldout_confirm": rate(c.successes, c.n), "heldout_judged": rate(c.judged_successes, c.judged_n),
            "decision": c.decision}


def champion_line(task: str, c: dict) -> str:
    if not c.get("policy"):
        return f"champion[{task}]: none yet"
    conf, judged = c["heldout_confirm"], c["heldout_judged"]
    lo, hi = conf["wilson95"]
    return (f"champion[{task}]: {c['policy']} by {c['agent']}; held-out success {conf['successes']}/{conf['n']} = "
            f"{conf['rate']:.1%}, Wilson 95% [{lo:.3f}, {hi:.3f}] (seeds never used to choose it); judged "
            f"{judged['successes']}/{judged['n']} at promotion")


def final(f: FinalRecord | None) -> dict | None:
    """The paired final judging: the starting policy and the champion on the same fresh held-out seeds."""
    if f is None:
        return None
    return {"task": f.task, "seeds": {"first": f.seeds[0], "count": len(f.seeds)} if f.seeds else {},
            "start": {"policy": f.start.ref, "commit": f.start.commit, "params": f.start.params,
                      **rate(f.start_successes, f.start_n)},
            "champion": ({"policy": f.champion.ref, "commit": f.champion.commit, "params": f.champion.params,
                          **rate(f.champion_successes, f.champion_n)} if f.champion else None)}


def heldout_pools(records: Iterable[HeldoutRecord]) -> dict:
    """How much of each task's held-out pool is spent (every seed is judged once at most)."""
    return {h.task: {"used": h.used, "total": h.total, "draws": h.draws, "low": h.low} for h in records}


def heldout_line(task: str, h: dict) -> str:
    warn = "  WARNING: runs low (raise heldout_seeds.count)" if h["low"] else ""
    return f"held-out pool[{task}]: {h['used']:,} of {h['total']:,} seeds used in {h['draws']} draws{warn}"


def cells(per_cell: Mapping[str, Utilization]) -> dict:
    """MRU of the fleet (the mean over cells) and each cell's share of time running, agents' share of it
    and its time per state."""
    return {"mru": round(mean_robot_utilization(per_cell), 4), "cells": {
        cid: {"mru": round(u.mru, 4), "agent_share": round(u.agent_share, 4), "wall_s": round(u.wall_s, 1),
              "by_state_s": {k: round(v, 1) for k, v in u.by_state.items()}}
        for cid, u in sorted(per_cell.items())}}


def cell_line(cell_id: str, c: dict) -> str:
    return f"{cell_id}: MRU {c['mru']:.1%}, agent share {c['agent_share']:.1%}"
