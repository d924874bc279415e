"""The lease queue and the judge in-process: leases, expiry, idempotent results, fair share, promotion,
confirmation, resume."""


import msgspec
import structlog.testing
import trio

from actors.judge import Judge
from actors.lease_queue import LeaseQueue
from actors.runtime import ActorSystem
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import (
    Ack,
    BundleRequest,
    ChampionChanged,
    EpisodeReport,
    EvalRequest,
    EvalResult,
    Hello,
    Lease,
    LeaseRequest,
    NoWork,
    PolicyBundle,
    PolicySpec,
    PromoteRequest,
    PromoteResult,
    QueueDepth,
    Verdict,
)
from bus.records import CandidateRecord, Champion, EpisodeRecord, HeldoutRecord, Tallied
from enpire import config as cfg
from enpire import heldout as pool
from enpire.bundles import BundleStore
from enpire.judging import CONFIRM_EPISODES_PER_CELL

POLICY = PolicySpec("c0ffee", {"gain": 1.0})


def _config(**sched) -> cfg.Config:
    c = cfg.Config(cells=cfg.CellsConfig(task="pusht"))
    return cfg.with_overrides(c, **{f"scheduler.{k}": v for k, v in sched.items()})


class Fleet:
    """Cells' messages go to the lease queue, agents' to the judge (as the daemon routes them)."""

    def __init__(self, queue, judge, events):
        self.queue, self.judge, self.events = queue, judge, events

    async def ask(self, msg, timeout=30.0):
        to = self.judge if isinstance(msg, EvalRequest | PromoteRequest) else self.queue
        return await to.ask(msg, timeout)


async def _start(nursery, tmp_path, config=None, board=None, set_main=None, baseline=None, ended=False):
    config = config or _config()
    board = board or Blackboard(tmp_path / "bb")
    system = ActorSystem(nursery)
    events = EventHub()
    bundles = BundleStore(lambda c: {"policy.py": b"x"})
    queue = await system.spawn("queue", lambda: LeaseQueue(config, board, bundles, tmp_path, "run", events))
    closed = ended if isinstance(ended, trio.Event) else trio.Event()  # the fleet's end of the run
    if ended is True:
        closed.set()
    judge = await system.spawn("judge", lambda: Judge(config, board, queue, events, set_main, baseline, closed))
    return Fleet(queue, judge, events), board, system


async def _eventually(check, timeout=5.0):
    """The judge hears "job done" after the queue acknowledged the last report: wait for its record."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def _hello(ref, cell="cell-0"):
    await ref.ask(Hello(cell_id=cell, driver="pusht", tasks=["pusht"], host="h", pid=1))


async def _serve(ref, n: int, cell="cell-0", success=True, wait_s=2.0) -> list[Lease]:
    """A cell runs its next `n` leases and reports each (all succeeding unless `success` is False)."""
    leases = []
    for _ in range(n):
        lease = await ref.ask(LeaseRequest(cell_id=cell, wait_s=wait_s))
        assert isinstance(lease, Lease), lease
        await ref.ask(_report(lease, success, cell))
        leases.append(lease)
    return leases


def _heldout(board, positions: range, task="pusht") -> list[int]:
    """The held-out seeds at `positions` of the task's secret order (`enpire.heldout`)."""
    return pool.order(board.get("heldout", task, HeldoutRecord), cfg.Config().task(task).heldout_seeds, positions)


def _report(lease: Lease, success: bool, cell="cell-0") -> EpisodeReport:
    return EpisodeReport(
        cell_id=cell, lease_id=lease.lease_id, episode_id=lease.episode_id,
        verdict=Verdict(success, 1.0 if success else 0.2, "success" if success else "timeout", "pusht_state"),
        attempts=[], steps=10, reset_s=0.0, run_s=0.1, verify_s=0.0,
    )


async def test_eval_job_is_leased_reported_once_and_returned(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path)
        await _hello(ref)
        result = {}

        async def agent():
            result["r"] = await ref.ask(EvalRequest(job_id="j1", agent="a", task="pusht", policy=POLICY, seeds=[1, 2]))

        nursery.start_soon(agent)
        leases = [await ref.ask(LeaseRequest(cell_id="cell-0")) for _ in range(2)]
        assert all(isinstance(lease, Lease) for lease in leases)
        assert sorted(lease.seed for lease in leases) == [1, 2]
        assert leases[0].policy == POLICY and leases[0].bundle == leases[1].bundle
        bundle = await ref.ask(BundleRequest(digest=leases[0].bundle))
        assert isinstance(bundle, PolicyBundle) and bundle.files == {"policy.py": b"x"}
        await ref.ask(_report(leases[0], True))
        dup = await ref.ask(_report(leases[0], False))  # a duplicate delivery changes nothing
        assert isinstance(dup, Ack) and "ignored" in dup.detail
        await ref.ask(_report(leases[1], False))
        with trio.fail_after(5):
            while "r" not in result:
                await trio.sleep(0.01)
        r = result["r"]
        assert isinstance(r, EvalResult) and r.successes == 1 and len(r.episodes) == 2
        assert board.get("episodes", leases[0].episode_id, EpisodeRecord).verdict.success
        assert board.counter("episodes") == 2
        nursery.cancel_scope.cancel()


