"""Push-T from pixels: what a policy is handed, that it is the simulator's frame, how frames are recorded,
and the perception template's pose estimate."""

from __future__ import annotations

import math
import struct
import textwrap

import msgspec
import numpy as np
import pytest

from bus.messages import Frames
from enpire.episodes import EpisodeFileError, read_trajectory, write_trajectory
from enpire.sandbox import PolicySandbox, SandboxLimits
from hw.pusht import PIXELS_SIZE, PushTDriver

# A policy that reports everything it is handed (observations, parameters, environment, files) on its
# stderr, one JSON line per call, and walks the pusher in a circle so the scene changes.
RECORDER = textwrap.dedent('''
    import hashlib, json, os, sys
    import numpy as np

    def say(**kw):
        print(json.dumps(kw), file=sys.stderr, flush=True)

    class Policy:
        def __init__(self, params):
            self.t = 0
            say(params=params, env=dict(os.environ), files=sorted(os.listdir(".")))

        def reset(self):
            pass

        def act(self, obs):
            assert isinstance(obs, dict), type(obs)
            say(t=self.t, keys=sorted(obs), shape=list(obs["pixels"].shape), dtype=str(obs["pixels"].dtype),
                sha=hashlib.sha256(obs["pixels"].tobytes()).hexdigest(), agent_pos=obs["agent_pos"].tolist(), raw=obs["agent_pos"].tobytes().hex())
            self.t += 1
            pos = obs["agent_pos"]
            return pos + 40.0 * np.array([np.cos(self.t / 3.0), np.sin(self.t / 3.0)])
''')


def _float_patterns(values) -> list[bytes]:
    """Byte patterns of each value as float64 and float32, both byte orders, and as text."""
    out = []
    for v in values:
        out += [struct.pack("<d", v), struct.pack(">d", v), struct.pack("<f", v), struct.pack(">f", v)]
        out += [repr(float(v)).encode(), f"{v:.6g}".encode()]
    return out


def test_pixels_observation_is_the_frame_and_the_pusher_position_only():
    d = PushTDriver(obs_type="pixels")
    obs = d.reset(7)
    assert set(obs) == {"pixels", "agent_pos"}
    assert obs["pixels"].shape == (PIXELS_SIZE, PIXELS_SIZE, 3) and obs["pixels"].dtype == np.uint8
    assert obs["agent_pos"].shape == (2,)
    assert np.allclose(obs["agent_pos"], d.trusted_state()["agent_pos"])
    # Two scenes that differ only in the block's pose: the flat part is identical, only the image differs.
    a = d.set_state([200.0, 300.0, 0.3], [400.0, 100.0]) and d._observe()
    b = d.set_state([320.0, 180.0, 2.0], [400.0, 100.0]) and d._observe()
    assert np.array_equal(a["agent_pos"], b["agent_pos"])
    assert not np.array_equal(a["pixels"], b["pixels"])
    d.set_observation("state")
    assert d.reset(7).shape == (5,)  # the state observation, with the block pose, is still there on request
    with pytest.raises(ValueError, match="observation"):
        d.set_observation("depth")


