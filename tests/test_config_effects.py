"""Config keys that reach the processes and actors they configure (each one observed doing its job)."""

import msgspec
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


async def test_scheduler_smoke_seeds_is_the_length_of_a_smoke_test(tmp_path):
    """A real cell runs a policy only after `smoke_seeds` faultless simulated episodes of it."""
    from bus.messages import Hello, Lease, NoWork
    from bus.records import JobRecord
    from tests.test_scheduler import POLICY, _config, _eventually, _report

    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, _config(smoke_seeds=3))
        await ref.ask(Hello(cell_id="robot", driver="pusht", tasks=["pusht"], host="lab", pid=2, real=True))
        await _hello(ref, "sim")
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1, 2]))
        await _eventually(lambda: board.get("jobs", "j", JobRecord) is not None)
        assert isinstance(await ref.ask(LeaseRequest(cell_id="robot", wait_s=0.2)), NoWork)  # asks for a smoke test
        await _eventually(lambda: board.get("jobs", f"smoke-{POLICY.ref}", JobRecord) is not None)
        leases = [await ref.ask(LeaseRequest(cell_id="sim")) for _ in range(3)]
        assert all(lease.job_id.startswith("smoke-") for lease in leases), leases
        assert isinstance(await ref.ask(LeaseRequest(cell_id="robot", wait_s=0.2)), NoWork)  # not reported yet
        for lease in leases:
            await ref.ask(_report(lease, True, "sim"))
        lease = await ref.ask(LeaseRequest(cell_id="robot", wait_s=1))  # the default 5 would want 2 more
        assert isinstance(lease, Lease) and lease.job_id == "j"
        nursery.cancel_scope.cancel()


async def _silent_cell_requeued(tmp_path, heartbeat_s: float) -> bool:
    """Cell a takes a lease and then says nothing (no heartbeat, no report); cell b keeps beating. Whether
    a's episode goes to b within 3 s (leases last 60 s, so only silence can free it)."""
    from bus.messages import Heartbeat, Lease
    from tests.test_scheduler import POLICY, _config

    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, _config(lease_s=60.0, heartbeat_s=heartbeat_s))
        await _hello(ref, "a")
        await _hello(ref, "b")

        async def beat_b():
            while True:
                await ref.ask(Heartbeat(cell_id="b", state="idle"))
                await trio.sleep(0.05)

        nursery.start_soon(beat_b)
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="x", task="pusht", policy=POLICY, seeds=[7]))
        first = await ref.ask(LeaseRequest(cell_id="a"))
        second = await ref.ask(LeaseRequest(cell_id="b", wait_s=3.0))
        nursery.cancel_scope.cancel()
        return isinstance(second, Lease) and second.episode_id == first.episode_id


async def test_scheduler_heartbeat_s_is_how_soon_a_silent_cells_lease_goes_to_another(tmp_path):
    assert await _silent_cell_requeued(tmp_path / "quick", heartbeat_s=0.1)  # silent after 4 x 0.1 + 1 s
    assert not await _silent_cell_requeued(tmp_path / "slow", heartbeat_s=30.0)


async def test_task_record_trajectories_false_keeps_no_trajectory(tmp_path):
    import numpy as np

    from bus.messages import Array, Lease, Trajectory
    from bus.records import EpisodeRecord
    from tests.test_scheduler import POLICY, _report

    steps = Array.of(np.zeros((3, 2), np.float32))
    for record in (True, False):
        config = cfg.decode(f'[cells]\ntask = "pusht"\n[tasks.pusht]\ndriver = "pusht"\n'
                            f'record_trajectories = {str(record).lower()}\n', "t.toml")
        state = tmp_path / str(record)
        async with trio.open_nursery() as nursery:
            ref, board, _ = await _start(nursery, state, config)
            await _hello(ref)
            nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1]))
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            assert isinstance(lease, Lease)
            report = _report(lease, True)
            await ref.ask(msgspec.structs.replace(report, trajectory=Trajectory(steps, steps, steps)))
            episode = board.get("episodes", lease.episode_id, EpisodeRecord)
            assert bool(episode.trajectory_file) is record
            assert any(state.rglob("*.npz")) is record
            nursery.cancel_scope.cancel()


def test_cells_cpu_pinning_gives_each_local_cell_a_cpu_or_none(tmp_path):
    import os

    cpus = sorted(os.sched_getaffinity(0))

    def cpu_of(pinning: str, count: int, index: int) -> int | None:
        config = cfg.decode(f'[cells]\ncount = {count}\ncpu_pinning = "{pinning}"\n', "t.toml")
        argv = cell_command(config, index, "ipc:///x", tmp_path)
        return int(argv[argv.index("--cpu") + 1]) if "--cpu" in argv else None

    assert cpu_of("on", 1, 0) == cpus[0] and cpu_of("on", 2, len(cpus)) == cpus[0]  # round robin
    assert cpu_of("off", len(cpus) + 1, 0) is None
    assert cpu_of("auto", len(cpus), 1) == cpus[1 % len(cpus)]  # as many cells as CPUs: one each
    if len(cpus) > 1:
        assert cpu_of("auto", 1, 0) is None  # spare CPUs: the OS places the policy beside its cell


def test_fleet_map_size_mb_is_the_blackboards_initial_map(tmp_path):
    from enpire.fleet import open_state_dir

    for mb in (8, 64):
        board, _ = open_state_dir(tmp_path / str(mb), mb)
        assert board.map_size == mb << 20
        board.close()


def test_agents_wall_budget_minutes_and_request_timeout_s_reach_the_model_agent(monkeypatch):
    from enpire.agents.backends import make_backend, make_client

    config = cfg.decode('[agents]\nbackend = "openai"\nmodel = "m"\nbase_url = "http://127.0.0.1:9/v1"\n'
                        'wall_budget_minutes = 2.5\nrequest_timeout_s = 7.0\nmax_turns_window = 6\n'
                        'context_chars = 5000\n', "t.toml")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    agent = make_backend(config, 0)
    assert agent.settings.wall_budget_s == 150.0
    assert (agent.window.max_turns, agent.window.max_chars) == (6, 5000)
    assert make_client(config, 0)._client.timeout == 7.0


def test_the_prompt_window_keeps_max_turns_and_max_chars():
    """Past `max_turns_window` turns, or `context_chars` characters, the oldest half of the turns become
    journal lines at once (the prompt's cached prefix changes once every many turns)."""
    from enpire.agents.model import ModelReply, Turn, Usage
    from enpire.agents.prompt import Window

    def turn(i: int, chars: int = 10) -> Turn:
        return Turn(reply=ModelReply(text=f"{i}:" + "x" * chars, calls=[], usage=Usage()), outputs=[])

    window = Window(max_turns=4, max_chars=10_000, journal_lines=50)
    for i in range(5):
        window.add(turn(i))
    assert len(window.turns) == 2 and len(window.journal) == 3  # the fifth turn: the oldest half went
    window = Window(max_turns=100, max_chars=1_000, journal_lines=50)
    for i in range(4):
        window.add(turn(i, 300))
    assert window.chars() <= 1_000 and len(window.journal) >= 1 and window.turns[-1].reply.text.startswith("3:")