async def test_expired_lease_is_requeued_and_recorded_exactly_once(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, _config(lease_s=0.3, heartbeat_s=10.0))
        await _hello(ref, "a")
        await _hello(ref, "b")
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="x", task="pusht", policy=POLICY, seeds=[7]))
        first = await ref.ask(LeaseRequest(cell_id="a"))
        assert isinstance(first, Lease)
        # cell a freezes; its lease expires and the same episode goes to cell b
        with trio.fail_after(5):
            second = await ref.ask(LeaseRequest(cell_id="b", wait_s=3))
        assert isinstance(second, Lease) and second.episode_id == first.episode_id
        assert second.lease_id != first.lease_id
        await ref.ask(_report(second, True, "b"))
        late = await ref.ask(_report(first, False, "a"))  # the frozen cell wakes up and reports
        assert "ignored" in late.detail or "already" in late.detail
        assert board.counter("episodes") == 1
        assert board.get("episodes", first.episode_id, EpisodeRecord).cell_id == "b"
        assert board.counter("episodes_requeued") == 1
        nursery.cancel_scope.cancel()


async def test_no_work_without_jobs_or_champion(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path)
        await _hello(ref)
        assert isinstance(await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.1)), NoWork)
        nursery.cancel_scope.cancel()


async def test_fair_share_between_agents(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path)
        await _hello(ref)
        nursery.start_soon(ref.ask, EvalRequest(job_id="ja", agent="a", task="pusht", policy=POLICY, seeds=list(range(10))))
        await trio.sleep(0.3)
        nursery.start_soon(ref.ask, EvalRequest(job_id="jb", agent="b", task="pusht", policy=POLICY, seeds=list(range(10))))
        await trio.sleep(0.3)
        agents = []
        for _ in range(8):
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            agents.append(lease.job_id)
        assert agents.count("ja") == 4 and agents.count("jb") == 4  # b is not starved by a's earlier job
        nursery.cancel_scope.cancel()


async def test_promotion_then_background_confirmation(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, _config(promote_seeds=20))
        await _hello(ref)
        out = {}

        async def promote():
            out["p"] = await ref.ask(PromoteRequest(job_id="p1", agent="a", task="pusht", policy=POLICY))

        nursery.start_soon(promote)
        for _ in range(20):
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            assert lease.kind == "heldout" and lease.seed in _heldout(board, range(20))
            await ref.ask(_report(lease, _heldout(board, range(20)).index(lease.seed) % 10 != 0))  # 18/20
        with trio.fail_after(5):
            while "p" not in out:
                await trio.sleep(0.01)
        p = out["p"]
        assert isinstance(p, PromoteResult) and p.promoted and (p.successes, p.n) == (18, 20)
        # idle cells now confirm the champion on held-out seeds beyond the judged ones
        seeds = set()
        for i in range(8):  # two confirmation jobs of 4 episodes per cell are queued
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            assert lease.kind == "background" and lease.seed in _heldout(board, range(20, 28))  # never judged
            seeds.add(lease.seed)
            await ref.ask(_report(lease, i != 0))
        assert len(seeds) == 8
        await _eventually(lambda: board.get("champion", "pusht", Champion).n == 8)
        champ = board.get("champion", "pusht", Champion)
        assert (champ.successes, champ.n, champ.judged_successes) == (7, 8, 18)
        nursery.cancel_scope.cancel()


async def test_agent_may_not_evaluate_on_heldout_seeds(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path)
        r = await ref.ask(EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1_000_005]))
        assert "held-out" in r.error
        nursery.cancel_scope.cancel()


async def test_queue_is_restored_after_a_restart(tmp_path):
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, board=board)
        await _hello(ref)
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1, 2, 3]))
        lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
        await ref.ask(_report(lease, True))
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # a new scheduler on the same blackboard
        ref, _, _ = await _start(nursery, tmp_path, board=board)
        await _hello(ref)
        seeds = sorted([(await ref.ask(LeaseRequest(cell_id="cell-0"))).seed for _ in range(2)])
        assert seeds == [2, 3]  # the recorded episode is not run again
        assert isinstance(await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.1)), NoWork)
        nursery.cancel_scope.cancel()