def test_a_policy_given_pixels_sees_the_simulators_frame_and_never_the_block_pose(tmp_path):
    """Through the real sandbox: every observation the policy received is exactly the simulator's frame
    for that step (an independent render of the trusted state) and the pusher position; no block pose
    value is in anything it was handed besides the image."""
    import hashlib
    import json

    d = PushTDriver(obs_type="pixels")
    check = PushTDriver(obs_type="pixels")  # renders the trusted states independently
    steps = 12
    states = []
    with PolicySandbox(SandboxLimits(act_timeout_s=5.0), tmp_path / "scratch") as sandbox:
        sandbox.load({"policy.py": RECORDER}, {"gain": 1.0})
        sandbox.reset()
        obs = d.reset(123)
        for _ in range(steps):
            states.append(d.trusted_state())
            result = sandbox.act(obs)
            assert result.error is None and result.action is not None, result
            obs = d.act(result.action)
        log = sandbox._stderr_path().read_bytes()
    lines = [json.loads(line) for line in log.decode().splitlines() if line.startswith("{")]
    handed, seen = lines[0], lines[1:]
    assert [s["t"] for s in seen] == list(range(steps))
    shas = []
    for t, (step, state) in enumerate(zip(seen, states, strict=True)):
        assert step["keys"] == ["agent_pos", "pixels"] and step["shape"] == [96, 96, 3] and step["dtype"] == "uint8"
        check.set_state(state["block_pose"], state["agent_pos"])
        assert step["sha"] == hashlib.sha256(check.render(PIXELS_SIZE).tobytes()).hexdigest(), \
            f"step {t}: not the simulator's frame"
        assert np.allclose(step["agent_pos"], state["agent_pos"]), t
        shas.append(step["sha"])
        flat = bytes.fromhex(step["raw"]) + json.dumps(step["agent_pos"]).encode() + json.dumps(handed).encode()
        for pattern in _float_patterns(state["block_pose"]):
            assert pattern not in flat, f"step {t}: block pose value {pattern!r} handed to the policy"
    assert len(set(shas)) >= steps // 2, "the scene hardly changed: the test would not tell frames apart"


def test_recorded_frames_round_trip_through_the_bus_and_the_episode_store(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(4, PIXELS_SIZE, PIXELS_SIZE, 3), dtype=np.uint8)
    frames[:, :60] = 255  # a mostly white scene compresses
    msg = msgspec.msgpack.decode(msgspec.msgpack.encode(Frames.of(frames)), type=Frames)
    assert np.array_equal(msg.numpy(), frames)
    assert len(msg.deflated) < frames.nbytes
    with pytest.raises(ValueError, match="inflated|corrupt"):
        Frames(msg.shape, msg.deflated[:-50]).numpy()
    with pytest.raises(ValueError, match="need"):
        Frames((5, PIXELS_SIZE, PIXELS_SIZE, 3), msg.deflated).numpy()  # promises more than it holds
    path = tmp_path / "ep.npz"
    obs, act, rew = np.zeros((4, 2), np.float32), np.zeros((3, 2), np.float32), np.zeros(3, np.float32)
    write_trajectory(path, obs, act, rew, frames)
    back = read_trajectory(path)
    assert np.array_equal(back["frames"], frames) and back["observations"].shape == (4, 2)
    write_trajectory(path, obs, act, rew, frames[:3])  # one frame short of the observations
    with pytest.raises(EpisodeFileError, match="frames"):
        read_trajectory(path)
    write_trajectory(path, obs, act, rew)  # state episodes stay as they were
    assert "frames" not in read_trajectory(path)


def test_perception_template_estimates_the_block_pose_from_the_frame():
    from enpire.agents import pusht_pixels_policy as pp

    d = PushTDriver(obs_type="pixels")
    rng = np.random.default_rng(1)
    errors = []
    for seed in range(8):
        obs = d.reset(seed)
        for _ in range(int(rng.integers(0, 20))):
            obs = d.act(obs["agent_pos"] + rng.normal(0.0, 30.0, 2).clip(-90, 90))
        x, y, th = pp.estimate_pose(obs["pixels"])
        bx, by, bth = d.trusted_state()["block_pose"]
        errors.append((math.hypot(x - bx, y - by), abs(math.degrees(pp._wrap(th - bth)))))
    err = np.array(errors)
    # A pixel is 5.3 px of the workspace: the fit is sub-pixel (measured ~0.4 px and ~0.15 degrees).
    assert err[:, 0].max() < 2.0 and err[:, 1].max() < 1.5, err
    assert pp.estimate_pose(np.full((96, 96, 3), 255, np.uint8)) is None  # no block in view


