"""The lease queue's bookkeeping as data (enpire/queueing.py): lanes, leases, eligibility."""

from bus.messages import JobSpec, PolicySpec, Purpose, Verdict
from bus.records import CellRecord, EpisodeRecord
from enpire import config as cfg
from enpire.queueing import (
    CellState,
    Episode,
    Job,
    Lanes,
    LeaseBook,
    LeaseState,
    eligible,
    replacement,
    restore,
)

POLICY = PolicySpec(commit="c" * 40)


def _episodes(job: str, agent: str, n: int, priority: int = 0, purpose=Purpose.EVAL) -> list[Episode]:
    spec = JobSpec(job_id=job, agent=agent, task="pusht", policy=POLICY, seeds=list(range(n)), purpose=purpose,
                   priority=priority)
    return [Episode(f"{job}:{i}", spec, i, "bundle") for i in range(n)]


def test_lanes_serve_priority_first_then_the_agent_served_least():
    lanes = Lanes()
    lanes.add(_episodes("a", "agent-0", 3))
    lanes.add(_episodes("b", "agent-1", 3))
    lanes.add(_episodes("bg", "background", 2, priority=-1, purpose=Purpose.CONFIRM))
    taken = [lanes.take(lambda e: True).spec.agent for _ in range(4)]
    assert sorted(taken[:2]) == ["agent-0", "agent-1"] and taken[2] != taken[3]  # fair share alternates
    assert lanes.depth() == (2, 2)
    lanes.add(_episodes("j", "agent-0", 1, priority=100, purpose=Purpose.PROMOTE))  # judging jumps the queue
    assert lanes.take(lambda e: True).episode_id == "j:0"
    assert lanes.served == {"agent-0": 2, "agent-1": 2}  # judging is charged to no one
    lanes.add(_episodes("a2", "agent-0", 1, priority=1))  # within a lane: higher priority before arrival order
    assert lanes.lanes["agent-0"][0].episode_id == "a2:0"
    assert lanes.take(lambda e: e.spec.agent == "background").episode_id == "bg:0"  # what fits the cell


def test_lanes_discard_cancel_and_find():
    lanes = Lanes()
    first = _episodes("a", "agent-0", 2)
    lanes.add(first)
    lanes.push_front(first[1])  # a lapsed copy queued again
    assert lanes.find("a:1") is first[1] and len(lanes) == 3
    lanes.discard("a:1")
    assert len(lanes) == 1 and lanes.find("a:1") is None
    lanes.cancel(first[0].spec)
    assert len(lanes) == 0 and lanes.take(lambda e: True) is None


def test_lease_book_remembers_lapsed_leases_boundedly():
    book = LeaseBook(remember=2)
    episodes = _episodes("a", "agent-0", 3)
    for i, e in enumerate(episodes):
        book.held[f"l{i}"] = LeaseState(e, "cell-0" if i < 2 else "cell-1", expires=float(i))
    assert book.expired(1.5) == ["l0", "l1"] and book.of_cell("cell-1") == ["l2"]
    for lease_id in ("l0", "l1", "l2"):
        book.lapse(lease_id)
    assert book.holder("l0") is None  # forgotten: only the last two are kept
    assert book.holder("l2") == ("cell-1", "a:2") and book.held == {}
    book.held["l3"] = LeaseState(episodes[0], "cell-0", 9.0)
    assert book.episode("a:0") is episodes[0]
    book.end("a:0")
    assert book.held == {} and book.episode("a:0") is None


def test_eligibility_by_driver_pooling_and_smoke_clearance():
    config = cfg.Config()
    config.cells.task = "pusht"
    episode = _episodes("a", "agent-1", 1)[0]
    driver = config.task("pusht").driver

    def cell(cell_id="cell-1", drv=driver, real=False) -> CellState:
        return CellState(CellRecord(cell_id, drv, "host", 1, 0.0, 0.0, real=real), frozenset())
    assert eligible(episode, cell(), config, {}) is True
    assert eligible(episode, cell(drv="other"), config, {}) is False
    assert eligible(episode, cell(real=True), config, {}) is None  # needs a smoke test first
    assert eligible(episode, cell(real=True), config, {POLICY.ref: True}) is True
    config.scheduler.pooled = False  # the paper's set-up: cell-i runs agent-i's work only
    assert eligible(episode, cell("cell-0"), config, {}) is False and eligible(episode, cell(), config, {}) is True
    # the run's own: any cell (a champion rolled back to, or the baseline, was promoted by no agent)
    for purpose, agent in ((Purpose.FINAL, "final"), (Purpose.SMOKE, "smoke"), (Purpose.CONFIRM, "rollback"),
                           (Purpose.CONFIRM, "baseline")):
        run_own = _episodes("r", agent, 1, purpose=purpose)[0]
        assert eligible(run_own, cell("cell-0"), config, {}) is True
        assert eligible(run_own, cell(real=True), config, {}) is None  # a real cell still needs the clearance