async def _judge(ref, policy, job_id, wins, n, cell="cell-0"):
    out = {}

    async def promote():
        out["p"] = await ref.ask(PromoteRequest(job_id=job_id, agent="a", task="pusht", policy=policy))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(promote)
        await trio.sleep(0.3)  # the judging job is queued before we ask for work
        for i in range(n):
            lease = await ref.ask(LeaseRequest(cell_id=cell))
            assert lease.kind == "heldout"
            await ref.ask(_report(lease, i < wins, cell))
    return out["p"]


async def _confirm(ref, wins, n, cell="cell-0"):
    for i in range(n):
        lease = await ref.ask(LeaseRequest(cell_id=cell))
        assert lease.kind == "background"
        await ref.ask(_report(lease, i < wins, cell))


async def test_a_regression_found_by_confirmation_is_rolled_back(tmp_path):
    moved = []
    config = _config(promote_seeds=20, rollback_min_n=20)
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config, board, set_main=moved.append)
        await _hello(ref)
        a, b = PolicySpec("aaaa", {}), PolicySpec("bbbb", {})
        assert (await _judge(ref, a, "pa", 10, 20)).promoted
        await _confirm(ref, 18, 20)  # A holds up: 18/20 on fresh held-out seeds
        await _eventually(lambda: board.get("champion", "pusht", Champion).n == 20)
        assert (await _judge(ref, b, "pb", 20, 20)).promoted  # B looks perfect on the judging seeds...
        assert board.get("champion", "pusht", Champion).policy == b
        await _confirm(ref, 2, 20)  # ...but fails on fresh ones: 2/20
        await _eventually(lambda: board.get("champion", "pusht", Champion).agent == "rollback")
        champ = board.get("champion", "pusht", Champion)
        assert champ.policy == a and champ.agent == "rollback"
        await _eventually(lambda: len(moved) == 3)
        assert moved == ["aaaa", "bbbb", "aaaa"]  # main followed: promotion, promotion, rollback
        nursery.cancel_scope.cancel()


async def test_a_champion_whose_confirmation_stopped_short_yields_to_a_higher_judged_rate(tmp_path):
    config = cfg.with_overrides(_config(promote_seeds=20), **{"fleet.target": 0.9, "fleet.min_heldout": 20})
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config, board)
        await _hello(ref)
        a, b, c = PolicySpec("aaaa", {}), PolicySpec("bbbb", {}), PolicySpec("cccc", {})
        assert (await _judge(ref, a, "pa", 20, 20)).promoted
        await _confirm(ref, 4, 8)  # 4/8 on fresh seeds: "met" is out of reach within its cap of 100
        await _eventually(lambda: board.get("champion", "pusht", Champion).decision == "not_met")
        lower = await _judge(ref, c, "pc", 17, 20)  # 0.85 is below A's 24/28
        assert not lower.promoted and (lower.champion_successes, lower.champion_n) == (24, 28)
        higher = await _judge(ref, b, "pb", 19, 20)  # above 24/28, though not with confidence
        assert higher.promoted and "stopped short of the target" in higher.detail
        champ = board.get("champion", "pusht", Champion)
        assert (champ.policy, champ.previous, champ.previous_successes, champ.previous_n) == (b, a, 24, 28)
        assert champ.decision == "" and champ.n == 0
        lease = await ref.ask(LeaseRequest(cell_id="cell-0"))  # and B's own confirmation starts
        assert lease.kind == "background" and lease.policy == b
        nursery.cancel_scope.cancel()


async def test_a_policy_shown_short_of_the_target_cannot_start_its_confirmation_over(tmp_path):
    """Asking again for a judged candidate re-decides its stored judging: with the confirmation tally it
    had as champion, so two refuted policies cannot take turns, each with a clean slate."""
    config = cfg.with_overrides(_config(promote_seeds=20), **{"fleet.target": 0.9, "fleet.min_heldout": 20})
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config, board)
        await _hello(ref)
        a, b = PolicySpec("aaaa", {}), PolicySpec("bbbb", {})
        assert (await _judge(ref, a, "pa", 20, 20)).promoted
        with structlog.testing.capture_logs() as logs, ref.events.subscribe(ChampionChanged) as heard:
            await _confirm(ref, 4, 8)  # A: 4/8, stopped "not_met"; record 24/28
            while not (await heard.receive()).decision:
                pass
            assert any(e["event"] == "confirmation_stopped" for e in logs)  # logged before anyone hears it
        await _eventually(lambda: board.get("champion", "pusht", Champion).decision == "not_met")
        assert (await _judge(ref, b, "pb", 19, 20)).promoted  # above 24/28
        await _confirm(ref, 3, 8)  # B: 3/8, stopped "not_met"; record 22/28
        await _eventually(lambda: board.get("champion", "pusht", Champion).decision == "not_met")
        with structlog.testing.capture_logs() as logs:
            again = await ref.ask(PromoteRequest(job_id="pa2", agent="a", task="pusht", policy=a))
        assert again.promoted and "24/28 is above 22/28" in again.detail  # A's whole record, not 20/20
        assert [(e["policy"], e["decision"]) for e in logs if e["event"] == "confirmation_stopped"] == [
            (a.ref, "not_met")]  # said at its crowning: no confirmation episode will say it
        champ = board.get("champion", "pusht", Champion)
        assert (champ.policy, champ.successes, champ.n, champ.decision) == (a, 4, 8, "not_met")
        assert isinstance(await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.3)), NoWork)  # nothing to confirm
        back = await ref.ask(PromoteRequest(job_id="pb2", agent="a", task="pusht", policy=b))
        assert not back.promoted and "22/28 is not better than 24/28" in back.detail
        assert board.get("champion", "pusht", Champion).policy == a
        nursery.cancel_scope.cancel()


