"""The training queue in the trainer actor, driven message by message as remote trainers drive it:
held-out episodes never leave the fleet, a lapsed lease re-queues its job, a late result is refused."""

import time
from pathlib import Path

import numpy as np
import trio

from actors.runtime import ActorSystem
from actors.trainer import Trainer
from bus.blackboard import Blackboard
from bus.messages import (
    Ack,
    DataReply,
    DataRequest,
    Failure,
    NoWork,
    PolicySpec,
    TrainDone,
    TrainerHeartbeat,
    TrainerHello,
    TrainJob,
    TrainJobRequest,
    TrainRequest,
    TrainResult,
    Verdict,
)
from bus.records import EpisodeRecord, TrainerRecord, TrainRecord
from enpire import status
from enpire.config import TrainerConfig
from enpire.episodes import write_trajectory
from enpire.learning.dataset import ARTIFACTS
from enpire.learning.runner import bytes_hash, content_hash


def _episode(state: Path, board: Blackboard, name: str, kind: str, success: bool, seed: int) -> str:
    """One recorded episode (random but valid arrays); returns the content hash of its file."""
    rng = np.random.default_rng(seed)
    rel = Path("episodes") / f"{name}.npz"
    write_trajectory(state / rel, rng.uniform(0, 512, (6, 5)), rng.uniform(0, 512, (5, 2)), rng.uniform(0, 1, 5))
    board.put("episodes", name, EpisodeRecord(
        episode_id=name, job_id="j", kind=kind, task="pusht", seed=seed, policy=PolicySpec("c"), cell_id="c0",
        verdict=Verdict(success=success, score=1.0 if success else 0.2, reason="success" if success else "timeout",
                        verifier="pusht_state"),
        success_at_k=success, attempts=1, steps=5, reset_s=0, run_s=0, verify_s=0, finished=time.time() + seed,
        trajectory_file=str(rel)))
    return content_hash(state / rel)


def hello(tid: str) -> TrainerHello:
    return TrainerHello(trainer_id=tid, host="h", pid=1, device="cpu")


async def test_held_out_episodes_never_reach_a_trainer_and_a_lapsed_lease_is_requeued_once(tmp_path):
    board = Blackboard(tmp_path / "bb")
    trainable = {_episode(tmp_path, board, f"a{i}", "agent", True, i) for i in range(3)}
    private = {_episode(tmp_path, board, "h0", "heldout", True, 10), _episode(tmp_path, board, "b0", "background", True, 11),
               _episode(tmp_path, board, "f0", "agent", False, 12)}
    config = TrainerConfig(local_slots=0, lease_s=0.6, heartbeat_s=0.1)
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery)
        trainer = await system.spawn("trainer", lambda: Trainer(board, tmp_path, config))
        assert isinstance(await trainer.ask(TrainJobRequest(trainer_id="t1")), Failure)  # no hello, no job
        assert await trainer.ask(hello("t1")) == Ack(detail="welcome")
        assert isinstance(await trainer.ask(TrainJobRequest(trainer_id="t1", wait_s=0.05)), NoWork)

        results: list = []

        async def agent() -> None:
            results.append(await trainer.ask(TrainRequest(job_id="job1", agent="a", task="pusht", recipe="bc"), 30))

        nursery.start_soon(agent)
        job = await trainer.ask(TrainJobRequest(trainer_id="t1", wait_s=5))
        assert isinstance(job, TrainJob) and job.job_id == "job1"
        assert {e.sha for e in job.episodes} == trainable  # agents' successes only
        for sha in private:  # held-out, background and failed episodes cannot be fetched, even by hash
            refused = await trainer.ask(DataRequest(trainer_id="t1", lease_id=job.lease_id, hashes=[sha]))
            assert isinstance(refused, Failure) and "not part of job job1" in refused.error
        data = await trainer.ask(DataRequest(trainer_id="t1", lease_id=job.lease_id, hashes=sorted(trainable)))
        assert isinstance(data, DataReply) and {bytes_hash(b) for b in data.files.values()} == trainable
        assert isinstance(await trainer.ask(DataRequest(trainer_id="t2", lease_id=job.lease_id,
                                                        hashes=sorted(trainable))), Failure)  # not t2's lease
        assert board.get("trainers", "t1", TrainerRecord).job_id == "job1"

        # t1 goes silent: the lease lapses and the job goes back to the queue, to t2
        await trio.sleep(1.5)
        assert board.counter("training_requeued") == 1
        assert board.get("trainers", "t1", TrainerRecord).state == "offline"
        lapsed = await trainer.ask(TrainerHeartbeat(trainer_id="t1", lease_id=job.lease_id, state="training"))
        assert isinstance(lapsed, Ack) and not lapsed.ok
        await trainer.ask(hello("t2"))
        job2 = await trainer.ask(TrainJobRequest(trainer_id="t2", wait_s=5))
        assert isinstance(job2, TrainJob) and job2.job_id == "job1" and job2.lease_id != job.lease_id
        assert job2.episodes == job.episodes  # the same selection on every attempt
        assert (await trainer.ask(TrainerHeartbeat(trainer_id="t2", lease_id=job2.lease_id, state="training"))).ok

        # t1's late result is refused; t2's is recorded, once
        late = await trainer.ask(TrainDone(trainer_id="t1", lease_id=job.lease_id, job_id="job1", ok=True,
                                           weights=b"t1 weights", metrics={"samples_per_s": 5.0}))
        assert isinstance(late, Ack) and not late.ok and not results
        weights = b"t2 weights"
        ok = await trainer.ask(TrainDone(trainer_id="t2", lease_id=job2.lease_id, job_id="job1", ok=True,
                                         weights=weights, metrics={"samples_per_s": 7.0},
                                         info={"device": "cuda:0", "gpu": "Test GPU"}))
        assert ok == Ack(detail="recorded")
        again = await trainer.ask(TrainDone(trainer_id="t2", lease_id=job2.lease_id, job_id="job1", ok=True,
                                            weights=b"other"))
        assert not again.ok
        with trio.fail_after(5):
            while not results:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    result = results[0]
    assert isinstance(result, TrainResult) and result.ok and result.artifact == bytes_hash(weights)
    assert result.info["trainer"] == "t2" and result.info["gpu"] == "Test GPU"
    assert sorted(p.name for p in (tmp_path / ARTIFACTS).iterdir()) == [f"{result.artifact}.json",
                                                                       f"{result.artifact}.npz"]
    record = board.get("training", "job1", TrainRecord)
    assert record.attempts == 2 and record.info["trainer"] == "t2"
    t2 = board.get("trainers", "t2", TrainerRecord)
    assert t2.jobs_done == 1 and t2.samples_per_s == 7.0 and t2.state == "idle"
    shown = status._collect(board, time.time())  # status shows trainers beside cells
    assert shown["trainers"]["t2"]["samples_per_s"] == 7.0 and shown["training_requeued"] == 1
    assert "trainer t2" in status.render(shown) and "7 samples/s" in status.render(shown)
    board.close()


