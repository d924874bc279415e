"""The judge's rules (enpire/judging.py) as pure functions: promotion, confirmation, rollback, smoke."""

import random

from bus.blackboard import Blackboard
from bus.messages import EpisodeSummary, JobSpec, PolicySpec, Purpose
from bus.records import Champion, JobRecord, Tallied
from enpire import config as cfg
from enpire import judging, metrics

OLD, NEW = PolicySpec(commit="a" * 40), PolicySpec(commit="b" * 40)


def _spec(policy=NEW) -> JobSpec:
    return JobSpec(job_id="j", agent="agent-0", task="pusht", policy=policy, seeds=[1, 2], purpose=Purpose.PROMOTE)


def _config(**fleet) -> cfg.Config:
    config = cfg.Config()
    for k, v in fleet.items():
        setattr(config.fleet, k, v)
    return config


def test_promotion_needs_confidence_against_the_whole_heldout_record():
    config = _config(target=0.5)  # the champion's confirmation (64/100) still runs against this target
    champion = Champion("pusht", OLD, judged_successes=30, judged_n=50, promoted=0.0, successes=64, n=100)
    assert judging.heldout_record(champion) == (94, 150) and judging.confirmation(champion, config) == ""
    close = judging.promotion(_spec(), 33, 50, champion, config, now=1.0)
    assert not close.promoted and close.crowned is None and "33/50 is not better than 94/150" in close.detail
    clear = judging.promotion(_spec(), 49, 50, champion, config, now=1.0)
    assert clear.promoted and clear.crowned.policy == NEW and clear.crowned.previous == OLD
    assert (clear.crowned.previous_successes, clear.crowned.previous_n, clear.crowned.promoted) == (94, 150, 1.0)
    again = judging.promotion(_spec(OLD), 0, 50, champion, config, now=1.0)
    assert again.promoted and again.crowned is None and again.detail == "already the champion"
    first = judging.promotion(_spec(), 1, 50, None, cfg.Config(), now=1.0)  # anything that succeeds beats nothing
    assert first.crowned is not None and first.crowned.previous is None


def test_a_champion_short_of_the_target_yields_to_a_higher_judged_rate():
    # 94% over 232 held-out episodes: above the 90% target in truth, but its confirmation (181/192)
    # stopped "not_met" at its cap. No 40-episode judging beats that record with confidence (not even
    # 40/40), so without this rule the search would be stuck behind it for good.
    config = _config(target=0.9, min_heldout=40)
    champion = Champion("pusht", OLD, judged_successes=39, judged_n=40, promoted=0.0, successes=181, n=192)
    assert judging.confirmation(champion, config) == "not_met"
    assert not judging.better_with_confidence(40, 40, 220, 232, config.scheduler.alpha)
    higher = judging.promotion(_spec(), 39, 40, champion, config, now=1.0)
    assert higher.promoted and higher.crowned.policy == NEW and "stopped short of the target" in higher.detail
    assert (higher.crowned.previous, higher.crowned.previous_successes, higher.crowned.previous_n) == (OLD, 220, 232)
    assert higher.crowned.decision == "" and higher.crowned.n == 0  # its own confirmation decides the target
    assert judging.promotion(_spec(), 38, 40, champion, config, now=1.0).promoted  # 0.950 > 220/232 = 0.948
    lower = judging.promotion(_spec(), 37, 40, champion, config, now=1.0)
    assert not lower.promoted and lower.crowned is None
    champion.successes, champion.n = 30, 32  # the same champion still confirming (not stopped): confidence needed
    assert judging.confirmation(champion, config) == ""
    assert not judging.promotion(_spec(), 40, 40, champion, config, now=1.0).promoted
    # One whose confirmation finds the target unlikely runs it on idle cells only: on a busy fleet it may
    # never stop (a 1-cell bench run sat at 37/44 for 15 minutes), so it yields to a higher record too.
    champion.successes, champion.n = 37, 44  # record 76/84 = 0.905
    assert judging.confirmation(champion, config) == "unlikely"
    assert not judging.better_with_confidence(38, 40, 76, 84, config.scheduler.alpha)
    unlikely = judging.promotion(_spec(), 38, 40, champion, config, now=1.0)
    assert unlikely.promoted and "finds the target unlikely" in unlikely.detail
    assert not judging.promotion(_spec(), 36, 40, champion, config, now=1.0).promoted  # 0.900 < 0.905
    # The policy a rollback removed (its confirmation, 22/30, showed it worse than this record with
    # confidence) does not come back on a higher point estimate: 100/100 + 22/30 = 122/130 needs confidence.
    assert judging.better_with_confidence(76, 84, 22, 30, config.scheduler.alpha)
    removed = judging.promotion(_spec(), 100, 100, champion, config, now=1.0, confirmed=(22, 30))
    assert not removed.promoted and "122/130 is not better than 76/84" in removed.detail
    again = judging.promotion(_spec(), 38, 40, champion, config, now=1.0, confirmed=(28, 30))  # not shown worse
    assert again.promoted and "finds the target unlikely" in again.detail
    # Wald's ratio does not act on 4 failures in 8 before min_heldout (40) episodes, but the judge's forecast
    # over the whole record (43/48 after a 39/40 judging: a chance under 1%) does: no lead, and it yields.
    champion.successes, champion.n, champion.leads = 4, 8, True
    assert metrics.sprt(4, 8, 0.9, config.scheduler.alpha, judging.BETA, min_n=40) == ""
    assert judging.confirmation(champion, config) == "unlikely" and judging.yields(champion, config) == "unlikely"
    assert judging.promotion(_spec(), 36, 40, champion, config, now=1.0).promoted  # 0.900 > 43/48 = 0.896
    champion.successes, champion.n = 7, 8
    assert judging.confirmation(champion, config) == ""
    assert judging.confirmation_plan(champion, config, cells=1)[1] == judging.PRIORITY["decisive"]
    assert not judging.promotion(_spec(), 39, 40, champion, config, now=1.0).promoted