async def test_a_real_cell_runs_the_perception_template_on_pixels_and_records_the_frames(tmp_path):
    """Fleet core + a cell process: the lease says "pixels", the perception template (committed with its
    controller) succeeds from frames alone, and the recorded episode holds the frames the policy saw."""
    from pathlib import Path

    import trio

    from bus.messages import EvalRequest, EvalResult, PolicySpec
    from bus.records import EpisodeRecord
    from enpire import config as cfg
    from enpire.agents import pusht_pixels_policy, pusht_policy
    from enpire.fleet import open_state_dir, start_core

    text = '[cells]\ncount = 1\ntask = "pusht"\n[agents]\ncount = 0\n[scheduler]\nbackground = false\n' \
           '[sandbox]\nact_timeout_s = 1.0\n[tasks.pusht]\nobservation = "pixels"\n'
    config = cfg.decode(text, "pixels.toml")
    files = {"policy.py": Path(pusht_pixels_policy.__file__).read_text(),
             "pusht_policy.py": Path(pusht_policy.__file__).read_text()}
    seeds = [3, 4]  # tuning seeds the perception template solves (measured with policy_eval)
    state = tmp_path / "state"
    board, meta = open_state_dir(state)
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, state, board, meta)
        commit = core.workspace.commit("agent/pixels", files, "perception + controller")
        with trio.fail_after(300):
            result = await core.scheduler.ask(EvalRequest(job_id="px", agent="t", task="pusht",
                                                          policy=PolicySpec(commit, {}), seeds=seeds), timeout=300)
        core.stopping.set()
        nursery.cancel_scope.cancel()
    assert isinstance(result, EvalResult), result
    assert result.successes == 2, [e.reason for e in result.episodes]
    records = {r.seed: r for r in board.values("episodes", EpisodeRecord)}
    board.close()
    d = PushTDriver(obs_type="pixels")
    for seed in seeds:
        data = read_trajectory(state / records[seed].trajectory_file)
        t = len(data["actions"])
        assert data["frames"].shape == (t + 1, PIXELS_SIZE, PIXELS_SIZE, 3)
        assert data["observations"].shape == (t + 1, 2)  # the flat part the policy saw: the pusher only
        first = d.reset(seed)
        assert np.array_equal(data["frames"][0], first["pixels"])
        assert np.allclose(data["observations"][0], first["agent_pos"])


def test_visuomotor_numpy_policy_computes_what_torch_trained():
    """The sandbox's numpy network (visuomotor_policy.forward) and the trained torch network agree, on the
    action and on the pose head."""
    import torch

    from enpire.learning import visuomotor as vm
    from enpire.learning import visuomotor_policy as vp

    rng = np.random.default_rng(0)
    n = 40
    episodes = [{"frames": rng.integers(0, 255, (n + 1, 96, 96, 3), dtype=np.uint8),
                 "observations": rng.uniform(50, 450, (n + 1, 2)).astype(np.float32),
                 "actions": rng.uniform(50, 450, (n, 2)).astype(np.float32)} for _ in range(2)]
    ds = vm.from_episodes(episodes)
    assert len(ds) == 2 * n and ds.episode[n - 1] == 0 and ds.episode[n] == 1
    angle = rng.uniform(-np.pi, np.pi, 2 * n)  # labelled already: no expert needed on random frames
    ds.pose = np.stack([rng.normal(size=2 * n), rng.normal(size=2 * n), np.cos(angle), np.sin(angle)], 1).astype(np.float32)
    ds.pose_ok = np.ones(2 * n, bool)
    ds.mode = np.stack([rng.integers(0, k, 2 * n) for k in vp.MODES], 1)
    from enpire.agents import pusht_policy

    assert vp.MODES[0] == len(pusht_policy.C_LOC)  # the numpy file cannot import the controller: same count
    model, metrics = vm.train_visuomotor(ds, vm.VisuomotorConfig(max_epochs=2, batch_size=16, device="cpu",
                                                                 dagger_rounds=0, workers=1))
    assert metrics["bc_epochs"] == 2 and np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_aux_loss"])
    w = vm.export_numpy(model)
    idx = np.arange(0, 2 * n, 7)
    with torch.no_grad():
        expected, expected_pose, _ = model(*vm._batch(ds, idx, torch.device("cpu")))
    got, got_pose = vp.forward(w, vp.frames_input(ds.frames[idx]), ds.pos[idx])
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got_pose, expected_pose.numpy(), rtol=0, atol=1e-4)
    # the absolute action: the head's offset is in the frame of the block pose the network sees
    local = expected.numpy() * model.act_std.numpy() + model.act_mean.numpy()
    th = np.arctan2(expected_pose.numpy()[:, 3], expected_pose.numpy()[:, 2])
    world = np.stack([np.cos(th) * local[:, 0] - np.sin(th) * local[:, 1],
                      np.sin(th) * local[:, 0] + np.cos(th) * local[:, 1]], 1)
    np.testing.assert_allclose(vp.predict(w, ds.frames[idx], ds.pos[idx]), ds.pos[idx] + world, rtol=0, atol=1e-3)
    # and the head's target is the expert's offset turned into the frame of the pose it saw
    back = vp.rotate(vm.local_offsets(ds, idx), ds.pose[idx])
    np.testing.assert_allclose(back, ds.actions[idx] - ds.pos[idx], rtol=0, atol=1e-3)
    assert vm.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            vm.pick_device("cuda")


