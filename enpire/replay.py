"""`python -m enpire.replay`: watch recorded episodes, failed ones first, as mp4 or GIF.

Frames come from the episode file when the cell recorded them (pixel observations, a robot's camera);
otherwise the episode is replayed deterministically on its simulator: reset with the episode's seed,
then the recorded actions, one rendered frame per step. The replay is checked against the recorded
observations (the largest difference is printed), so a video never silently shows another episode.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bus.blackboard import Blackboard, BlackboardError
from bus.records import CellRecord, EpisodeRecord
from enpire import command
from enpire.episodes import EpisodeFileError, read_trajectory

DRIFT_TOLERANCE = 1e-2  # largest |replayed - recorded| observation component still called the same episode


class ReplayError(ValueError):
    """One line: which episode and why it cannot be shown."""


@dataclass
class Rendered:
    frames: np.ndarray  # (T+1, H, W, 3) uint8
    source: str  # "recorded" or "replay"
    max_drift: float | None  # replay only: largest difference from the recorded observations
    final_state: dict | None  # replay only: the simulator's trusted state after the last action


def open_board(state_dir: Path) -> Blackboard:
    path = state_dir / "blackboard.lmdb"
    if not path.exists():
        raise ReplayError(f"{state_dir}: no blackboard.lmdb (not a fleet state directory)")
    return Blackboard(path, readonly=True)


def failed_first(records: list[EpisodeRecord]) -> list[EpisodeRecord]:
    """Failures first (most recent first), then successes; only episodes with a recorded trajectory."""
    kept = [r for r in records if r.trajectory_file]
    return sorted(kept, key=lambda r: (r.verdict.success, -r.finished))


def driver_of(board: Blackboard, record: EpisodeRecord) -> str:
    cell = board.get("cells", record.cell_id, CellRecord)
    if cell is None:
        raise ReplayError(f"episode {record.episode_id}: cell {record.cell_id!r} unknown, so is its driver")
    return cell.driver


def replay_on_simulator(driver_name: str, seed: int, actions: np.ndarray, frame_size: int = 256,
                        driver_options: dict | None = None):
    """Frames (T+1) and observations (T+1) of `actions` replayed from `seed`, and the final trusted state."""
    from hw import make_driver

    driver = make_driver(driver_name, **(driver_options or {}))
    if driver_name == "pusht":
        driver.frame_size = frame_size
    try:
        driver.connect()
        observations = [driver.reset(int(seed))]
        frames = [driver.frame()]
        if frames[0] is None:
            raise ReplayError(f"driver {driver_name!r} renders no frames; only recorded frames can be shown")
        for a in actions:
            observations.append(driver.act(np.asarray(a, dtype=np.float64)))
            frames.append(driver.frame())
        return np.stack(frames), np.asarray(observations, dtype=np.float64), driver.trusted_state()
    finally:
        driver.disconnect()


def render(state_dir: Path, board: Blackboard, record: EpisodeRecord, frame_size: int = 256,
           driver_options: dict | None = None) -> Rendered:
    try:
        traj = read_trajectory(state_dir / record.trajectory_file)
    except EpisodeFileError as e:
        raise ReplayError(f"episode {record.episode_id}: {e}") from None
    if "frames" in traj:
        return Rendered(traj["frames"], "recorded", None, None)
    frames, observations, final = replay_on_simulator(driver_of(board, record), record.seed, traj["actions"],
                                                      frame_size, driver_options)
    recorded = traj["observations"].astype(np.float64)
    drift = float(np.abs(observations[: len(recorded)] - recorded).max()) if recorded.size else 0.0
    return Rendered(frames, "replay", drift, final)


def write_video(frames: np.ndarray, path: Path, fps: float = 10.0) -> Path:
    """mp4 (OpenCV, mp4v) or GIF (Pillow, lossless for the few colours of a rendered scene) by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    elif path.suffix == ".mp4":
        import cv2

        h, w = frames.shape[1:3]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if not writer.isOpened():
            raise ReplayError(f"{path}: OpenCV cannot write mp4 here")
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
    else:
        raise ReplayError(f"{path}: unknown video format {path.suffix!r} (use .mp4 or .gif)")
    return path


def main(argv: list[str] | None = None, prog: str = "python -m enpire.replay") -> int:
    p = command.Parser(prog=prog, description="render recorded episodes (failed ones first) as mp4 or GIF")
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    p.add_argument("--episode", action="append", default=[], help="episode id (repeatable); default: the list order")
    p.add_argument("-n", type=int, default=1, help="how many episodes from the failed-first list (default 1)")
    p.add_argument("--out", type=Path, default=None, help="folder for the videos (default STATE_DIR/replays)")
    p.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--frame-size", type=int, default=256, help="pixels per side when replaying a simulator")
    p.add_argument("--list", action="store_true", help="list episodes failed-first and exit")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"-n {args.n}: at least 1 episode")
    if not 0 < args.fps <= 1000:  # also refuses nan
        p.error(f"--fps {args.fps}: frames per second, above 0 and at most 1000")
    if not 16 <= args.frame_size <= 4096:
        p.error(f"--frame-size {args.frame_size}: pixels per side, 16 to 4096")
    try:
        board = open_board(args.state_dir)
    except (ReplayError, BlackboardError) as e:
        print(f"enpire.replay: {e}", file=sys.stderr)
        return 2
    try:
        records = failed_first(board.values("episodes", EpisodeRecord))
        if args.list:
            for r in records:
                print(f"{r.episode_id}\t{'success' if r.verdict.success else 'failure'}\t{r.verdict.reason}\t"
                      f"seed {r.seed}\t{r.cell_id}\t{r.policy.ref}")
            return 0
        if args.episode:
            by_id = {r.episode_id: r for r in records}
            missing = [e for e in args.episode if e not in by_id]
            if missing:
                print(f"enpire.replay: episode {missing[0]!r} has no recorded trajectory in {args.state_dir}",
                      file=sys.stderr)
                return 2
            chosen = [by_id[e] for e in args.episode]
        else:
            chosen = records[: args.n]
        if not chosen:
            print(f"enpire.replay: {args.state_dir}: no recorded episodes", file=sys.stderr)
            return 2
        out = args.out or args.state_dir / "replays"
        for r in chosen:
            shown = render(args.state_dir, board, r, args.frame_size)
            path = write_video(shown.frames, out / f"{r.episode_id.replace(':', '_')}.{args.format}", args.fps)
            print(json.dumps({"episode": r.episode_id, "success": r.verdict.success, "reason": r.verdict.reason,
                              "file": str(path), "frames": len(shown.frames), "source": shown.source,
                              "max_drift": shown.max_drift}))
            if shown.max_drift is not None and shown.max_drift > DRIFT_TOLERANCE:
                print(f"enpire.replay: episode {r.episode_id}: replay drifted {shown.max_drift:.3g} from the "
                      "recorded observations; the video may not show what happened", file=sys.stderr)
    except (ReplayError, BlackboardError) as e:  # a damaged record too
        print(f"enpire.replay: {e}", file=sys.stderr)
        return 2
    finally:
        board.close()
    return 0


if __name__ == "__main__":
    sys.exit(command.run(main))