def test_a_confirmation_leads_while_the_target_is_likely_and_keeps_its_lead_through_a_failure():
    """A confirmation goes before agents' experiments while, at the rate the champion's whole
    held-out record shows, the capped sequential rule says "met" with a chance of at least JOIN (0.5), and
    keeps that lead down to LEAVE (0.2): one failure does not toss the fleet between confirming and searching
    (figures: metrics.sprt_odds, checked against sprt in tests/test_metrics.py)."""
    config = _config(target=0.9, min_heldout=40)
    config.scheduler.promote_seeds = 40
    assert judging.fewest_to_lead(config) == 38  # 38/40: a chance of 70%; 37/40: 21%
    for judged, state, priority in [(37, "unlikely", "background"), (38, "", "decisive"), (40, "", "decisive")]:
        c = Champion("pusht", NEW, judged_successes=judged, judged_n=40, promoted=0.0)
        assert judging.confirmation(c, config) == state
        assert judging.confirmation_plan(c, config, cells=1)[1] == judging.PRIORITY[priority]
    crowned = judging.promotion(_spec(), 38, 40, None, config, now=1.0).crowned
    assert crowned.leads  # decided as it is crowned
    chance = {(s, n): judging.chance_met(38 + s, 40 + n, s, n, 0.9, config.scheduler.alpha, 40)
              for s, n in ((7, 8), (29, 32))}
    assert 0.2 < chance[7, 8] < 0.5 and chance[29, 32] < 0.2  # 35% and 16%
    crowned.successes, crowned.n = 7, 8  # one failure in 8: it keeps the lead ...
    assert judging.confirmation(crowned, config) == "" and not judging.decide(crowned, config) and crowned.leads
    fresh = Champion("pusht", NEW, judged_successes=38, judged_n=40, promoted=0.0, successes=7, n=8)
    assert judging.confirmation(fresh, config) == "unlikely"  # ... which the same record would not take
    crowned.successes, crowned.n = 29, 32  # three in 32: it loses it, a change decide() reports (to be stored)
    assert judging.decide(crowned, config) and crowned.decision == ""
    assert not crowned.leads and judging.confirmation(crowned, config) == "unlikely"
    crowned.successes, crowned.n = 36, 39  # and takes it again only at JOIN: six successes more give 30%
    assert 0.2 < judging.chance_met(74, 79, 36, 39, 0.9, config.scheduler.alpha, 40) < 0.5
    assert judging.confirmation(crowned, config) == "unlikely"
    # A near-miss mid-way: 139/148 (0.939) has an 11% chance left within the 200-episode cap; it goes on on
    # idle cells only (Wald's ratio alone, at 0.0 and 40+ episodes, would keep it ahead of agents to the cap).
    near = Champion("pusht", NEW, judged_successes=39, judged_n=40, promoted=0.0, successes=100, n=108, leads=True)
    assert metrics.sprt(100, 108, 0.9, config.scheduler.alpha, judging.BETA, min_n=40, max_n=200) == ""
    assert round(metrics.sprt_odds(139 / 148, 0.9, config.scheduler.alpha, 40, 200, 100, 108)[0], 2) == 0.11
    assert judging.confirmation(near, config) == "unlikely"
    config.scheduler.background = False
    assert judging.confirmation_plan(near, config, cells=4) is None
    assert "a champion judged 38 of 40 or more leads at once" in judging.goal(config)
    config.fleet.target = 0.999  # even a perfect policy needs about 6,000 episodes: none leads
    assert judging.fewest_to_lead(config) is None and "no judging of 40 episodes alone leads" in judging.goal(config)
    config.fleet.target = 0.0  # anything meets it: every confirmation leads (it counts min_heldout episodes)
    assert judging.confirmation(Champion("pusht", NEW, judged_successes=1, judged_n=40, promoted=0.0), config) == ""