def test_dagger_rollouts_are_labelled_by_the_memory_free_expert_and_stop_at_their_deadline():
    """A DAgger round: the numpy policy drives the simulator, every visited frame gets the expert's action,
    pose and decision (the same a fresh expert gives for that frame alone); a passed deadline stops it."""
    import time

    from enpire.learning import visuomotor as vm

    w = vm.export_numpy(vm.Net(vm.VisuomotorConfig()))
    new, wins = vm.dagger_data(w, None, [50000], 5, None, deadline=time.time() + 120)
    assert len(new) == 5 and wins == 0 and new.pose_ok.all() and new.mode.shape == (5, 3)
    action, pose, mode = vm.expert_label(None, new.frames[3], new.pos[3])
    np.testing.assert_allclose(new.actions[3], action, atol=1e-3)
    np.testing.assert_allclose(new.pose[3], pose, atol=1e-5)
    assert new.mode[3].tolist() == mode.tolist()
    assert vm.dagger_data(w, None, [50000, 50001], 300, None, deadline=time.time() - 1) == (None, 0)


async def test_visuomotor_checkpoint_trained_by_the_trainer_runs_in_a_real_cell(tmp_path):
    """Record pixel episodes, train the visuomotor recipe through the trainer, commit the checkpoint
    (the visuomotor policy file goes with it), evaluate it through a real cell on pixels, and find the
    network's own actions in the recorded episodes."""
    import trio

    from bus.messages import PolicySpec
    from bus.records import EpisodeRecord
    from enpire import config as cfg
    from enpire.agents import pusht_pixels_policy
    from enpire.agents.tools import LEARNED_POLICIES, Tools
    from enpire.fleet import open_state_dir, start_core
    from enpire.learning import visuomotor as vm
    from enpire.learning import visuomotor_policy as vp
    from enpire.learning.dataset import ARTIFACTS

    state = tmp_path / "state"
    recorded = vm.record_pixels(state, pusht_pixels_policy.Policy(), [3, 4], horizon=25)
    assert recorded["transitions"] == 50
    # short episodes count as successes for this test: mark them so the recipe selects them
    from bus.blackboard import Blackboard
    from bus.messages import Verdict

    board = Blackboard(state / "blackboard.lmdb")
    for key, rec in board.items("episodes", EpisodeRecord):
        board.put("episodes", key, msgspec.structs.replace(rec, verdict=Verdict(True, 1.0, "success", "test")),
                  overwrite=True)
    board.close()
    text = ('[cells]\ncount = 1\ntask = "pusht"\n[agents]\ncount = 0\n[scheduler]\nbackground = false\n'
            '[sandbox]\nact_timeout_s = 1.0\n[tasks.pusht]\nobservation = "pixels"\nhorizon = 20\n')
    config = cfg.decode(text, "pixels.toml")
    board, meta = open_state_dir(state)
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, state, board, meta)
        tools = Tools("a", "pusht", core.workspace, core.scheduler, board, trainer=core.trainer,
                      artifacts=state / ARTIFACTS)
        with trio.fail_after(240):
            trained = await tools.train("visuomotor", time_budget_s=90,
                                        options={"max_epochs": "1", "batch_size": "16", "device": "auto",
                                                 "dagger_rounds": "1", "dagger_episodes": "2", "horizon": "10",
                                                 "workers": "2"})
            assert trained.ok, trained.error
            m = trained.metrics  # the recordings, relabelled, then one DAgger round in the simulator
            assert m["episodes"] == 2 and m["recorded_transitions"] == 50 and m["dagger_rounds"] == 1
            assert m["dagger_transitions"] == 20 and m["transitions"] == 70  # 2 rollouts of the 10-step horizon
            commit = await tools.commit_checkpoint(trained.artifact, "visuomotor on 2 episodes")
            files = await tools.read_files(commit)
            assert files["policy.py"] == LEARNED_POLICIES["visuomotor"].read_text()
            result = await tools.evaluate(PolicySpec(commit), [11])
        core.stopping.set()
        nursery.cancel_scope.cancel()
    (episode,) = [e for e in board.values("episodes", EpisodeRecord) if e.job_id == result.job_id]
    board.close()
    assert not episode.verdict.reason.startswith(("policy", "safety")), episode.verdict.reason
    arrays = read_trajectory(state / episode.trajectory_file)
    assert len(arrays["actions"]) == episode.steps == 20 and arrays["frames"].shape == (21, 96, 96, 3)
    model = vp.Policy({}, weights=vp.load_weights(str(state / ARTIFACTS / f"{trained.artifact}.npz")))
    for frame, pos, action in zip(arrays["frames"], arrays["observations"], arrays["actions"], strict=False):
        mine = model.act({"pixels": frame, "agent_pos": pos.astype(np.float64)})
        np.testing.assert_allclose(mine, action, rtol=0, atol=1e-2)  # stored as float32


