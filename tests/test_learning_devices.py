"""Where recipes train: the device from config, its record with the checkpoint, and data-parallel BC."""

import io
import json

import numpy as np
import pytest
import torch

from enpire import config as cfg
from enpire.agents.pusht_policy import INITIAL_PARAMS
from enpire.agents.pusht_policy import Policy as Scripted
from enpire.learning import bc, runner
from enpire.learning.dataset import load_dataset, record_scripted, select_episodes
from enpire.learning.device import DeviceError, Placement, resolve

SMALL = {"hidden": "32", "layers": "3", "max_epochs": "3"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    state = tmp_path_factory.mktemp("rec")
    assert record_scripted(state, lambda: Scripted(INITIAL_PARAMS), range(4))["successes"] == 4
    return state


def _stage(state, job_dir):
    episodes = [(runner.content_hash(state / r.trajectory_file), state / r.trajectory_file, True)
                for r in select_episodes(state)]
    runner.stage(job_dir, episodes)


def test_device_names_resolve_or_fail_in_one_line():
    assert resolve("cpu") == torch.device("cpu")
    assert resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="is not auto, cpu, cuda or cuda:N"):
        resolve("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="sees no CUDA GPU here"):
            resolve("cuda:0")
    with pytest.raises(cfg.ConfigError, match="trainer.device: 'gpu' is not auto"):
        cfg.decode('[trainer]\ndevice = "gpu"\n', "x.toml")


async def test_the_checkpoint_records_device_and_throughput_and_a_missing_gpu_is_a_clear_error(recorded, tmp_path):
    job = tmp_path / "job"
    _stage(recorded, job)
    out = await runner.run("bc", "pusht", job, budget_s=120, max_rss_mb=2048, options=SMALL, device="auto")
    assert out.ok, out.error
    assert out.info["device"] == str(resolve("auto")) and out.info["world"] == "1"
    assert out.info["precision"] == "fp32"  # the small MLP gains nothing from bf16
    assert out.metrics["samples_per_s"] > 0 and out.metrics["steps"] > 0
    doc = json.loads((job / "out" / "metrics.json").read_text())
    assert doc["device"] == out.info["device"] and doc["gpu"] == (torch.cuda.get_device_name() if
                                                                  torch.cuda.is_available() else "")
    if not torch.cuda.is_available():
        bad = tmp_path / "bad"
        _stage(recorded, bad)
        fail = await runner.run("bc", "pusht", bad, budget_s=60, max_rss_mb=2048, options=SMALL, device="cuda")
        assert not fail.ok and fail.error.endswith("error: device 'cuda': torch "
                                                   f"{torch.__version__} sees no CUDA GPU here"), fail.error


async def test_two_processes_train_the_same_model_as_one(recorded, tmp_path):
    """gloo, two ranks, each half of every batch: DDP's averaged gradient is the one-process gradient, so
    the weights agree to float rounding (the held-out comparison on a real dataset is bench/train_devices.py)."""
    weights = {}
    for n in (1, 2):
        job = tmp_path / f"p{n}"
        _stage(recorded, job)
        out = await runner.run("bc", "pusht", job, budget_s=240, max_rss_mb=2048, options=SMALL, device="cpu",
                               processes=n)
        assert out.ok, out.error
        assert out.info["world"] == str(n) and out.metrics["processes"] == n
        weights[n] = dict(np.load(io.BytesIO(out.weights)))
    assert weights[1].keys() == weights[2].keys()
    for k in weights[1]:
        np.testing.assert_allclose(weights[2][k], weights[1][k], rtol=0, atol=1e-5, err_msg=k)
    assert any(not np.array_equal(weights[1][k], bc.export_numpy(bc.MLP(hidden=32, layers=3))[k])
               for k in ("w0", "w1"))  # and it did train


TORCHRUN_SUMMARY = """terminate called without an active exception
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
===================================================
enpire.learning.recipes FAILED
---------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 4)  (SIGTERM)
---------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_16:55:08
  host      : jail
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 5)  (SIGABRT)
  error_file: <N/A>
===================================================
"""


def test_a_failed_launch_is_told_by_its_root_cause(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_text(TORCHRUN_SUMMARY)  # the summary a CI run ended with, its line "=====" once the error
    assert runner.failure(log, 1) == ("rank 1 exited -6 (pid: 5)  (SIGABRT): terminate called without an "
                                      "active exception", True)
    log.write_text("error: no data: no episodes\n" + TORCHRUN_SUMMARY.replace("-6 (pid: 5)", "1 (pid: 5)"))
    assert runner.failure(log, 1) == ("error: no data: no episodes", False)  # the recipe's own words win
    log.write_text("Traceback (most recent call last):\nKeyError: 'x'\n")
    assert runner.failure(log, 1) == ("KeyError: 'x'", False)
    assert runner.failure(tmp_path / "missing.log", 3) == ("exit code 3", False)


async def test_a_rank_killed_by_a_signal_restarts_the_group_and_a_recipe_error_never(recorded, tmp_path):
    job = tmp_path / "abort"
    _stage(recorded, job)
    out = await runner.run("bc", "pusht", job, budget_s=240, max_rss_mb=2048, options={**SMALL, "inject_abort_once": "1"},
                           processes=2)
    # the injected abort, one restart: the restarted group's ranks leave without torch's teardown (recipes.py)
    assert out.ok and out.info["restarts"] == "1", out.error
    assert "SIGABRT" in (job / "stderr-1.log").read_text() and (job / "out" / "aborted-once").exists()
    bad = tmp_path / "bad"
    _stage(recorded, bad)
    fail = await runner.run("bc", "pusht", bad, budget_s=240, max_rss_mb=2048, options={**SMALL, "layers": "x"},
                            processes=2)
    assert not fail.ok and "error: " in fail.error and not (bad / "stderr-1.log").exists(), fail.error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_train_the_same_model_within_float_noise(recorded):
    ds = load_dataset(recorded)
    conf = bc.BCConfig(hidden=64, layers=3, max_epochs=5, seed=0)
    cpu, m_cpu = bc.train_bc(ds, conf, place=Placement(torch.device("cpu")))
    gpu, m_gpu = bc.train_bc(ds, conf, place=Placement.start("cuda"))
    assert abs(m_cpu["val_loss"] - m_gpu["val_loss"]) < 1e-2 * max(1.0, m_cpu["val_loss"])
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_two_process_bc_reaches_the_one_process_heldout_success():
    """bench/train_devices.py on 1,000 recorded episodes: BC trained by 2 gloo processes lands inside the
    Wilson interval of the one-process model on the same 100 held-out seeds (both stated in the JSON)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "train_devices.py"), "--episodes", "1000",
                          "--eval", "100", "--processes", "2", "--max-epochs", "40", "--vm-episodes", "2",
                          "--vm-epochs", "1"], capture_output=True, text=True, timeout=7200, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    placements = json.loads(out.stdout)["placements"]
    one, two = placements["cpu"], placements["cpu_x2"]
    assert one["heldout"]["success_rate"] >= 0.1, one  # it learned (measured: 22/100; an untrained MLP gets 0)
    assert two["heldout_within_cpu_interval"], (one["heldout"], two["heldout"])
    if "cuda" in placements:
        assert placements["cuda"]["heldout_within_cpu_interval"], placements["cuda"]["heldout"]