def test_a_policy_champion_again_goes_on_with_its_confirmation():
    config = _config(target=0.9, min_heldout=40)
    champion = Champion("pusht", OLD, judged_successes=39, judged_n=40, promoted=0.0, successes=181, n=192)
    assert judging.confirmation(champion, config) == "not_met"  # record 220/232
    # NEW was champion before and its confirmation stopped at 170/190: its judging (39/40) is compared
    # together with that tally (209/230 < 220/232), and it cannot start over on a clean slate
    refuted = judging.promotion(_spec(), 39, 40, champion, config, now=1.0, confirmed=(170, 190))
    assert not refuted.promoted and "209/230" in refuted.detail
    back = judging.promotion(_spec(), 40, 40, champion, config, now=1.0, confirmed=(181, 192))  # 221/232
    assert back.promoted and (back.crowned.successes, back.crowned.n) == (181, 192)
    assert back.crowned.decision == "not_met"  # its earlier stop holds: nothing more to confirm
    assert judging.confirmation_plan(back.crowned, config, cells=1) is None


def test_a_rollback_restores_the_previous_confirmation_tally():
    config = _config(target=0.9, min_heldout=40)
    config.scheduler.rollback_min_n = 20
    c = Champion("pusht", NEW, judged_successes=40, judged_n=40, promoted=0.0, previous=OLD,
                 previous_successes=220, previous_n=232, successes=14, n=24)
    back = judging.rollback(c, config, now=2.0, confirmed=(181, 192))
    assert (back.judged_successes, back.judged_n, back.successes, back.n) == (39, 40, 181, 192)
    assert back.decision == "not_met" and judging.heldout_record(back) == (220, 232)
    legacy = judging.rollback(c, config, now=2.0, confirmed=(0, 0))  # replaced before tallies were kept
    assert (legacy.judged_successes, legacy.judged_n, legacy.n, legacy.decision) == (220, 232, 0, "")


def test_confirmation_plan_is_decisive_only_while_the_target_is_possible():
    config = _config(target=0.9, min_heldout=20)
    config.scheduler.background = False
    strong = Champion("pusht", NEW, judged_successes=50, judged_n=50, promoted=0.0)
    per_job, priority = judging.confirmation_plan(strong, config, cells=3)
    assert per_job == judging.CONFIRM_EPISODES_PER_CELL * 3 and priority == judging.PRIORITY["decisive"]
    weak = Champion("pusht", NEW, judged_successes=10, judged_n=50, promoted=0.0)
    assert judging.confirmation_plan(weak, config, cells=3) is None  # only idle cells would, and background is off
    config.scheduler.background = True
    assert judging.confirmation_plan(weak, config, cells=0)[1] == judging.PRIORITY["background"]
    met = Champion("pusht", NEW, judged_successes=50, judged_n=50, promoted=0.0, successes=100, n=100)
    assert judging.confirmation(met, config) == "met" and judging.confirmation_plan(met, config, 3) is None
    failing = Champion("pusht", NEW, judged_successes=50, judged_n=50, promoted=0.0, successes=40, n=100)
    assert judging.confirmation(failing, config) == "not_met"


