"""export of a simulated fleet run: no recorded frames, so frames come from deterministic replay."""

import json
from pathlib import Path

import numpy as np
import pytest
import trio

pytest.importorskip("lerobot.datasets.lerobot_dataset", reason="needs LeRobot: .ci/lerobot-env")

from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402

from bus.messages import EvalRequest, PolicySpec  # noqa: E402
from bus.records import EpisodeRecord  # noqa: E402
from enpire import config as cfg  # noqa: E402
from enpire import export  # noqa: E402
from enpire.agents import pusht_policy  # noqa: E402
from enpire.episodes import read_trajectory  # noqa: E402
from enpire.fleet import open_state_dir, start_core  # noqa: E402
from enpire.replay import replay_on_simulator  # noqa: E402


def test_sim_run_exports_with_replayed_frames(tmp_path):
    state = tmp_path / "state"

    async def run():
        config = cfg.decode('[cells]\ncount = 1\ntask = "pusht"\n[agents]\ncount = 0\n[scheduler]\nbackground = false\n'
                            '[tasks.pusht]\nhorizon = 25\n', "sim.toml")
        board, meta = open_state_dir(state)
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, state, board, meta)
            commit = core.workspace.commit("agent/t", {"policy.py": Path(pusht_policy.__file__).read_text()}, "h")
            with trio.fail_after(120):
                await core.scheduler.ask(EvalRequest(job_id="j", agent="t", task="pusht", policy=PolicySpec(commit, {}),
                                                     seeds=[2, 3, 4]), timeout=120)
            core.stopping.set()
            nursery.cancel_scope.cancel()
        board.close()

    trio.run(run)
    out = tmp_path / "ds"
    assert export.main(["--state-dir", str(state), "--out", str(out), "--repo-id", "local/sim"]) == 0
    from enpire.replay import open_board

    board = open_board(state)
    records = sorted((r for r in board.values("episodes", EpisodeRecord) if not r.flagged),
                     key=lambda r: (r.finished, r.episode_id))
    board.close()
    ds = LeRobotDataset("local/sim", root=out)
    assert ds.num_episodes == len(records) == 3 and ds.num_frames == sum(r.steps for r in records)
    meta = [json.loads(x) for x in (out / "meta" / "enpire_episodes.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in meta] == [r.seed for r in records] and {m["frames_source"] for m in meta} == {"replay"}
    first = records[0]
    traj = read_trajectory(state / first.trajectory_file)
    frames, _, _ = replay_on_simulator("pusht", first.seed, traj["actions"], 96)
    for t in (0, first.steps - 1):
        got = ds[t]["observation.image"].numpy().transpose(1, 2, 0) * 255.0
        assert np.abs(got - frames[t]).mean() < 6.0
        assert np.allclose(ds[t]["observation.state"].numpy(), traj["observations"][t])
