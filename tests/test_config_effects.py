"""Config keys that reach the processes and actors they configure (each one observed doing its job)."""

import trio

from bus.messages import EvalRequest, LeaseRequest, PolicySpec
from enpire import cell as cell_entry
from enpire import config as cfg
from enpire.fleet import cell_command
from tests.test_scheduler import _hello, _start


def test_sandbox_limits_reach_the_cells(tmp_path):
    """[sandbox] (load_timeout_s included) is the one definition: the daemon passes it to every local cell,
    and a cell started by hand gets the same defaults."""
    text = ('[sandbox]\nact_timeout_s = 0.2\nmax_missed_deadlines = 7\nload_timeout_s = 42.0\n'
            'cpu_seconds = 99\nmemory_mb = 777\nscratch_mb = 33\npids = 21\n')
    config = cfg.decode(text, "t.toml")
    argv = cell_command(config, 0, "ipc:///x", tmp_path)[3:]  # after "python -m enpire.cell"
    limits = cell_entry.sandbox_limits(cell_entry.parse_args(argv))
    assert (limits.act_timeout_s, limits.max_missed_deadlines, limits.load_timeout_s, limits.cpu_seconds,
            limits.memory_mb, limits.scratch_mb, limits.pids) == (0.2, 7, 42.0, 99, 777, 33, 21)
    default = cell_entry.sandbox_limits(cell_entry.parse_args(["--connect", "ipc:///x", "--cell-id", "c"]))
    sb = cfg.SandboxConfig()
    assert (default.load_timeout_s, default.cpu_seconds, default.memory_mb) == \
        (sb.load_timeout_s, sb.cpu_seconds, sb.memory_mb)


async def test_task_attempts_is_the_k_of_an_evaluation_that_does_not_say(tmp_path):
    config = cfg.decode('[cells]\ntask = "pusht"\n[tasks.pusht]\ndriver = "pusht"\nattempts = 3\n', "t.toml")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config)
        await _hello(ref)
        policy = PolicySpec("c0ffee", {})
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=policy, seeds=[1]))
        nursery.start_soon(ref.ask, EvalRequest(job_id="k", agent="b", task="pusht", policy=policy, seeds=[2],
                                                attempts=2))
        await trio.sleep(0.3)
        leases = {lease.job_id: lease.attempts for lease in [await ref.ask(LeaseRequest(cell_id="cell-0"))
                                                               for _ in range(2)]}
        assert leases == {"j": 3, "k": 2}
        nursery.cancel_scope.cancel()


async def test_a_cell_is_leased_only_tasks_of_its_driver(tmp_path):
    """Hello.tasks (and driver) say what a cell can run: a Meta-World cell never gets a Push-T episode."""
    from bus.messages import Hello, NoWork

    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path)
        await ref.ask(Hello(cell_id="mw", driver="metaworld", tasks=["drawer-open-v3"], host="h", pid=1))
        await _hello(ref, "pt")
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=PolicySpec("c", {}),
                                                seeds=[1]))
        await trio.sleep(0.3)
        assert isinstance(await ref.ask(LeaseRequest(cell_id="mw", wait_s=0.1)), NoWork)
        assert (await ref.ask(LeaseRequest(cell_id="pt", wait_s=0.1))).job_id == "j"
        nursery.cancel_scope.cancel()


async def test_trainer_heartbeat_s_is_how_often_a_remote_trainer_beats(tmp_path):
    """[trainer] heartbeat_s travels in every leased job, and the remote trainer beats at that rate."""
    import argparse

    import msgspec

    from actors.runtime import ActorSystem
    from actors.trainer import Trainer
    from bus.blackboard import Blackboard
    from bus.messages import Ack, TrainerHello, TrainJob, TrainJobRequest, TrainRequest
    from enpire.trainer import RemoteTrainer

    config = cfg.TrainerConfig(local_slots=0, lease_s=10.0, heartbeat_s=0.1)
    async with trio.open_nursery() as nursery:
        trainer = await ActorSystem(nursery).spawn("trainer", lambda: Trainer(Blackboard(tmp_path / "bb"), tmp_path, config))
        await trainer.ask(TrainerHello(trainer_id="t", host="h", pid=1, device="cpu"))
        nursery.start_soon(trainer.ask, TrainRequest(job_id="j", agent="a", task="pusht", recipe="bc"), 30)
        job = await trainer.ask(TrainJobRequest(trainer_id="t", wait_s=5))
        assert isinstance(job, TrainJob) and (job.heartbeat_s, job.lease_s) == (0.1, 10.0)
        nursery.cancel_scope.cancel()

    class Counting:
        def __init__(self):
            self.beats = 0

        async def request(self, msg, **_):
            self.beats += 1
            return Ack()

    for given, expected in ((job, range(6, 12)), (msgspec.structs.replace(job, heartbeat_s=0.0), range(0, 1))):
        client = Counting()  # heartbeat_s 0 (an older fleet): a quarter of lease_s, so none within a second
        remote = RemoteTrainer(argparse.Namespace(trainer_id="t"), client, tmp_path, "cpu", "", 1)
        with trio.move_on_after(1.0) as scope:
            await remote._heartbeat(given, {"name": "training"}, trio.Event(), scope)
        assert client.beats in expected, (given.heartbeat_s, client.beats)