def test_model_agents_get_the_pixels_task_card(monkeypatch):
    from enpire import config as cfg
    from enpire.agents.backends import make_backend

    monkeypatch.setenv("ENPIRE_TEST_KEY", "not-a-real-key")
    agents = '[agents]\nbackend = "openai"\nmodel = "m"\napi_key_env = "ENPIRE_TEST_KEY"\n'
    pixels = make_backend(cfg.decode('[cells]\ntask = "pusht"\n[tasks.pusht]\nobservation = "pixels"\n' + agents), 0)
    state = make_backend(cfg.decode('[cells]\ntask = "pusht"\n' + agents), 0)
    assert "'pixels' (96, 96, 3) uint8" in pixels.card.render() and "block_x" not in pixels.card.render()
    assert "block_x" in state.card.render() and "'pixels'" not in state.card.render()
    default = make_backend(cfg.decode(agents), 0)  # the embedded default task has its card too
    assert "peg-insert-side-v3" in default.card.render()


def test_the_pixels_task_card_names_the_frame_and_the_perception_template():
    from enpire import config as cfg
    from enpire.tasks import card

    config = cfg.decode('[cells]\ntask = "pusht"\n[tasks.pusht]\nobservation = "pixels"\n', "pixels.toml")
    text = card("pusht", config).render()
    assert "'pixels' (96, 96, 3) uint8" in text and "block_x" not in text
    assert "enpire.agents.pusht_pixels_policy" in text
    assert "enpire.agents.pusht_policy " in card("pusht").render()  # the state card keeps the state template
