"""Measure the Push-T vision verifier against the state verifier on rendered final states.

    python bench/vision_verifier.py --n 2000 --frame-size 256

The states mimic the end of episodes, weighted towards the hard part: many blocks just short of or
just past the 0.95 coverage threshold, the pusher often resting against the block (where it can hide
uncovered goal), plus clear successes and clear failures. Prints the confusion matrix as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import shapely.geometry as sg

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from enpire.verify import (
    PUSHT_GOAL_POSE,
    pusht_coverage,
    tee_polygons,
    verify_pusht_frame,
    verify_pusht_state,
)

# (kind, share, coverage range): kind decides how the block pose is drawn.
MIX = (
    ("near_threshold", 0.45, (0.85, 0.99)),
    ("clear_success", 0.15, (0.97, 1.0)),
    ("near_failure", 0.20, (0.30, 0.85)),
    ("anywhere", 0.20, (0.0, 1.0)),
)


def _block_pose(rng: np.random.Generator, kind: str, lo: float, hi: float) -> list[float]:
    gx, gy, ga = PUSHT_GOAL_POSE
    # Offset scales per kind; rejection keeps the coverage inside the kind's range.
    scale = {"near_threshold": (6.0, 0.12), "clear_success": (1.5, 0.03), "near_failure": (30.0, 0.6)}
    while True:
        if kind == "anywhere":
            pose = [rng.uniform(110, 400), rng.uniform(110, 400), rng.uniform(-math.pi, math.pi)]
        else:
            dp, da = scale[kind]
            pose = [gx + rng.uniform(-dp, dp), gy + rng.uniform(-dp, dp), ga + rng.uniform(-da, da)]
        if lo <= pusht_coverage(pose, PUSHT_GOAL_POSE) <= hi:
            return pose


def _agent_pos(rng: np.random.Generator, block_pose: list[float], touching: bool) -> list[float]:
    tee = sg.MultiPolygon([sg.Polygon(p) for p in tee_polygons(block_pose)])
    while True:
        if touching:  # resting against the block, as after a final push
            angle, r = rng.uniform(0, 2 * math.pi), rng.uniform(20, 90)
            p = [block_pose[0] + r * math.cos(angle), block_pose[1] + r * math.sin(angle)]
            ok = 15.5 <= tee.distance(sg.Point(p)) <= 19.0
        else:
            p = [rng.uniform(25, 487), rng.uniform(25, 487)]
            ok = tee.distance(sg.Point(p)) > 16.0
        if ok and 25 <= p[0] <= 487 and 25 <= p[1] <= 487:
            return p


def sample_states(n: int, seed: int = 0) -> list[tuple[str, list[float], list[float]]]:
    """n (kind, block_pose, agent_pos) final states with the MIX above."""
    rng = np.random.default_rng(seed)
    kinds = [k for k, share, _ in MIX for _ in range(round(share * n))][:n]
    kinds += ["near_threshold"] * (n - len(kinds))
    ranges = {k: r for k, _, r in MIX}
    out = []
    for kind in kinds:
        block = _block_pose(rng, kind, *ranges[kind])
        out.append((kind, block, _agent_pos(rng, block, touching=bool(rng.random() < 0.5))))
    return out


def confusion(n: int, seed: int = 0, frame_size: int = 256) -> dict:
    """Render each state, judge it by state and by vision, and count the outcomes."""
    from hw.pusht import PushTDriver

    driver = PushTDriver(frame_size=frame_size)
    driver.reset(seed)
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    false_pos: list[dict] = []
    band = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}  # state coverage within 0.90..0.99
    err: list[float] = []
    t0 = time.perf_counter()
    for kind, block, agent in sample_states(n, seed):
        state = driver.set_state(block, agent)
        truth = verify_pusht_state(state)
        seen = verify_pusht_frame(driver.frame())
        key = ("t" if seen.success == truth.success else "f") + ("p" if seen.success else "n")
        counts[key] += 1
        if 0.90 <= truth.score <= 0.99:
            band[key] += 1
        if seen.score > 0:
            err.append(seen.score - truth.score)
        if key == "fp":
            false_pos.append({"kind": kind, "coverage": round(truth.score, 4), "vision": round(seen.score, 4)})
    failures = counts["fp"] + counts["tn"]
    successes = counts["tp"] + counts["fn"]
    e = np.abs(np.array(err)) if err else np.zeros(1)
    return {
        "n": n,
        "frame_size": frame_size,
        "counts": counts,
        "false_positive_rate": counts["fp"] / max(failures, 1),  # of state-failures judged success
        "false_negative_rate": counts["fn"] / max(successes, 1),  # of state-successes judged failure
        "state_successes": successes,
        "state_failures": failures,
        "near_threshold_0.90_0.99": band,
        "coverage_abs_error": {"median": float(np.median(e)), "p99": float(np.quantile(e, 0.99))},
        "false_positives": false_pos[:20],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--frame-size", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(confusion(args.n, args.seed, args.frame_size), indent=2))


if __name__ == "__main__":
    main()