def test_a_stop_holds_for_the_target_it_was_made_against():
    config = _config(target=0.9, min_heldout=20)
    c = Champion("pusht", NEW, judged_successes=40, judged_n=40, promoted=0.0, successes=60, n=60)
    assert judging.decide(c, config) and (c.decision, c.decision_target) == ("met", 0.9)
    assert not judging.decide(c, config)  # the same verdict: nothing to record
    c.successes, c.n = 60, 64  # episodes in flight when it stopped do not undo a "met"...
    assert judging.confirmation(c, config) == "met"
    config.fleet.target = 0.99  # ...but a run with a higher target applies the rule again
    assert judging.confirmation(c, config) != "met"
    assert judging.decide(c, config) and (c.decision, c.decision_target) == ("not_met", 0.99)  # 4 failures of 64
    config.fleet.target = 0.8  # and a lower one says "met" again, for 0.8
    assert judging.decide(c, config) and (c.decision, c.decision_target) == ("met", 0.8)
    legacy = Champion("pusht", NEW, judged_successes=40, judged_n=40, promoted=0.0, successes=20, n=48,
                      decision="met")  # recorded before decisions named their target
    assert judging.confirmation(legacy, config) == "not_met"


def test_rollback_only_with_enough_confirmation_and_confidence():
    config = _config()
    config.scheduler.rollback_min_n = 40
    c = Champion("pusht", NEW, judged_successes=20, judged_n=20, promoted=0.0, previous=OLD,
                 previous_successes=45, previous_n=50, successes=10, n=30)
    assert judging.rollback(c, config, now=2.0) is None  # fewer than rollback_min_n confirmed
    c.successes, c.n = 12, 40
    back = judging.rollback(c, config, now=2.0)
    assert back.policy == OLD and (back.judged_successes, back.judged_n, back.agent) == (45, 50, "rollback")
    c.successes = 40
    assert judging.rollback(c, config, now=2.0) is None  # as good as the one it replaced


def test_smoke_passes_only_faultless_policies_that_succeed():
    ok = EpisodeSummary("e0", 1, True, True, 1.0, "success", 10)
    fault = EpisodeSummary("e1", 2, False, False, 0.0, "safety_violation: action out of bounds", 3)
    failed = EpisodeSummary("e2", 3, False, False, 0.2, "timeout", 300)
    assert judging.smoke_record(NEW, [ok, failed], 1.0).passed
    record = judging.smoke_record(NEW, [ok, fault], 1.0)
    assert not record.passed and "safety_violation" in record.detail and record.detail.startswith("1/2")
    assert not judging.smoke_record(NEW, [failed], 1.0).passed


def _job(job_id: str, purpose=Purpose.CONFIRM, done=True, cancelled=False) -> JobRecord:
    return JobRecord(job_id, "agent-0", "heldout", "pusht", NEW, [1, 2], 1, 0, 0.0, done=done, purpose=purpose,
                     cancelled=cancelled)


def test_a_restart_counts_finished_jobs_without_a_mark_and_trusts_a_state_from_before_marks(tmp_path):
    board = Blackboard(tmp_path / "bb")
    with board.write() as w:  # a state written before jobs were marked when counted
        w.put("jobs", "old", _job("old"))
    with board.write() as w:
        assert judging.uncounted(w, now=1.0) == []  # counted by the version that wrote it
        assert w.get("tallied", "old", Tallied) is not None
    with board.write() as w:
        for job in (_job("c"), _job("e", Purpose.EVAL), _job("b", Purpose.BASELINE), _job("x", cancelled=True),
                    _job("p", Purpose.PROMOTE), _job("r", done=False), _job("k")):
            w.put("jobs", job.job_id, job)
        w.put("tallied", "k", Tallied(1.0))
    with board.write() as w:
        assert sorted(j.job_id for j in judging.uncounted(w, now=2.0)) == ["b", "c", "e"]


def test_a_confirmation_is_counted_once_and_not_for_a_champion_that_changed(tmp_path):
    board, config = Blackboard(tmp_path / "bb"), _config(target=0.9, min_heldout=20)
    spec = JobSpec(job_id="c1", agent="agent-0", task="pusht", policy=NEW, seeds=[1, 2], purpose=Purpose.CONFIRM)
    wins = [EpisodeSummary("c1:0", 1, True, True, 1.0, "success", 9), EpisodeSummary("c1:1", 2, False, False, 0.1, "timeout", 9)]
    with board.write() as w:
        w.put("champion", "pusht", Champion("pusht", NEW, judged_successes=9, judged_n=10, promoted=0.0))
    for _ in range(2):
        with board.write() as w:
            judging.count_confirmation(w, spec, wins, config, now=1.0)
    assert (board.get("champion", "pusht", Champion).successes, board.get("champion", "pusht", Champion).n) == (1, 2)
    moot = JobSpec(job_id="c0", agent="agent-0", task="pusht", policy=OLD, seeds=[3], purpose=Purpose.CONFIRM)
    with board.write() as w:
        assert judging.count_confirmation(w, moot, wins[:1], config, now=1.0) is None
    assert board.get("champion", "pusht", Champion).n == 2 and not board.get("tallied", "c0", Tallied).counted