async def test_real_cells_run_only_smoke_tested_policies(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path)
        await ref.ask(Hello(cell_id="robot", driver="pusht", tasks=["pusht"], host="lab", pid=2, real=True))
        await _hello(ref, "sim")
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1, 2]))
        await trio.sleep(0.3)
        assert isinstance(await ref.ask(LeaseRequest(cell_id="robot", wait_s=0.2)), NoWork)  # not smoke-tested yet
        # the sim cell gets the smoke episodes first (higher priority), then the job itself
        smoke = [await ref.ask(LeaseRequest(cell_id="sim")) for _ in range(5)]
        assert all(lease.job_id.startswith("smoke-") for lease in smoke)
        for lease in smoke:
            await ref.ask(_report(lease, True, "sim"))
        lease = await ref.ask(LeaseRequest(cell_id="robot", wait_s=1))
        assert isinstance(lease, Lease) and lease.job_id == "j"
        nursery.cancel_scope.cancel()


async def test_episode_budget_is_enforced(tmp_path):
    async with trio.open_nursery() as nursery:
        config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **{"agents.episode_budget": 5})
        ref, _, _ = await _start(nursery, tmp_path, config)
        nursery.start_soon(ref.ask, EvalRequest(job_id="j1", agent="a", task="pusht", policy=POLICY, seeds=[1, 2, 3]))
        await trio.sleep(0.3)
        r = await ref.ask(EvalRequest(job_id="j2", agent="a", task="pusht", policy=POLICY, seeds=[4, 5, 6]))
        assert "budget exhausted" in r.error
        nursery.cancel_scope.cancel()


async def test_unpooled_cells_run_only_their_own_agents_work(tmp_path):
    """`pooled = false` (the paper's set-up): agent-i's evaluations and judging go only to cell-i; no background."""
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, _config(pooled=False))
        await _hello(ref, "cell-0")
        await _hello(ref, "cell-1")
        nursery.start_soon(ref.ask, EvalRequest(job_id="j0", agent="agent-0", task="pusht", policy=POLICY,
                                                seeds=list(range(3))))
        nursery.start_soon(ref.ask, PromoteRequest(job_id="p1", agent="agent-1", task="pusht", policy=POLICY))
        await trio.sleep(0.3)
        assert [lease.job_id for lease in await _serve(ref, 3, wait_s=0.1)] == ["j0"] * 3
        # agent-0 has nothing left: cell-0 waits although agent-1's judging is queued
        assert isinstance(await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.1)), NoWork)
        lease = await ref.ask(LeaseRequest(cell_id="cell-1", wait_s=0.1))
        assert isinstance(lease, Lease) and lease.job_id == "p1" and lease.kind == "heldout"
        # with a champion on the board, an unpooled idle cell still gets no background work
        board.put("champion", "pusht", Champion("pusht", POLICY, 10, 10, 0.0, agent="agent-0"))
        assert isinstance(await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.1)), NoWork)
        nursery.cancel_scope.cancel()


def _report_steps(lease: Lease, success: bool, steps: int, cell="cell-0", flagged="") -> EpisodeReport:
    return EpisodeReport(
        cell_id=cell, lease_id=lease.lease_id, episode_id=lease.episode_id,
        verdict=Verdict(success, 1.0 if success else 0.5, "success" if success else "timeout", "pusht_state"),
        attempts=[], steps=steps, reset_s=0.0, run_s=0.1, verify_s=0.0, flagged=flagged,
    )