async def _refused_job(tmp_path, board: Blackboard, recipe: str, options: dict[str, str]) -> TrainResult:
    """What an agent hears of a job the trainer cannot build (a remote trainer is asking for work)."""
    async with trio.open_nursery() as nursery:
        system = ActorSystem(nursery)
        trainer = await system.spawn("trainer", lambda: Trainer(board, tmp_path, TrainerConfig(local_slots=0)))
        await trainer.ask(hello("t1"))
        results: list = []

        async def agent() -> None:
            results.append(await trainer.ask(TrainRequest(job_id="j", agent="a", task="pusht", recipe=recipe,
                                                          options=options), 30))

        nursery.start_soon(agent)
        assert isinstance(await trainer.ask(TrainJobRequest(trainer_id="t1", wait_s=2)), NoWork)
        with trio.fail_after(5):
            while not results:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return results[0]


async def test_a_job_with_a_bad_option_fails_in_one_line(tmp_path):
    board = Blackboard(tmp_path / "bb")
    _episode(tmp_path, board, "a0", "agent", True, 0)
    result = await _refused_job(tmp_path, board, "bc", {"max_episodes": "many"})
    assert not result.ok and result.error == "option max_episodes='many' is not a valid int"
    board.close()


async def test_an_init_artifact_is_a_hash_never_a_path(tmp_path):
    """A 32-character path to an existing .npz (here a held-out episode) is no checkpoint name."""
    board = Blackboard(tmp_path / "bb")
    _episode(tmp_path, board, "a0", "agent", True, 0)
    _episode(tmp_path, board, "h0", "heldout", True, 1)
    (tmp_path / ARTIFACTS).mkdir(parents=True, exist_ok=True)
    escape = "./" * 9 + "../episodes/h0"  # 32 characters, as a hash has
    assert len(escape) == 32 and (tmp_path / ARTIFACTS / f"{escape}.npz").resolve().exists()
    result = await _refused_job(tmp_path, board, "rl", {"init_artifact": escape})
    assert not result.ok and "no checkpoint of that hash" in result.error
    board.close()
