"""`python -m enpire.trainer` as a separate process joining a fleet over loopback tcp: it trains a BC job
whose checkpoint a cell then runs; killed mid-job, its job goes to a second trainer and one checkpoint
is recorded; with a wrong secret it is refused; it never holds a held-out episode."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from bus.messages import Failure, PolicySpec
from bus.records import EpisodeRecord, TrainerRecord, TrainRecord
from bus.transport import RequestServer
from enpire import config as cfg
from enpire.agents.pusht_policy import INITIAL_PARAMS
from enpire.agents.pusht_policy import Policy as Scripted
from enpire.agents.tools import Tools
from enpire.fleet import open_state_dir, start_core
from enpire.learning.dataset import ARTIFACTS, record_scripted
from enpire.learning.runner import content_hash

SECRET = "s3cret-for-tests"
SMALL = {"hidden": "32", "layers": "3", "max_epochs": "5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_trainer(url: str, tid: str, cache: Path, secret: str = SECRET) -> subprocess.Popen:
    env = {**os.environ, "ENPIRE_SECRET": secret}
    return subprocess.Popen([sys.executable, "-m", "enpire.trainer", "--connect", url, "--trainer-id", tid,
                             "--device", "cpu", "--cache", str(cache), "--connect-timeout", "20"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fleet_config(port: int, **trainer) -> cfg.Config:
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"cells.count": 1, "agents.count": 0, "scheduler.background": False,
                                   "bus.listen": f"tcp://127.0.0.1:{port}",
                                   "sandbox.act_timeout_s": 1.0})  # a loaded CI machine must not fail the policy
    return cfg.with_overrides(config, **{f"trainer.{k}": v for k, v in trainer.items()})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


async def test_a_remote_trainer_trains_a_checkpoint_that_a_cell_runs(tmp_path, monkeypatch):
    state = tmp_path / "state"
    assert record_scripted(state, lambda: Scripted(INITIAL_PARAMS), range(3))["successes"] == 3
    heldout = record_scripted(state, lambda: Scripted(INITIAL_PARAMS), [1_000_000], policy_ref="judge")
    assert heldout["episodes"] == 1
    board, meta = open_state_dir(state)
    held = board.get("episodes", "rec-judge-1000000", EpisodeRecord)
    board.put("episodes", held.episode_id, EpisodeRecord(**{**{f: getattr(held, f) for f in held.__struct_fields__},
                                                            "kind": "heldout"}))
    secret_file = content_hash(state / held.trajectory_file)
    monkeypatch.setenv("ENPIRE_SECRET", SECRET)
    port = free_port()
    config = fleet_config(port, local_slots=0)  # only the remote trainer trains
    trainer = start_trainer(f"tcp://127.0.0.1:{port}", "remote-1", tmp_path / "cache")
    try:
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, state, board, meta)
            tools = Tools("a", "pusht", core.workspace, core.scheduler, board, trainer=core.trainer,
                          artifacts=state / ARTIFACTS)
            with trio.fail_after(180):
                trained = await tools.train("bc", time_budget_s=60, options=SMALL)
                assert trained.ok, trained.error
                assert trained.info["trainer"] == "remote-1" and trained.info["device"] == "cpu"
                assert trained.metrics["episodes"] == 3 and trained.metrics["samples_per_s"] > 0
                commit = await tools.commit_checkpoint(trained.artifact, "bc trained remotely")
                result = await tools.evaluate(PolicySpec(commit), [21, 22])
            record = board.get("trainers", "remote-1", TrainerRecord)
            assert record.device == "cpu" and record.jobs_done == 1 and record.samples_per_s > 0
            core.stopping.set()
            nursery.cancel_scope.cancel()
    finally:
        stop(trainer)
    episodes = [e for e in board.values("episodes", EpisodeRecord) if e.job_id == result.job_id]
    board.close()
    assert len(episodes) == 2 and not any(e.verdict.reason.startswith(("policy", "safety")) for e in episodes), [
        e.verdict.reason for e in episodes]
    fetched = {p.stem for p in (tmp_path / "cache" / "files").iterdir()}
    assert len(fetched) == 3 and secret_file not in fetched  # the held-out episode never left the fleet


async def test_a_trainer_killed_mid_job_hands_the_job_to_another_once(tmp_path, monkeypatch):
    state = tmp_path / "state"
    record_scripted(state, lambda: Scripted(INITIAL_PARAMS), range(3))
    board, meta = open_state_dir(state)
    monkeypatch.setenv("ENPIRE_SECRET", SECRET)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    config = fleet_config(port, local_slots=0, lease_s=2.0, heartbeat_s=0.5)
    first = start_trainer(url, "doomed", tmp_path / "c1")
    second = None
    try:
        async with trio.open_nursery() as nursery:
            core = await start_core(nursery, config, state, board, meta)
            tools = Tools("a", "pusht", core.workspace, core.scheduler, board, trainer=core.trainer,
                          artifacts=state / ARTIFACTS)
            results: list = []

            async def train() -> None:
                results.append(await tools.train("bc", time_budget_s=60, options=SMALL))

            nursery.start_soon(train)
            with trio.fail_after(60):  # the job is leased to the first trainer: kill it there
                while True:
                    rec = board.get("trainers", "doomed", TrainerRecord)
                    if rec is not None and rec.job_id:
                        break
                    await trio.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            second = start_trainer(url, "rescuer", tmp_path / "c2")
            with trio.fail_after(120):
                while not results:
                    await trio.sleep(0.1)
            core.stopping.set()
            nursery.cancel_scope.cancel()
    finally:
        stop(first)
        if second is not None:
            stop(second)
    trained = results[0]
    assert trained.ok and trained.info["trainer"] == "rescuer", trained
    records = board.values("training", TrainRecord)
    assert len(records) == 1 and records[0].attempts == 2 and records[0].artifact == trained.artifact
    assert board.counter("training_requeued") == 1
    assert [p.name for p in (state / ARTIFACTS).glob("*.npz")] == [f"{trained.artifact}.npz"]
    assert board.get("trainers", "doomed", TrainerRecord).state == "offline"
    board.close()


async def test_a_trainer_with_a_wrong_secret_is_refused(tmp_path):
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    seen: list = []

    async def handler(envelope):
        seen.append(envelope)
        return Failure(error="should not be reached")

    async with trio.open_nursery() as nursery:
        await nursery.start(RequestServer(url, handler, secret=SECRET.encode()).serve)
        env = {**os.environ, "ENPIRE_SECRET": "wrong"}
        proc = await trio.run_process([sys.executable, "-m", "enpire.trainer", "--connect", url, "--trainer-id", "x",
                                       "--device", "cpu", "--connect-timeout", "20"],
                                      env=env, check=False, capture_stdout=True, capture_stderr=True)
        nursery.cancel_scope.cancel()
    assert proc.returncode == 3, proc.stderr.decode()[-500:]
    assert "refused our credentials" in proc.stderr.decode()
    assert not seen  # nothing it sent reached a handler


async def test_a_trainer_cannot_speak_for_another(tmp_path, monkeypatch):
    from bus.messages import Ack, TrainerHello
    from bus.transport import RequestClient, cell_key

    state = tmp_path / "state"
    board, meta = open_state_dir(state)
    monkeypatch.setenv("ENPIRE_SECRET", SECRET)
    port = free_port()
    config = cfg.with_overrides(fleet_config(port, local_slots=0), **{"cells.count": 0})
    async with trio.open_nursery() as nursery:
        core = await start_core(nursery, config, state, board, meta)
        client = RequestClient(f"tcp://127.0.0.1:{port}", sender="trainer:a",
                               secret=cell_key(SECRET.encode(), "trainer:a"))
        with trio.fail_after(30):
            await client.wait_ready()
            ok = await client.request(TrainerHello(trainer_id="a", host="h", pid=1, device="cpu"))
            forged = await client.request(TrainerHello(trainer_id="b", host="h", pid=1, device="cpu"))
        client.close()
        core.stopping.set()
        nursery.cancel_scope.cancel()
    assert ok == Ack(detail="welcome")
    assert isinstance(forged, Failure) and "cannot speak for" in forged.error
    assert board.get("trainers", "b", TrainerRecord) is None
    board.close()