async def test_the_leaderboard_tallies_every_agents_evaluations_of_a_candidate(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path)
        await _hello(ref)
        key = f"pusht/{POLICY.ref}"
        nursery.start_soon(ref.ask, EvalRequest(job_id="ja", agent="a", task="pusht", policy=POLICY, seeds=[1, 2]))
        await trio.sleep(0.3)
        nursery.start_soon(ref.ask, EvalRequest(job_id="jb", agent="b", task="pusht", policy=POLICY, seeds=[3, 4, 5]))
        await trio.sleep(0.3)
        c = board.get("candidates", key, CandidateRecord)
        assert (c.pending, c.n, c.agent) == (5, 0, "a")  # teammates see what is running
        leases = [await ref.ask(LeaseRequest(cell_id="cell-0")) for _ in range(5)]
        flagged = next(lease for lease in leases if lease.seed == 4)
        for lease in leases:  # a flagged episode (solved at reset) is replaced, never counted
            await ref.ask(_report_steps(lease, lease.seed != 5, 40, flagged="at_reset" if lease is flagged else ""))
        replacement = await ref.ask(LeaseRequest(cell_id="cell-0"))
        await ref.ask(_report_steps(replacement, True, 60))
        with trio.fail_after(5):
            while board.get("candidates", key, CandidateRecord).pending:
                await trio.sleep(0.01)
        c = board.get("candidates", key, CandidateRecord)
        assert (c.successes, c.n, c.steps) == (4, 5, 40 * 4 + 60)
        assert abs(c.progress - 4.5) < 1e-9
        nursery.cancel_scope.cancel()


async def test_a_candidate_is_judged_once_however_many_agents_promote_it(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, _config(promote_seeds=10))
        await _hello(ref)
        out = {}

        async def promote(agent, job):
            out[agent] = await ref.ask(PromoteRequest(job_id=job, agent=agent, task="pusht", policy=POLICY))

        nursery.start_soon(promote, "a", "pa")
        await trio.sleep(0.3)
        nursery.start_soon(promote, "b", "pb")
        await trio.sleep(0.3)
        assert {lease.job_id for lease in await _serve(ref, 10)} == {"pa"}
        with trio.fail_after(5):
            while len(out) < 2:
                await trio.sleep(0.01)
        assert out["a"].promoted and out["b"].promoted and out["b"].n == 10
        # crowned once: the second to hear the verdict finds it the champion already
        assert sorted(r.detail == "already the champion" for r in out.values()) == [False, True]
        lease = await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.1))
        assert lease.kind == "background"  # no second judging: the idle cell confirms the champion
        nursery.cancel_scope.cancel()


async def test_idle_cells_judge_the_baseline_until_there_is_a_champion(tmp_path):
    config = _config(promote_seeds=4)
    board = Blackboard(tmp_path / "bb")
    baseline = PolicySpec("ba5e", {})
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config, board, baseline=baseline)
        await _hello(ref)
        first = await ref.ask(LeaseRequest(cell_id="cell-0"))
        assert first.kind == "background" and first.job_id.startswith("baseline-")
        assert first.seed == _heldout(board, range(1))[0]
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[7]))
        await trio.sleep(0.3)
        assert (await ref.ask(LeaseRequest(cell_id="cell-0"))).job_id == "j"  # agents' work goes first
        await ref.ask(_report(first, True))
        for i in range(3):
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            assert lease.job_id == first.job_id
            await ref.ask(_report(lease, i == 0))
        await _eventually(lambda: board.get("champion", "pusht", Champion) is not None)
        champ = board.get("champion", "pusht", Champion)
        assert champ.policy == baseline and (champ.judged_successes, champ.judged_n, champ.agent) == (2, 4, "baseline")
        lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
        assert lease.kind == "background" and lease.seed in _heldout(board, range(4, 12))  # then its confirmation, as for any champion
        nursery.cancel_scope.cancel()


async def test_a_champion_that_may_meet_the_target_is_confirmed_before_queued_experiments(tmp_path):
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **{"fleet.min_heldout": 2, "fleet.target": 0.5,
                                                  "scheduler.promote_seeds": 20})
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, config)
        await _hello(ref)
        assert (await _judge(ref, POLICY, "p", 19, 20)).promoted  # 19/20 does not rule out the target
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[1, 2, 3]))
        await trio.sleep(0.3)
        kinds = []
        while board.get("champion", "pusht", Champion).decision != "met":
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            kinds.append(lease.kind)
            await ref.ask(_report(lease, True))
            if len(kinds) % CONFIRM_EPISODES_PER_CELL == 0:  # a confirmation job ended: the judge counts it
                await _eventually(lambda: board.get("champion", "pusht", Champion).n == len(kinds))
        # the sequential rule (target 0.5, alpha 0.05) says "met" after 8 straight successes: the run may end
        assert kinds == ["background"] * 8
        assert [(await ref.ask(LeaseRequest(cell_id="cell-0"))).kind for _ in range(3)] == ["agent"] * 3
        nursery.cancel_scope.cancel()