def test_a_flagged_episode_is_replaced_by_another_tuning_seed():
    episodes = _episodes("a", "agent-0", 2)
    job = Job(episodes[0].spec, [e.episode_id for e in episodes])
    new = replacement(job, episodes[0], pool_start=0, pool_count=10_000)
    assert new.seed == 7919 and new.episode_id == "a:r0" and job.episode_ids == ["a:1", "a:r0"]


def test_a_lapsed_episode_goes_first_among_its_priority_not_before_higher_ones():
    lanes = Lanes()
    final = _episodes("final", "final", 2, priority=300, purpose=Purpose.FINAL)
    promote = _episodes("p", "agent-0", 2, priority=100, purpose=Purpose.PROMOTE)
    lanes.add(promote[1:])
    lanes.add(final)
    lanes.add(_episodes("bg", "background", 3, priority=200, purpose=Purpose.CONFIRM))  # a decisive confirmation
    lanes.push_front(promote[0])  # a judging lease lapsed during the final judging
    assert [e.episode_id for e in lanes.lanes["judge"]] == ["final:0", "final:1", "p:0", "p:1"]
    assert lanes.take(lambda e: True).episode_id == "final:0"  # the judge's lane still ranks at 300


def _record(episode: Episode, success: bool, flagged: str = "", steps: int = 10) -> EpisodeRecord:
    return EpisodeRecord(episode.episode_id, episode.spec.job_id, episode.spec.kind, "pusht", episode.seed,
                         POLICY, "cell-0", Verdict(success, float(success), "", "state"), success, 1, steps, 0.0,
                         0.0, 0.0, 0.0, flagged=flagged, purpose=episode.spec.purpose)


def test_held_out_work_counts_a_flagged_failure_and_leaves_out_only_what_says_nothing_of_the_policy():
    flags = [(True, "", 10), (False, "estop", 10), (False, "driver_error", 0), (False, "unverified", 10),
             (True, "success_at_reset", 0), (False, "success_at_reset", 10), (True, "dry_run", 10),
             (False, "dry_run", 10), (False, "operator_timeout", 0)]  # held before the policy acted: left out
    for purpose, counted in ((Purpose.PROMOTE, [0, 1, 3, 5]), (Purpose.CONFIRM, [0, 1, 3, 5]),
                             (Purpose.FINAL, [0, 1, 3, 5]), (Purpose.EVAL, [0])):
        episodes = _episodes("j", "agent-0", len(flags), purpose=purpose)
        job = Job(episodes[0].spec, [e.episode_id for e in episodes])
        job.results = {e.episode_id: _record(e, ok, flag, steps)
                       for e, (ok, flag, steps) in zip(episodes, flags, strict=True)}
        assert [s.seed for s in job.reply().episodes] == counted, purpose  # an agent's: re-run on other seeds


def test_a_restart_replays_the_replacements_of_flagged_episodes():
    """j:1 was flagged (solved at reset), its replacement j:r1 ran and was flagged too, j:r2 had not run
    when the daemon stopped: after the restart j:r1 counts as recorded and j:r2 runs with its own seed."""
    episodes = _episodes("j", "agent-0", 3)
    spec = episodes[0].spec
    done = {}
    for t, (eid, seed, flag) in enumerate((("j:0", 0, ""), ("j:1", 1, "success_at_reset"),
                                           ("j:r1", 7920, "success_at_reset"))):
        done[eid] = _record(Episode(eid, spec, seed, "bundle"), flag != "", flag)
        done[eid].finished = float(t)
    job, waiting = restore(spec, done, "bundle", pool_start=0, pool_count=10_000)
    assert set(job.results) == {"j:0", "j:1", "j:r1"} and job.episode_ids == ["j:0", "j:2", "j:r2"]
    assert [(e.episode_id, e.seed) for e in waiting] == [("j:2", 2), ("j:r2", 5839)]
    assert [s.episode_id for s in job.reply().episodes] == ["j:0"]


def test_a_finished_job_that_was_cancelled_says_so_after_a_restart(tmp_path):
    from bus.blackboard import Blackboard
    from enpire.queueing import finished

    board = Blackboard(tmp_path / "bb")
    episodes = _episodes("c", "background", 4, purpose=Purpose.CONFIRM)
    job = Job(episodes[0].spec, [episodes[0].episode_id], {episodes[0].episode_id: _record(episodes[0], True)},
              cancelled=True)
    with board.write() as w:
        w.put("episodes", episodes[0].episode_id, job.results[episodes[0].episode_id])
    reply = finished(board, job.record())
    assert reply.cancelled and len(reply.episodes) == 1  # a partial tally is not counted as a whole job
    board.close()
