"""Held-out seeds that stay held out: fresh seeds per judging, a sequential stop rule with a stated error
rate, the pool's use published and warned about."""

import numpy as np
import pytest
import trio

from bus.events import EventHub
from bus.messages import EvalRequest, HeldoutUsage, LeaseRequest, PolicySpec, PromoteRequest
from bus.records import Champion, EpisodeRecord, HeldoutRecord
from enpire import config as cfg
from enpire.heldout import order
from enpire.metrics import sprt
from tests.test_scheduler import _eventually, _hello, _judge, _report, _start

TARGET, ALPHA, MIN_N, MAX_N = 0.9, 0.05, 100, 500


def _stops(p: float, runs: int, rule, seed: int = 0) -> float:
    """Share of simulated confirmations of a policy of true rate p that end with "target met"."""
    rng = np.random.default_rng(seed)
    outcomes = rng.random((runs, MAX_N)) < p
    met = 0
    for row in outcomes:
        s = np.cumsum(row)
        met += any(rule(int(s[n - 1]), n) == "met" for n in range(1, MAX_N + 1))
    return met / runs


def _point_estimate(s: int, n: int) -> str:
    """The old rule: at least MIN_N episodes and the running rate at the target, checked every episode."""
    return "met" if n >= MIN_N and s / n >= TARGET else ""


def _sequential(s: int, n: int) -> str:
    return sprt(s, n, TARGET, ALPHA, min_n=MIN_N, max_n=MAX_N)


def test_sequential_rule_false_stop_rate_for_a_policy_just_below_the_target():
    """A policy at 0.89 (target 0.9): the sequential rule says "met" in at most alpha of runs (Ville's
    inequality bounds it at 0.05; measured here: 19 of 2,000 simulated confirmations of up to 500
    episodes, 0.95%). The point-estimate rule it replaces stops falsely in 68.5% of the same runs."""
    runs = 2000
    sequential = _stops(TARGET - 0.01, runs, _sequential)
    naive = _stops(TARGET - 0.01, runs, _point_estimate)
    # 3 binomial standard errors above alpha still fails a rule that does not hold its error rate
    assert sequential <= ALPHA + 3 * (ALPHA * (1 - ALPHA) / runs) ** 0.5, sequential
    assert naive > 0.2, naive  # the simulation can tell a leaky rule apart
    assert sequential < naive / 5


def test_sequential_rule_stops_for_good_policies_and_gives_up_on_bad_ones():
    assert sprt(100, 100, TARGET, ALPHA, min_n=MIN_N) == "met"  # 100 straight successes: at the floor
    assert sprt(99, 99, TARGET, ALPHA, min_n=MIN_N) == ""  # never before the floor
    assert _stops(0.97, 200, _sequential, seed=1) > 0.9  # a policy well above the target is confirmed
    assert sprt(60, 80, TARGET, ALPHA, max_n=MAX_N) == "unlikely"  # 75% looks unlikely: idle cells only
    assert sprt(450, 500, TARGET, ALPHA, min_n=MIN_N, max_n=MAX_N) == "not_met"  # at the cap: stop


def _without_futility(s: int, n: int) -> str:
    """The rule before its futility stop: "not_met" only at the cap."""
    state = sprt(s, n, TARGET, ALPHA, min_n=MIN_N)
    return "not_met" if state != "met" and n >= MAX_N else state