async def test_a_champion_whose_judging_rules_out_the_target_is_confirmed_by_idle_cells_only(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, _config(promote_seeds=20))
        await _hello(ref)
        assert (await _judge(ref, POLICY, "p", 10, 20)).promoted  # 10/20: Wilson upper bound 0.70 < 0.9
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=POLICY, seeds=[4]))
        await trio.sleep(0.3)
        assert (await ref.ask(LeaseRequest(cell_id="cell-0"))).kind == "agent"
        assert (await ref.ask(LeaseRequest(cell_id="cell-0"))).kind == "background"
        nursery.cancel_scope.cancel()


async def test_unpooled_promotion_is_confirmed_on_the_promoters_own_cell(tmp_path):
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **{"scheduler.pooled": False, "scheduler.promote_seeds": 3,
                                                  "fleet.min_heldout": 20})
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, config)
        await _hello(ref, "cell-0")
        await _hello(ref, "cell-1")
        nursery.start_soon(ref.ask, PromoteRequest(job_id="p", agent="agent-1", task="pusht", policy=POLICY))
        await trio.sleep(0.3)
        await _serve(ref, 3, "cell-1", wait_s=0.1)
        assert isinstance(await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.1)), NoWork)
        # two jobs of 4 episodes per cell (2 cells), all on the promoter's own cell
        confirm = await _serve(ref, 16, "cell-1", wait_s=0.1)
        assert all(lease.kind == "background" and lease.job_id.startswith("confirm-") for lease in confirm)
        seeds = [lease.seed for lease in confirm]
        # fresh seeds after the 3 it was judged on
        assert len(set(seeds)) == 16 and set(seeds) <= set(_heldout(board, range(3, 19)))
        await _eventually(lambda: board.get("champion", "pusht", Champion).n == 16)
        champ = board.get("champion", "pusht", Champion)
        assert (champ.successes, champ.n) == (16, 16)
        nursery.cancel_scope.cancel()


async def test_a_promotion_ends_the_baselines_judging(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, _config(promote_seeds=4), baseline=PolicySpec("ba5e", {}))
        await _hello(ref)
        first = await ref.ask(LeaseRequest(cell_id="cell-0"))
        assert first.job_id.startswith("baseline-") and first.seed == _heldout(board, range(1))[0]
        assert (await _judge(ref, POLICY, "p", 3, 4)).promoted  # judged on fresh seeds: positions 4..7
        lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
        assert lease.job_id.startswith("confirm-") and lease.seed in _heldout(board, range(8, 16))  # no more baseline episodes
        assert isinstance(await ref.ask(_report(first, True)), Ack)  # its late report is acknowledged, not counted
        await trio.sleep(0.3)
        assert board.get("champion", "pusht", Champion).policy == POLICY
        nursery.cancel_scope.cancel()


async def test_more_episodes_of_a_measured_candidate_go_before_first_looks(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path)
        await _hello(ref)
        nursery.start_soon(ref.ask, EvalRequest(job_id="j1", agent="a", task="pusht", policy=POLICY, seeds=[1]))
        await trio.sleep(0.3)
        await ref.ask(_report(await ref.ask(LeaseRequest(cell_id="cell-0")), True))
        other = PolicySpec("c0ffee", {"gain": 2.0})
        nursery.start_soon(ref.ask, EvalRequest(job_id="new", agent="b", task="pusht", policy=other, seeds=[2, 3]))
        await trio.sleep(0.3)
        nursery.start_soon(ref.ask, EvalRequest(job_id="more", agent="c", task="pusht", policy=POLICY, seeds=[4, 5]))
        await trio.sleep(0.3)
        assert [lease.job_id for lease in await _serve(ref, 4)] == ["more", "more", "new", "new"]
        nursery.cancel_scope.cancel()


async def test_judging_a_candidate_is_not_charged_to_the_promoting_agents_share(tmp_path):
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, _config(promote_seeds=4))
        await _hello(ref)
        assert (await _judge(ref, POLICY, "p", 1, 4)).promoted  # agent "a" asked for 4 held-out episodes
        nursery.start_soon(ref.ask, EvalRequest(job_id="ja", agent="a", task="pusht", policy=POLICY, seeds=[1, 2]))
        await trio.sleep(0.3)
        nursery.start_soon(ref.ask, EvalRequest(job_id="jb", agent="b", task="pusht", policy=POLICY, seeds=[3, 4]))
        await trio.sleep(0.3)
        jobs = [lease.job_id for lease in await _serve(ref, 2)]
        assert jobs == ["ja", "jb"] or jobs == ["jb", "ja"]  # served alternately, "a" not pushed back
        nursery.cancel_scope.cancel()


