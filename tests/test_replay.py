"""`replay` of a failed Push-T episode from a fleet run: deterministic replay, last frame = recorded end state."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import trio
from PIL import Image

from bus.messages import EvalRequest, PolicySpec
from bus.records import EpisodeRecord
from enpire import config as cfg
from enpire import replay
from enpire.episodes import read_trajectory
from enpire.fleet import open_state_dir, start_core
from hw.pusht import PushTDriver

# Pushes towards the block's centre for a while, then stops: moves the block, never solves the task.
PUSHER = ("import numpy as np\nclass Policy:\n    def __init__(self, params): self.t = 0\n"
          "    def reset(self): self.t = 0\n"
          "    def act(self, obs):\n        self.t += 1\n"
          "        target = obs[2:4] if self.t < 25 else obs[:2]\n"
          "        return np.clip(obs[:2] + np.clip(target - obs[:2], -40, 40), 0, 512)\n")


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("run") / "state"

    async def run():
        config = cfg.decode('[cells]\ncount = 1\ntask = "pusht"\n[agents]\ncount = 0\n[scheduler]\nbackground = false\n'
                            '[tasks.pusht]\nhorizon = 40\n', "replay.toml")
        board, meta = open_state_dir(state)
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, state, board, meta)
            commit = core.workspace.commit("agent/t", {"policy.py": PUSHER}, "pusher")
            with trio.fail_after(120):
                await core.scheduler.ask(EvalRequest(job_id="j", agent="t", task="pusht",
                                                     policy=PolicySpec(commit, {}), seeds=[4, 8]), timeout=120)
            core.stopping.set()
            nursery.cancel_scope.cancel()
        board.close()

    trio.run(run)
    return state


def _final_scene(state: Path, episode: str) -> np.ndarray:
    board = replay.open_board(state)
    rec = board.get("episodes", episode, EpisodeRecord)
    board.close()
    obs = read_trajectory(state / rec.trajectory_file)["observations"][-1].astype(np.float64)
    d = PushTDriver(frame_size=256)
    d.connect()
    d.reset(rec.seed)
    d.set_state(obs[2:5], obs[:2])  # the recorded final state, drawn directly
    return d.frame()


@pytest.mark.parametrize("fmt", ["gif", "mp4"])
def test_replay_of_a_failed_episode_ends_on_the_recorded_state(fleet_run, tmp_path, capsys, fmt):
    assert replay.main(["--state-dir", str(fleet_run), "--out", str(tmp_path), "--format", fmt]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    shown = json.loads(line)
    assert not shown["success"] and shown["source"] == "replay" and shown["frames"] == 41
    assert shown["max_drift"] < 1e-3  # the replay is the recorded episode, not a look-alike
    expected = _final_scene(fleet_run, shown["episode"])
    if fmt == "gif":
        gif = Image.open(shown["file"])
        total = 0
        for i in range(gif.n_frames):  # Pillow merges repeated frames into one longer frame
            gif.seek(i)
            total += gif.info["duration"]
        assert total == 41 * 100
        last = np.asarray(gif.convert("RGB"))
    else:
        cap = cv2.VideoCapture(shown["file"])
        frames = []
        while (ok := cap.read())[0]:
            frames.append(cv2.cvtColor(ok[1], cv2.COLOR_BGR2RGB))
        assert len(frames) == 41
        last = frames[-1]
    start = _start_scene(fleet_run, shown["episode"])
    moved = (np.abs(expected.astype(int) - start.astype(int)) > 40).any(axis=-1)  # where the push changed the scene
    assert moved.sum() > 200

    def err(a, b, mask=slice(None)):
        return np.abs(a.astype(int) - b.astype(int))[mask].mean()

    assert err(last, expected) < (1.0 if fmt == "gif" else 5.0)  # mp4v is lossy
    assert err(last, expected, moved) < 0.25 * err(last, start, moved), (err(last, expected, moved),
                                                                         err(last, start, moved))


def _start_scene(state: Path, episode: str) -> np.ndarray:
    board = replay.open_board(state)
    rec = board.get("episodes", episode, EpisodeRecord)
    board.close()
    d = PushTDriver(frame_size=256)
    d.connect()
    d.reset(rec.seed)
    return d.frame()


def test_replay_lists_failures_first_and_names_bad_input(fleet_run, tmp_path, capsys):
    assert replay.main(["--state-dir", str(fleet_run), "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("\tfailure\t" in line for line in lines)
    assert replay.main(["--state-dir", str(tmp_path)]) == 2
    assert "no blackboard.lmdb" in capsys.readouterr().err
    assert replay.main(["--state-dir", str(fleet_run), "--episode", "nope"]) == 2
    assert "episode 'nope' has no recorded trajectory" in capsys.readouterr().err
    for bad, says in ((["-n", "0"], "at least 1 episode"), (["--fps", "nan"], "frames per second"),
                      (["--frame-size", "100000"], "pixels per side")):
        with pytest.raises(SystemExit) as exit_:
            replay.main(["--state-dir", str(fleet_run), *bad])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