def test_only_the_job_that_stops_the_confirmation_says_so(tmp_path):
    """Jobs that finish after the stop are counted into the tally; the stop is told once."""
    board, config = Blackboard(tmp_path / "bb"), _config(target=0.9, min_heldout=20)
    with board.write() as w:
        w.put("champion", "pusht", Champion("pusht", NEW, judged_successes=40, judged_n=40, promoted=0.0))
    stops = []
    for i in range(8):
        spec = JobSpec(job_id=f"c{i}", agent="agent-0", task="pusht", policy=NEW, seeds=list(range(10)),
                       purpose=Purpose.CONFIRM)
        won = [EpisodeSummary(f"c{i}:{k}", k, True, True, 1.0, "success", 9) for k in range(10)]
        with board.write() as w:
            champion, previous, stopped = judging.count_confirmation(w, spec, won, config, now=1.0)
        stops.append(stopped)
    assert champion.decision == "met" and champion.n == 80 and previous is None
    assert stops.count(True) == 1 and stops.index(True) < 7  # later jobs counted, the stop said once


def test_the_baseline_is_crowned_once_and_only_while_there_is_no_champion(tmp_path):
    board = Blackboard(tmp_path / "bb")
    spec = JobSpec(job_id="b", agent="baseline", task="pusht", policy=OLD, seeds=[1], purpose=Purpose.BASELINE)
    won = [EpisodeSummary("b:0", 1, True, True, 1.0, "success", 9)]
    config = cfg.Config()
    with board.write() as w:
        crowned = judging.count_baseline(w, spec, won, config, now=1.0)
    assert crowned.policy == OLD and (crowned.judged_successes, crowned.judged_n) == (1, 1)
    assert crowned.leads  # decided as it is crowned: 1/1 leads (its record's rate is 1.0)
    with board.write() as w:
        assert judging.count_baseline(w, spec, won, config, now=2.0) is None  # counted already: the mark stays as it was
    assert board.get("tallied", "b", Tallied).counted and board.get("champion", "pusht", Champion).promoted == 1.0
    late = JobSpec(job_id="b2", agent="baseline", task="pusht", policy=NEW, seeds=[1], purpose=Purpose.BASELINE)
    with board.write() as w:
        assert judging.count_baseline(w, late, won, config, now=3.0) is None  # a champion came first
    assert not board.get("tallied", "b2", Tallied).counted and board.get("champion", "pusht", Champion).policy == OLD


def test_rollback_tests_once_per_look_so_its_false_rollbacks_stay_below_alpha():
    assert [judging.rollback_look(b, a, 30) for b, a in ((0, 29), (24, 32), (32, 40), (56, 64), (0, 130), (120, 128))] \
        == [None, 0, None, 1, 2, None]
    config = _config()
    config.scheduler.rollback_min_n = 30
    c = Champion("pusht", NEW, judged_successes=20, judged_n=20, promoted=0.0, previous=OLD,
                 previous_successes=36, previous_n=40, successes=27, n=40)  # 0.9 vs 0.675: z about 2.5
    assert judging.rollback(c, config, now=2.0, before=32) is None  # no look between 32 and 40
    assert judging.rollback(c, config, now=2.0, before=24) is not None  # look 0 at 30, alpha / 2
    # A champion as good as the one it replaced (both 0.8), confirmed in jobs of 8 until the sequential rule
    # stops: the share rolled back stays below alpha (a test after every job: about 12% here).
    config = _config(target=0.8, min_heldout=100)
    config.scheduler.rollback_min_n = 30
    rng, rolled, trials = random.Random(7), 0, 600
    for _ in range(trials):
        c = Champion("pusht", NEW, judged_successes=40, judged_n=40, promoted=0.0, previous=OLD,
                     previous_successes=sum(rng.random() < 0.8 for _ in range(40)), previous_n=40)
        while metrics.sprt(c.successes, c.n, 0.8, config.scheduler.alpha, min_n=100, max_n=500) not in ("met", "not_met"):
            before = c.n
            c.successes, c.n = c.successes + sum(rng.random() < 0.8 for _ in range(8)), c.n + 8
            if judging.rollback(c, config, now=1.0, before=before) is not None:
                rolled += 1
                break
    assert rolled / trials < config.scheduler.alpha, rolled