def test_sequential_rule_stops_once_met_is_out_of_reach_without_losing_a_met():
    """On the same simulated paths, the futility stop says "met" exactly when the cap-only rule does, and
    ends a confirmation of a policy near the target far sooner (it used to run all MAX_N episodes)."""
    rng = np.random.default_rng(7)
    stopped_at = {"futility": [], "cap": []}
    for p in (0.85, 0.9, 0.92, 0.95, 0.97):
        for row in rng.random((200, MAX_N)) < p:
            s = np.cumsum(row)
            ends = {}
            for name, rule in (("futility", _sequential), ("cap", _without_futility)):
                n = next(n for n in range(1, MAX_N + 1) if rule(int(s[n - 1]), n) in ("met", "not_met"))
                ends[name] = (rule(int(s[n - 1]), n), n)
                if p == 0.92:
                    stopped_at[name].append(n)
            assert ends["futility"][0] == ends["cap"][0], (p, ends)
            assert ends["futility"][1] <= ends["cap"][1]
            if ends["futility"][0] == "met":
                assert ends["futility"][1] == ends["cap"][1]
    # at 0.92 (floor 100, cap 500): a mean of 345 episodes instead of 428 on these paths
    assert np.mean(stopped_at["futility"]) < 0.85 * np.mean(stopped_at["cap"]), stopped_at
    # target 0.9, floor 40, cap 200: 56 straight successes say "met", so 11 failures rule it out
    assert sprt(39, 50, TARGET, ALPHA, min_n=40, max_n=200) == "not_met"
    assert sprt(40, 50, TARGET, ALPHA, min_n=40, max_n=200) == "unlikely"
    # Wald's ratio does not act on a few early failures before the floor: 0/4 and 4/8 go on (whether the
    # confirmation still leads is the judge's forecast over the whole held-out record: judging.leads)
    assert sprt(0, 4, TARGET, ALPHA) == "unlikely" and sprt(0, 4, TARGET, ALPHA, min_n=40, max_n=200) == ""
    assert sprt(4, 8, TARGET, ALPHA, min_n=40, max_n=200) == ""


def test_a_target_no_confirmation_can_show_is_refused_at_load():
    with pytest.raises(cfg.ConfigError, match=r"t.toml: fleet.target: 0.99 cannot be confirmed"):
        cfg.decode("[fleet]\ntarget = 0.99\nmin_heldout = 100\n", "t.toml")
    assert cfg.decode("[fleet]\ntarget = 0.99\nmin_heldout = 120\n", "t.toml").fleet.target == 0.99
    assert cfg.decode("[fleet]\ntarget = 1.0\nmin_heldout = 1\n", "t.toml").fleet.target == 1.0  # never met: soak


async def test_no_held_out_seed_is_judged_twice(tmp_path):
    """Baseline, two judgings, confirmation: every held-out episode has a seed of its own."""
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"scheduler.promote_seeds": 6, "fleet.min_heldout": 4, "fleet.target": 0.5})
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, config, baseline=PolicySpec("ba5e", {}))
        await _hello(ref)
        for _ in range(6):  # idle: the baseline's judging
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            assert lease.job_id.startswith("baseline-")
            await ref.ask(_report(lease, False))
        await _eventually(lambda: board.get("champion", "pusht", Champion) is not None)
        assert (await _judge(ref, PolicySpec("aaaa", {}), "pa", 4, 6)).promoted
        for _ in range(5):  # its confirmation
            lease = await ref.ask(LeaseRequest(cell_id="cell-0"))
            await ref.ask(_report(lease, True))
        out = {}

        async def promote():
            out["pb"] = await ref.ask(PromoteRequest(job_id="pb", agent="a", task="pusht",
                                                     policy=PolicySpec("bbbb", {})))
        nursery.start_soon(promote)
        while "pb" not in out:  # a decisive confirmation of the champion goes first, then the judging
            lease = await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.2))
            if hasattr(lease, "seed"):
                await ref.ask(_report(lease, True))
        assert out["pb"].n == 6  # judged (promoted or not) on 6 seeds of its own
        for _ in range(5):  # whatever confirmation is left
            lease = await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.2))
            if hasattr(lease, "seed"):
                await ref.ask(_report(lease, True))
        await trio.sleep(0.1)
        heldout = [e for e in board.values("episodes", EpisodeRecord) if e.kind != "agent"]
        seeds = [e.seed for e in heldout]
        assert len(heldout) >= 23 and len(set(seeds)) == len(seeds)
        # each judging drew its own seeds: the second candidate did not see the first one's
        by_job = {}
        for e in heldout:
            by_job.setdefault(e.job_id, set()).add(e.seed)
        assert by_job["pa"].isdisjoint(by_job["pb"])
        pool = board.get("heldout", "pusht", HeldoutRecord)
        assert pool.used >= len(set(seeds)) and set(seeds) <= set(order(pool, config.task("pusht").heldout_seeds,
                                                                          range(pool.used)))
        nursery.cancel_scope.cancel()


