"""Verdicts signed by the verifier and bound to a lease: a cell relays them, it cannot make them up.

The verifier signs (lease id, episode id, attempt number, success, score, verifier name) with a key only
it and the scheduler hold (random per daemon run). A cell may turn a signed verdict into a failure (a
policy fault ends the episode whatever the scene looks like: it keeps the signed score and changes the
reason), or report a failure with score 0 without asking the verifier (a policy that did not load); it
can never report a success, or a score, that the verifier did not sign for that lease. The one
exception is a person's verdict (verifier "person") from a cell registered as a real robot: the
person at the robot judges the scene, and nothing can sign for them.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from bus.messages import EpisodeReport, Verdict

RESET_ATTEMPT = -1  # the attempt number of the at-reset verdict (flagged reports)


def sign(key: bytes, lease_id: str, episode_id: str, attempt: int, verdict: Verdict) -> bytes:
    body = msgspec.msgpack.encode([lease_id, episode_id, attempt, verdict.success, verdict.score, verdict.verifier])
    return hmac.new(key, body, hashlib.sha256).digest()


def _valid(key: bytes, sig: bytes, lease_id: str, episode_id: str, attempt: int, verdict: Verdict,
           person_ok: bool = False) -> bool:
    if person_ok and verdict.verifier == "person":
        return True
    if not sig:
        return not verdict.success and verdict.score == 0.0  # claims nothing
    if hmac.compare_digest(sig, sign(key, lease_id, episode_id, attempt, verdict)):
        return True
    # A signed success the cell downgraded to a failure (a policy fault in that attempt).
    return not verdict.success and hmac.compare_digest(
        sig, sign(key, lease_id, episode_id, attempt, msgspec.structs.replace(verdict, success=True)))


def check_report(key: bytes, report: EpisodeReport, real: bool = False) -> str | None:
    """None if every verdict in `report` is one the verifier signed for its lease (or, from a real
    robot's cell, a person's); else why not."""
    for i, attempt in enumerate(report.attempts):
        if not _valid(key, attempt.signature, report.lease_id, report.episode_id, i, attempt.verdict, real):
            return f"attempt {i}: verdict not signed by the verifier for lease {report.lease_id!r}"
    if report.attempts:
        first = report.attempts[0].verdict
        if (report.verdict.success, report.verdict.score) != (first.success, first.score):
            return "verdict differs from the first attempt's"
    elif not _valid(key, report.signature, report.lease_id, report.episode_id, RESET_ATTEMPT, report.verdict, real):
        return f"verdict without attempts not signed by the verifier for lease {report.lease_id!r}"
    return None


def refuse_report(report: EpisodeReport, lease: tuple[str, str] | None, key: bytes | None,
                  real: bool = False) -> str | None:
    """Why the scheduler must not record `report`, or None. `lease`: (holder cell, episode id) of the
    lease the report names (outstanding, or lapsed while its cell was late), None when there is none."""
    if lease is None:
        return f"no such lease {report.lease_id[:40]!r}"
    holder, episode_id = lease
    if holder != report.cell_id:
        return f"lease {report.lease_id!r} is held by {holder!r}, not {report.cell_id[:40]!r}"
    if episode_id != report.episode_id:
        return f"lease {report.lease_id!r} is for another episode"
    return check_report(key, report, real) if key is not None else None