async def test_a_stop_made_against_another_target_is_decided_again_at_start(tmp_path):
    """A run resumed with a higher [fleet] target does not inherit the earlier run's "met"."""
    board = Blackboard(tmp_path / "bb")
    earlier = Champion("pusht", POLICY, judged_successes=40, judged_n=40, promoted=0.0, successes=60, n=64,
                       decision="met", decision_target=0.8)
    board.put("champion", "pusht", earlier)
    config = cfg.with_overrides(_config(), **{"fleet.target": 0.95})
    async with trio.open_nursery() as nursery:
        fleet, board, _ = await _start(nursery, tmp_path, config, board=board)
        champ = board.get("champion", "pusht", Champion)
        assert (champ.decision, champ.decision_target, champ.successes, champ.n) == ("", 0.0, 60, 64)  # go on
        assert fleet.events.latest(ChampionChanged).decision == ""  # what the fleet and agents hear
        nursery.cancel_scope.cancel()


async def test_a_job_finished_before_a_crash_is_counted_once_at_the_restart(tmp_path):
    """The queue records "done" before the judge counts the job: a kill in between leaves a finished job
    uncounted on disk. The next start counts it, and the start after that does not count it again."""
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, _config(promote_seeds=20), board)
        await _hello(ref)
        nursery.start_soon(ref.ask, EvalRequest(job_id="e", agent="a", task="pusht", policy=POLICY, seeds=[1, 2]))
        first = await ref.ask(LeaseRequest(cell_id="cell-0"))
        await ref.ask(_report_steps(first, True, 40, flagged="at_reset"))  # solved at reset: replaced
        await _serve(ref, 2)
        assert (await _judge(ref, POLICY, "p", 18, 20)).promoted
        await _confirm(ref, 3, 4)  # one confirmation job
        await _eventually(lambda: board.get("champion", "pusht", Champion).n == 4)
        nursery.cancel_scope.cancel()
    counted = board.get("champion", "pusht", Champion)
    candidate = board.get("candidates", f"pusht/{POLICY.ref}", CandidateRecord)
    assert (counted.successes, counted.n, candidate.n) == (3, 4, 2)
    # what a kill between "done" and the count leaves: the jobs finished, the tallies without them
    with board.write() as w:
        w.put("champion", "pusht", msgspec.structs.replace(counted, successes=0, n=0))
        w.put("candidates", f"pusht/{POLICY.ref}", msgspec.structs.replace(candidate, successes=0, n=0, pending=2))
        for job_id in [k for k, _ in w.items("tallied", Tallied)]:
            w.delete("tallied", job_id)
    for _ in range(2):  # counted at the first restart, not again at the second
        async with trio.open_nursery() as nursery:
            await _start(nursery, tmp_path, _config(promote_seeds=20), board)
            await _eventually(lambda: board.get("champion", "pusht", Champion).n == 4)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        champion = board.get("champion", "pusht", Champion)
        candidate = board.get("candidates", f"pusht/{POLICY.ref}", CandidateRecord)
        assert (champion.successes, champion.n) == (3, 4) and (candidate.successes, candidate.n, candidate.pending) == (2, 2, 0)


async def test_an_evaluation_and_a_judging_a_restart_interrupted_count_though_their_agent_is_gone(tmp_path):
    board, key = Blackboard(tmp_path / "bb"), f"pusht/{POLICY.ref}"
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, _config(promote_seeds=4), board)
        await _hello(ref)
        nursery.start_soon(ref.ask, EvalRequest(job_id="e", agent="a", task="pusht", policy=POLICY, seeds=[1, 2, 3]))
        await _serve(ref, 1)
        nursery.start_soon(ref.ask, PromoteRequest(job_id="p", agent="a", task="pusht", policy=POLICY))
        await trio.sleep(0.3)
        assert all(lease.kind == "heldout" for lease in await _serve(ref, 2))
        nursery.cancel_scope.cancel()  # the daemon dies, and the agent's requests with it
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, _config(promote_seeds=4), board)
        await _hello(ref)
        await _serve(ref, 4)  # the queue runs the rest; nobody asks for the results again
        await _eventually(lambda: board.get("candidates", key, CandidateRecord).n == 3)
        await _eventually(lambda: board.get("champion", "pusht", Champion) is not None)
        c = board.get("candidates", key, CandidateRecord)
        assert (c.successes, c.pending, c.judged) == (3, 0, "promoted")
        assert board.get("champion", "pusht", Champion).policy == POLICY
        nursery.cancel_scope.cancel()