async def test_an_exhausted_pool_refuses_a_judging_and_a_low_pool_is_announced(tmp_path):
    config = cfg.decode('[cells]\ntask = "pusht"\n[fleet]\nmin_heldout = 2\ntarget = 0.5\nfinal_seeds = 0\n'
                        '[scheduler]\npromote_seeds = 4\nbackground = false\n[tasks.pusht]\ndriver = "pusht"\n'
                        'heldout_seeds = { start = 5000000, count = 9 }\n', "t.toml")
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, config)
        events: EventHub = ref.events
        await _hello(ref)
        usage = events.latest(HeldoutUsage)
        assert (usage.used, usage.total, usage.low) == (0, 9, False)
        assert not (await _judge(ref, PolicySpec("aaaa", {}), "pa", 0, 4)).promoted
        usage = events.latest(HeldoutUsage)  # 5 left: less than a judging (4) and a confirmation (2) need
        assert (usage.used, usage.total, usage.low) == (4, 9, True)
        assert not (await _judge(ref, PolicySpec("bbbb", {}), "pb", 0, 4)).promoted  # 8 of 9
        refused = await ref.ask(PromoteRequest(job_id="pc", agent="a", task="pusht", policy=PolicySpec("cccc", {})))
        assert "held-out pool of task 'pusht' exhausted: 8 of 9" in refused.error
        # agents' evaluations never touch the pool
        nursery.start_soon(ref.ask, EvalRequest(job_id="e", agent="a", task="pusht", policy=PolicySpec("d", {}),
                                                seeds=[1]))
        await trio.sleep(0.3)
        assert board.get("heldout", "pusht", HeldoutRecord).used == 8
        nursery.cancel_scope.cancel()


async def test_the_final_judging_pairs_the_start_and_the_champion_on_the_same_fresh_seeds(tmp_path):
    from bus.messages import FinalJudging, FinalResult
    from bus.records import FinalRecord
    from enpire.summary import final as final_summary

    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"scheduler.promote_seeds": 4, "scheduler.background": False,
                                   "scheduler.heartbeat_s": 60.0})
    start, best = PolicySpec("ba5e", {}), PolicySpec("aaaa", {})
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, config, baseline=start)
        await _hello(ref)
        assert (await _judge(ref, best, "pa", 4, 4)).promoted  # judged on the first 4 seeds of the order
        out = {}

        async def final():
            out["r"] = await ref.judge.ask(FinalJudging(task="pusht", seeds=5))
        nursery.start_soon(final)
        runs = {}
        while "r" not in out:  # the final judging goes before anything else (the champion's confirmation)
            lease = await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.2))
            if hasattr(lease, "seed"):
                if lease.job_id.startswith("final-"):
                    runs.setdefault(lease.policy.commit, []).append(lease.seed)
                first_final = lease.job_id.startswith("final-") and len(runs[lease.policy.commit]) == 1
                await ref.ask(_report(lease, lease.policy == best or first_final))  # the start: 1 of 5
        await _eventually(lambda: "r" in out)
        assert isinstance(out["r"], FinalResult)
        r = out["r"].final
        assert sorted(runs["ba5e"]) == sorted(runs["aaaa"]) == sorted(r.seeds)
        judged = {e.seed for e in board.values("episodes", EpisodeRecord) if not e.job_id.startswith("final-")}
        assert len(set(r.seeds)) == 5 and not judged & set(r.seeds)  # fresh: no other judging saw them
        assert (r.start_successes, r.start_n, r.champion_successes, r.champion_n) == (1, 5, 5, 5)
        summary = final_summary(board.get("meta", "final", FinalRecord))
        assert summary["start"]["policy"] == start.ref and summary["start"]["rate"] == 0.2
        assert summary["champion"]["wilson95"][1] == 1.0 and summary["seeds"] == {"first": r.seeds[0], "count": 5}
        nursery.cancel_scope.cancel()


