"""`python -m enpire.export`: a fleet run's episodes as a LeRobotDataset (v3 layout), written by LeRobot.

Each episode becomes one dataset episode of T frames (observation t, action t), its camera frames as video (`observation.image`: recorded by the cell, or rendered by a
deterministic replay on the simulator when the cell recorded none). Seed, verdict, policy, cell, task
and episode id go to `meta/enpire_episodes.jsonl`, one line per dataset episode index. (Per-step reward
and done stay out: LeRobot 0.4.4 fails to encode (1,)-shaped features with numpy 2.4; a real robot has no
reward and the episode's end is in the dataset's episode index anyway.) Flagged episodes
(success at reset, e-stop, dry run, ...) are left out unless asked for.

Needs LeRobot (README: LeRobot robots); without it this stops with one line saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bus.records import EpisodeRecord
from enpire import command
from enpire.episodes import EpisodeFileError, read_trajectory
from enpire.replay import ReplayError, driver_of, open_board, replay_on_simulator

PUSHT_NAMES = ["agent_x", "agent_y", "block_x", "block_y", "block_theta"]
IMAGE = "observation.image"


class ExportError(ValueError):
    pass


def _episodes(board, task: str | None, include_flagged: bool, kinds: set[str] | None) -> list[EpisodeRecord]:
    records = [r for r in board.values("episodes", EpisodeRecord) if r.trajectory_file]
    if task is not None:
        records = [r for r in records if r.task == task]
    if not include_flagged:
        records = [r for r in records if not r.flagged]
    if kinds:
        records = [r for r in records if r.kind in kinds]
    return sorted(records, key=lambda r: (r.finished, r.episode_id))


def _frames(state_dir: Path, board, record: EpisodeRecord, traj: dict, frame_size: int) -> np.ndarray | None:
    if "frames" in traj:
        return traj["frames"]
    try:
        frames, observations, _ = replay_on_simulator(driver_of(board, record), record.seed, traj["actions"], frame_size)
    except ReplayError:
        return None  # a driver that renders nothing: the episode is exported without video
    drift = float(np.abs(observations[: len(traj["observations"])] - traj["observations"]).max())
    if drift > 1e-2:
        raise ExportError(f"episode {record.episode_id}: replay drifted {drift:.3g} from the recorded observations")
    return frames


def export(state_dir: Path, out: Path, *, task: str | None = None, repo_id: str = "local/enpire", fps: int = 10,
           frame_size: int = 96, include_flagged: bool = False, kinds: set[str] | None = None,
           limit: int | None = None, video: bool = True) -> dict:
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError as e:
        raise ExportError(f"export needs LeRobot ({e}); see README: LeRobot robots") from None
    if out.exists():
        raise ExportError(f"{out}: exists; LeRobot writes a new dataset folder")
    board = open_board(state_dir)
    try:
        records = _episodes(board, task, include_flagged, kinds)[:limit]
        if not records:
            raise ExportError(f"{state_dir}: no recorded episodes to export" + (f" for task {task!r}" if task else ""))
        tasks = {r.task for r in records}
        if len(tasks) > 1:
            raise ExportError(f"{state_dir}: episodes of several tasks ({', '.join(sorted(tasks))}); pick one with --task")
        dataset = None
        lines, frames_total = [], 0
        for record in records:
            try:
                traj = read_trajectory(state_dir / record.trajectory_file)
            except EpisodeFileError as e:
                raise ExportError(str(e)) from None
            steps = len(traj["actions"])
            if steps == 0:
                continue
            frames = _frames(state_dir, board, record, traj, frame_size) if video else None
            if dataset is None:
                dataset, shapes = _create(LeRobotDataset, out, repo_id, fps, traj, frames, driver_of(board, record))
            elif (frames is None) != (shapes.get(IMAGE) is None):
                raise ExportError(f"episode {record.episode_id}: has {'no ' if frames is None else ''}camera frames, "
                                  "unlike the episodes before it")
            if frames is not None and frames.shape[1:] != shapes[IMAGE]:
                import cv2

                h, w = shapes[IMAGE][:2]
                frames = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
            for t in range(steps):
                frame = {
                    "observation.state": traj["observations"][t].astype(np.float32),
                    "action": traj["actions"][t].astype(np.float32),
                    "task": record.task,
                }
                if frames is not None:
                    frame[IMAGE] = frames[t]
                dataset.add_frame(frame)
            dataset.save_episode()
            frames_total += steps
            lines.append({
                "episode_index": len(lines), "episode_id": record.episode_id, "task": record.task, "seed": record.seed,
                "success": record.verdict.success, "score": record.verdict.score, "reason": record.verdict.reason,
                "verifier": record.verdict.verifier, "policy": record.policy.ref, "commit": record.policy.commit,
                "params": record.policy.params, "artifact": record.policy.artifact, "cell": record.cell_id,
                "kind": record.kind, "flagged": record.flagged, "frames": steps,
                "frames_source": ("recorded" if "frames" in traj else "replay") if frames is not None else "none",
            })
        if dataset is None:
            raise ExportError(f"{state_dir}: every selected episode is empty")
        dataset.finalize()
    finally:
        board.close()
    with open(out / "meta" / "enpire_episodes.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return {"out": str(out), "repo_id": repo_id, "episodes": len(lines), "frames": frames_total, "fps": fps,
            "video": IMAGE if shapes.get(IMAGE) else None}


def _create(LeRobotDataset, out: Path, repo_id: str, fps: int, traj: dict, frames, driver: str):
    obs_dim, act_dim = traj["observations"].shape[1], traj["actions"].shape[1]
    names = PUSHT_NAMES if driver == "pusht" and obs_dim == len(PUSHT_NAMES) else None
    features = {
        "observation.state": {"dtype": "float32", "shape": (obs_dim,), "names": names},
        "action": {"dtype": "float32", "shape": (act_dim,), "names": None},
    }
    shapes = {IMAGE: None}
    if frames is not None:
        shapes[IMAGE] = tuple(frames.shape[1:])
        features[IMAGE] = {"dtype": "video", "shape": shapes[IMAGE], "names": ["height", "width", "channels"]}
    dataset = LeRobotDataset.create(repo_id, fps=fps, features=features, root=out, robot_type=driver,
                                    use_videos=frames is not None)
    return dataset, shapes


def main(argv: list[str] | None = None, prog: str = "python -m enpire.export") -> int:
    p = command.Parser(prog=prog, description="write a fleet run's episodes as a LeRobotDataset (v3)")
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    p.add_argument("--task", help="which task's episodes (default: the only one)")
    p.add_argument("--repo-id", default="local/enpire")
    p.add_argument("--fps", type=int, default=10, help="control rate the episodes ran at")
    p.add_argument("--frame-size", type=int, default=96, help="pixels per side of frames rendered by replay")
    p.add_argument("--kind", action="append", choices=("agent", "heldout", "background"), help="only these kinds")
    p.add_argument("--limit", type=int, help="at most this many episodes (oldest first)")
    p.add_argument("--include-flagged", action="store_true", help="also episodes flagged (e-stop, success at reset...)")
    p.add_argument("--no-video", action="store_true", help="observations and actions only")
    args = p.parse_args(argv)
    try:
        summary = export(args.state_dir, args.out, task=args.task, repo_id=args.repo_id, fps=args.fps,
                         frame_size=args.frame_size, include_flagged=args.include_flagged,
                         kinds=set(args.kind) if args.kind else None, limit=args.limit, video=not args.no_video)
    except (ExportError, ReplayError) as e:
        print(f"enpire.export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(command.run(main))