async def test_a_judging_finished_before_a_crash_is_decided_at_the_restart(tmp_path):
    """A kill between the queue's "done" of a judging and its decision left the candidate marked "judging"
    and no champion: the next start decides it from its recorded episodes (no episode runs again)."""
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, _config(promote_seeds=10, background=False), board)
        await _hello(ref)
        assert (await _judge(ref, POLICY, "p", 10, 10)).promoted
        nursery.cancel_scope.cancel()
    key = f"pusht/{POLICY.ref}"
    with board.write() as w:  # what the kill left: the job done, no decision
        w.delete("champion", "pusht")
        w.put("candidates", key, msgspec.structs.replace(w.get("candidates", key, CandidateRecord), judged="judging"))
    episodes = board.counter("episodes")
    async with trio.open_nursery() as nursery:
        await _start(nursery, tmp_path, _config(promote_seeds=10, background=False), board)
        await _eventually(lambda: board.get("champion", "pusht", Champion) is not None)
        nursery.cancel_scope.cancel()
    assert board.get("champion", "pusht", Champion).policy == POLICY
    assert board.get("candidates", key, CandidateRecord).judged == "promoted" and board.counter("episodes") == episodes


async def test_an_off_course_confirmation_yields_the_cell_to_agents_and_says_so(tmp_path):
    """A champion judged 17/20 against a target of 0.9 is unlikely to be confirmed within the cap: the judge
    says so (agents search on), its confirmation runs on the idle cell, behind an agent's evaluation, and a
    merely higher record takes its place."""
    config = cfg.with_overrides(_config(promote_seeds=20), **{"fleet.target": 0.9, "fleet.min_heldout": 20})
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config)
        await _hello(ref)
        a, b = PolicySpec("aaaa", {}), PolicySpec("bbbb", {})
        assert (await _judge(ref, a, "pa", 17, 20)).promoted
        await _eventually(lambda: ref.events.latest(ChampionChanged).confirmation == "unlikely")
        nursery.start_soon(ref.ask, EvalRequest(job_id="e1", agent="a", task="pusht", policy=b, seeds=[1, 2]))
        await _eventually(lambda: ref.events.latest(QueueDepth).waiting == 2)  # queued behind nothing
        assert [lease.job_id for lease in await _serve(ref, 2)] == ["e1", "e1"]
        await _confirm(ref, 17, 20)  # on the idle cell: 34/40 in all, still unlikely
        await _eventually(lambda: ref.events.latest(ChampionChanged).n == 20)
        assert ref.events.latest(ChampionChanged).confirmation == "unlikely"
        judged = await _judge(ref, b, "pb", 19, 20)  # 19/20 is not better than 34/40 with confidence, only higher
        assert judged.promoted and "finds the target unlikely" in judged.detail
        await _eventually(lambda: ref.events.latest(ChampionChanged).policy == b)
        assert ref.events.latest(ChampionChanged).confirmation == "unlikely"  # 19/20: a chance of 31%
        nursery.cancel_scope.cancel()


async def test_a_confirmation_that_leads_goes_first_and_says_so(tmp_path):
    """A champion judged 20/20 against 0.9 is likely to be confirmed: the judge says so (agents may hold) and its
    confirmation goes before an agent's evaluation queued meanwhile. When failures take the lead away, its
    job already queued runs out (a job is counted whole or not at all) and the rest goes behind agents' work."""
    config = cfg.with_overrides(_config(promote_seeds=20), **{"fleet.target": 0.9, "fleet.min_heldout": 20})
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config)
        await _hello(ref)
        a = PolicySpec("aaaa", {})
        assert (await _judge(ref, a, "pa", 20, 20)).promoted
        await _eventually(lambda: ref.events.latest(ChampionChanged) is not None)
        assert ref.events.latest(ChampionChanged).confirmation == ""
        nursery.start_soon(ref.ask, EvalRequest(job_id="e2", agent="a", task="pusht", policy=a, seeds=[3, 4]))
        await _eventually(lambda: ref.events.latest(QueueDepth).waiting == 2)
        lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
        assert lease.kind == "background" and lease.policy == a
        await ref.ask(_report(lease, False))
        await _confirm(ref, 1, 3)  # its first job: 1/4, 21/24 in all, a chance under 1%: it loses the lead
        await _eventually(lambda: ref.events.latest(ChampionChanged).n == 4)
        assert ref.events.latest(ChampionChanged).confirmation == "unlikely"
        await _eventually(lambda: ref.events.latest(QueueDepth).background >= 8)  # its next job, behind agents
        jobs = [lease.job_id for lease in await _serve(ref, 6)]
        assert jobs[-2:] == ["e2", "e2"] and len(set(jobs[:4])) == 1 and jobs[0].startswith("confirm-"), jobs
        nursery.cancel_scope.cancel()