async def test_a_final_judging_cut_short_goes_on_with_its_seeds_after_a_restart(tmp_path):
    """A stop signal during the final judging, then a start again: the judging goes on with the seeds it
    drew (its jobs and recorded episodes kept), draws none, and runs no recorded episode twice."""
    from bus.blackboard import Blackboard
    from bus.messages import FinalJudging, FinalResult

    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"scheduler.promote_seeds": 4, "scheduler.background": False,
                                   "scheduler.heartbeat_s": 60.0})
    start, best = PolicySpec("ba5e", {}), PolicySpec("aaaa", {})
    board = Blackboard(tmp_path / "bb")
    leased: list[tuple[str, int]] = []

    async def final_until(ref, out: dict, cut_after: int | None) -> None:
        async with trio.open_nursery() as inner:
            async def final():
                out["r"] = await ref.judge.ask(FinalJudging(task="pusht", seeds=5))
            inner.start_soon(final)
            while "r" not in out and (cut_after is None or len(leased) < cut_after):
                lease = await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.2))
                if hasattr(lease, "seed") and lease.job_id.startswith("final-"):
                    leased.append((lease.job_id, lease.seed))
                    await ref.ask(_report(lease, lease.policy == best))
                elif hasattr(lease, "seed"):
                    await ref.ask(_report(lease, True))
            inner.cancel_scope.cancel()  # cut short: the daemon stops with the judging unfinished

    async with trio.open_nursery() as nursery:  # the run: a champion, then its final judging is cut
        ref, board, _ = await _start(nursery, tmp_path, config, board=board, baseline=start)
        await _hello(ref)
        assert (await _judge(ref, best, "pa", 4, 4)).promoted
        await final_until(ref, {}, cut_after=4)
        nursery.cancel_scope.cancel()
    drawn = board.get("heldout", "pusht", HeldoutRecord).used
    first = {seed for _, seed in leased}
    async with trio.open_nursery() as nursery:  # started again, for the final judging alone
        ref, board, _ = await _start(nursery, tmp_path, config, board=board, baseline=start, ended=True)
        await _hello(ref)
        out: dict = {}
        await final_until(ref, out, cut_after=None)
        nursery.cancel_scope.cancel()
    assert isinstance(out["r"], FinalResult), out
    r = out["r"].final
    assert first <= set(r.seeds) and board.get("heldout", "pusht", HeldoutRecord).used == drawn  # none drawn
    assert len(leased) == len(set(leased)) == 10  # 5 seeds x (start, champion), each episode leased once
    assert (r.start_successes, r.start_n, r.champion_successes, r.champion_n) == (0, 5, 5, 5)
    board.close()


async def test_status_shows_the_pool_and_warns_when_it_runs_low(tmp_path):
    from enpire import status

    config = cfg.decode('[cells]\ntask = "pusht"\n[fleet]\nmin_heldout = 2\ntarget = 0.5\nfinal_seeds = 0\n'
                        '[scheduler]\npromote_seeds = 4\nbackground = false\n[tasks.pusht]\ndriver = "pusht"\n'
                        'heldout_seeds = { start = 5000000, count = 9 }\n', "t.toml")
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, config)
        await _hello(ref)
        await _judge(ref, PolicySpec("aaaa", {}), "pa", 0, 4)
        nursery.cancel_scope.cancel()
    s = status._collect(board, 0.0)
    assert s["heldout"] == {"pusht": {"used": 4, "total": 9, "draws": 1, "low": True}}
    assert "held-out pool[pusht]: 4 of 9 seeds used in 1 draws  WARNING: runs low" in status.render(s)


