"""The learning library: dataset loading from the episode store, BC, numpy export, the recipe process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bus.blackboard import Blackboard
from bus.messages import Verdict
from bus.records import EpisodeRecord
from enpire.agents.pusht_policy import INITIAL_PARAMS
from enpire.agents.pusht_policy import Policy as Scripted
from enpire.learning import bc, mlp_policy
from enpire.learning.dataset import ARTIFACTS, BOARD_NAME, NoDataError, load_dataset, record_scripted

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("state")
    stats = record_scripted(d, lambda: Scripted(INITIAL_PARAMS), range(3))
    assert stats["episodes"] == 3 and stats["successes"] == 3
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_dataset_arrays_and_filters(recorded, tmp_path):
    ds = load_dataset(recorded, task="pusht")
    assert ds.n_episodes == 3 and not ds.skipped
    n = len(ds)
    assert ds.obs.shape == (n, 5) and ds.next_obs.shape == (n, 5) and ds.actions.shape == (n, 2)
    assert ds.rewards.shape == (n,) and ds.dones.shape == (n,)
    assert ds.dones.sum() == 3 and ds.episode_start.sum() == 3
    # next_obs of a step is obs of the following step within an episode
    inner = ~ds.episode_start[1:]
    np.testing.assert_array_equal(ds.next_obs[:-1][inner], ds.obs[1:][inner])
    assert load_dataset(recorded, max_episodes=2).n_episodes == 2
    with pytest.raises(NoDataError):
        load_dataset(recorded, task="peg-insert-side-v3")

    # a failed episode is left out unless asked for
    state = _copy(recorded, tmp_path / "s")
    board = Blackboard(state / BOARD_NAME)
    rec = board.get("episodes", "rec-scripted-0", EpisodeRecord)
    import msgspec

    failed = msgspec.structs.replace(rec, episode_id="failed", verdict=Verdict(False, 0.3, "timeout", "pusht_state"))
    board.put("episodes", "failed", failed)
    # held-out episodes judge policies: never training data, successful or not
    for kind in ("heldout", "background"):
        board.put("episodes", kind, msgspec.structs.replace(rec, episode_id=kind, kind=kind))
    board.close()
    assert load_dataset(state).n_episodes == 3
    assert load_dataset(state, success_only=False).n_episodes == 4


def test_truncated_npz_is_skipped_and_named(recorded, tmp_path):
    state = _copy(recorded, tmp_path / "s")
    bad = state / "episodes" / "rec-scripted-1.npz"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    ds = load_dataset(state)
    assert ds.n_episodes == 2
    assert len(ds.skipped) == 1 and "rec-scripted-1.npz" in ds.skipped[0]
    # all files broken: a clear NoDataError that names one of them
    for f in (state / "episodes").glob("*.npz"):
        f.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(NoDataError, match=r"rec-scripted-\d\.npz"):
        load_dataset(state)


def test_bc_overfits_a_tiny_dataset(recorded):
    torch.set_num_threads(1)
    ds = load_dataset(recorded, max_episodes=1)
    cfg = bc.BCConfig(hidden=128, layers=3, lr=3e-3, max_epochs=300, patience=1000, val_fraction=0.0,
                      batch_size=64, time_budget_s=20.0)
    model, metrics = bc.train_bc(ds, cfg)
    assert metrics["train_loss"] < 0.05, metrics
    pred = model.predict_actions(ds.obs, bc.previous_obs(ds))
    assert np.median(np.abs(pred - ds.actions)) < 3.0  # px


def test_export_round_trip_numpy_matches_torch(recorded, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    ds = load_dataset(recorded)
    model, _ = bc.train_bc(ds, bc.BCConfig(hidden=64, max_epochs=2, seed=3))
    weights = bc.export_numpy(model)
    np.savez(tmp_path / "weights.npz", **weights)
    shutil.copy(ROOT / "enpire" / "learning" / "mlp_policy.py", tmp_path / "policy.py")
    monkeypatch.chdir(tmp_path)
    policy = mlp_policy.Policy({})  # loads ./weights.npz, as in the sandbox
    prev = bc.previous_obs(ds)
    want = model.predict_actions(ds.obs, prev)
    got = mlp_policy.predict(policy.w, ds.obs, prev)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # and back: a checkpoint imported into torch (RL starts from one) predicts the same
    again = bc.import_numpy(mlp_policy.load_weights(str(tmp_path / "weights.npz")))
    np.testing.assert_allclose(again.predict_actions(ds.obs, prev), want, rtol=0, atol=1e-9)
    # through the protocol: the same action whenever no safety clip applies, and always safe
    policy.reset()
    last = None
    for i in range(len(ds)):
        if ds.episode_start[i]:
            policy.reset()
            last = None
        a = policy.act(ds.obs[i].astype(np.float64))
        assert a.shape == (2,) and np.all(a >= 0) and np.all(a <= 512)
        ref = ds.obs[i, :2] if last is None else last
        assert np.max(np.abs(a - ref)) <= 100.0
        if np.all(np.abs(want[i] - ref) < 95.0) and np.all((want[i] > 0) & (want[i] < 512)):
            np.testing.assert_allclose(a, want[i], atol=1e-9)
        last = a
    # the policy file itself is numpy-only
    src = (ROOT / "enpire" / "learning" / "mlp_policy.py").read_text()
    assert "import torch" not in src and "allow_pickle=False" in src


def _recipe(state: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "enpire.learning.recipes", "--recipe", "bc", "--task", "pusht",
           "--state-dir", str(state), "--out", str(out), "--time-budget-s", "40", "--max-rss-mb", "2048", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_recipe_process_ok_nan_and_empty(recorded, tmp_path):
    ok = _recipe(recorded, tmp_path / "ok", "--option", "max_epochs=3", "--option", "hidden=32")
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["episodes"] == 3 and metrics["recipe"] == "bc"
    with np.load(tmp_path / "ok" / "weights.npz", allow_pickle=False) as w:
        assert int(w["n_layers"]) == 4

    # RL from that BC checkpoint, once it is an artifact of the state dir
    state = _copy(recorded, tmp_path / "s")
    artifact = "0123456789abcdef0123456789abcdef"
    (state / ARTIFACTS).mkdir()
    shutil.copy(tmp_path / "ok" / "weights.npz", state / ARTIFACTS / f"{artifact}.npz")
    rl = _recipe(state, tmp_path / "rl", "--recipe", "rl", "--option", f"init_artifact={artifact}",
                 "--option", "rl_steps=20")
    assert rl.returncode == 0, rl.stderr
    metrics = json.loads((tmp_path / "rl" / "metrics.json").read_text())
    assert metrics["recipe"] == "rl" and metrics["init_from_artifact"] == 1 and metrics["rl_offline_steps"] == 20
    missing = _recipe(state, tmp_path / "rl2", "--recipe", "rl", "--option", "init_artifact=" + "f" * 32)
    assert missing.returncode != 0 and "no checkpoint at" in missing.stderr.strip().splitlines()[-1]

    nan = _recipe(recorded, tmp_path / "nan", "--option", "inject_nan=1")
    lines = nan.stderr.strip().splitlines()
    assert nan.returncode != 0 and lines and lines[-1].startswith("error: NaN loss"), nan.stderr
    assert not (tmp_path / "nan" / "weights.npz").exists()

    empty = tmp_path / "empty"
    Blackboard(empty / BOARD_NAME).close()
    r = _recipe(empty, tmp_path / "e")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and lines and lines[-1].startswith("error: no data"), r.stderr

    mem = _recipe(recorded, tmp_path / "m", "--max-rss-mb", "64")  # RLIMIT_AS leaves no room
    lines = mem.stderr.strip().splitlines()
    assert mem.returncode != 0 and lines and "memory budget exceeded" in lines[-1], mem.stderr


def test_a_recipes_metrics_file_is_read_without_trusting_it(tmp_path):
    """Only finite numbers become metrics and only named facts become info; a file that is not a flat
    JSON object (a list, brackets past the parser's limit, numbers no float holds) gives nothing."""
    from enpire.learning.runner import read_metrics

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"val_loss": 0.25, "epochs": 7, "early": True, "device": "cpu", "world": 2,
                                "gpu": {"name": "x"}, "note": "n"}))
    assert read_metrics(path) == ({"val_loss": 0.25, "epochs": 7.0, "world": 2.0}, {"device": "cpu", "world": "2",
                                                                       "gpu": "{'name': 'x'}"})
    path.write_text('{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1' + "0" * 400 + ', "e": -2.5}')
    assert read_metrics(path) == ({"e": -2.5}, {})
    for data in (b"[1, 2]", b"[" * 100_000, b'{"a": ' * 100 + b"1" + b"}" * 100, b'\xff{"a": 1}', b""):
        path.write_bytes(data)
        assert read_metrics(path) == ({}, {}), data[:20]
    assert read_metrics(tmp_path / "missing.json") == ({}, {})


@pytest.mark.slow
def test_bc_reaches_target_on_heldout_seeds():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bc_pusht.py"), "--episodes", "1000", "--eval", "100"],
                         capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["heldout"]["success_rate"] >= 0.8, result