def test_held_out_seeds_follow_a_secret_order_of_the_whole_space(tmp_path):
    """Every seed from heldout_seeds.start up is held out; a fleet's draws walk them in an order keyed by a
    secret on its own blackboard: distinct, never tuning seeds, another order for another fleet, the same
    order on resume, and nothing in the config or the source says which seeds come."""
    import pytest

    from bus.blackboard import Blackboard
    from enpire.heldout import draw

    config = cfg.Config()
    pool = config.task("pusht").heldout_seeds
    board = Blackboard(tmp_path / "a")
    first, _ = draw(board, config, "pusht", 500)
    board.close()
    board = Blackboard(tmp_path / "a")  # a resumed fleet: the same state dir
    more, record = draw(board, config, "pusht", 500)
    seeds = first + more
    assert len(set(seeds)) == 1000 and all(pool.start <= s < 2**32 for s in seeds)
    assert set(seeds).isdisjoint(config.task("pusht").tuning_seeds.seeds())
    assert sum(s < pool.start + pool.count for s in seeds) < 5  # spread over 4 billion seeds, not the first 100k
    assert order(record, pool, range(1000)) == seeds and len(record.key) == 64  # all a resume needs
    other, _ = draw(Blackboard(tmp_path / "b"), config, "pusht", 500)
    assert set(other).isdisjoint(first)  # another fleet, another secret, other seeds
    with pytest.raises(cfg.ConfigError, match="heldout_seeds: start 50 is not above tuning_seeds"):
        cfg.decode('[tasks.pusht]\ndriver = "pusht"\nheldout_seeds = { start = 50, count = 100 }\n', "t.toml")


async def test_after_the_runs_end_a_judging_crowns_nothing_and_confirmation_stops(tmp_path):
    """The final judging begins (the run has ended): a promotion judging still running then decides nothing
    (the report's champion is the one judged), and the champion's confirmation is not topped up."""
    from bus.messages import FinalJudging, FinalResult

    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"scheduler.promote_seeds": 4, "scheduler.heartbeat_s": 60.0})
    start, best, late = PolicySpec("ba5e", {}), PolicySpec("aaaa", {}), PolicySpec("bbbb", {})
    async with trio.open_nursery() as nursery:
        ref, board, _ = await _start(nursery, tmp_path, config, baseline=start)
        await _hello(ref)
        assert (await _judge(ref, best, "pa", 2, 4)).promoted  # 2/4 over no record: its confirmation runs
        out = {}

        async def promote():
            out["p"] = await ref.ask(PromoteRequest(job_id="pb", agent="a", task="pusht", policy=late))

        async def final():
            out["r"] = await ref.judge.ask(FinalJudging(task="pusht", seeds=3))
        nursery.start_soon(promote)
        await trio.sleep(0.3)
        nursery.start_soon(final)
        await trio.sleep(0.3)
        kinds = []
        while "r" not in out or "p" not in out:
            lease = await ref.ask(LeaseRequest(cell_id="cell-0", wait_s=0.2))
            if hasattr(lease, "seed"):
                kinds.append(lease.job_id.split("-")[0])
                await ref.ask(_report(lease, True))
        assert isinstance(out["r"], FinalResult) and out["r"].final.champion == best
        assert not out["p"].promoted and "the run ended" in out["p"].detail
        from bus.records import CandidateRecord

        mark = board.get("candidates", f"pusht/{late.ref}", CandidateRecord).judged
        assert mark == "judging"  # undecided: a start that goes on with the run decides it
        assert board.get("champion", "pusht", Champion).policy == best
        assert kinds.count("final") == 6 and kinds.count("pb") == 4
        assert "confirm" not in kinds  # the confirmation jobs it had queued were cancelled
        nursery.cancel_scope.cancel()


async def test_a_confirmation_finished_after_the_runs_end_is_counted_at_the_next_start_that_goes_on(tmp_path):
    from bus.blackboard import Blackboard

    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")),
                                **{"scheduler.promote_seeds": 4, "scheduler.heartbeat_s": 60.0})
    best = PolicySpec("aaaa", {})
    board, end = Blackboard(tmp_path / "bb"), trio.Event()
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path, config, board=board, ended=end)
        await _hello(ref)
        assert (await _judge(ref, best, "pa", 4, 4)).promoted
        leases = [await ref.ask(LeaseRequest(cell_id="cell-0")) for _ in range(4)]  # its first confirmation job
        assert all(lease.job_id.startswith("confirm-") for lease in leases)
        end.set()  # the run ends (budget) while the job runs
        for lease in leases:
            await ref.ask(_report(lease, True))
        await trio.sleep(0.5)
        assert board.get("champion", "pusht", Champion).n == 0  # not counted after the end
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # a start that goes on with the run
        await _start(nursery, tmp_path, config, board=board)
        await _eventually(lambda: board.get("champion", "pusht", Champion).n == 4)
        nursery.cancel_scope.cancel()
    board.close()
