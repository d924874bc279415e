"""The team's leaderboard: ranking with shrinkage, tallies, and the line agents read."""

from bus.messages import PolicySpec
from bus.records import CandidateRecord
from enpire import leaderboard


def _c(params, successes, n, steps_each=60, pending=0, judged="", t=0.0):
    return CandidateRecord("pusht", PolicySpec("c0ffee0000", params), "agent-0", successes, n, successes * 1.0,
                           steps_each * n, pending, judged, t)


def test_twenty_good_episodes_outrank_five_lucky_ones():
    lucky, good = _c({"a": 1.0}, 5, 5), _c({"a": 2.0}, 19, 20)
    assert leaderboard.score(good, 120) > leaderboard.score(lucky, 120)
    assert [c.policy.params for c in leaderboard.ranked([lucky, good], 120, 5)] == [{"a": 2.0}, {"a": 1.0}]


def test_ranking_keeps_the_k_best_measured_candidates():
    unmeasured = _c({"a": 0.0}, 0, 0, pending=5)
    slow, fast, worse = _c({"a": 1.0}, 10, 10, steps_each=110), _c({"a": 2.0}, 10, 10, steps_each=50), _c({"a": 3.0}, 5, 10)
    best = leaderboard.ranked([unmeasured, slow, worse, fast], 120, 2)
    assert [c.policy.params["a"] for c in best] == [2.0, 1.0]  # success first, fewer steps break the tie


def test_a_finished_evaluation_adds_its_episodes_and_clears_its_pending_ones():
    c = _c({"a": 1.0}, 3, 5, pending=7)
    leaderboard.add(c, [(True, 1.0, 40), (False, 0.5, 120)], asked=3, t=9.0)
    assert (c.successes, c.n, c.steps, c.pending, c.t) == (4, 7, 300 + 160, 4, 9.0)
    assert abs(c.progress - 4.5) < 1e-9


def test_the_line_names_the_exact_policy_and_its_evidence():
    c = _c({"b": 0.125, "a": 12.5}, 9, 10, pending=5, judged="rejected")
    text = leaderboard.line(c)
    assert text.startswith(f"{c.policy.ref} commit c0ffee0000 params " + '{"a":12.5,"b":0.125}: 9/10 succeeded')
    assert "5 more running" in text and "held-out judging: rejected" in text
    assert leaderboard.board_text([], 120, 5) == "(nothing evaluated yet)"


def test_recent_results_are_shown_below_the_best():
    old = [_c({"a": float(i)}, 20, 20, t=float(i)) for i in range(6)]
    fresh = _c({"a": 9.0}, 5, 5, t=100.0)
    text = leaderboard.board_text([*old, fresh], 120, 5, recent=1)
    lines = text.splitlines()
    assert lines[0] == "best:" and lines[6] == "recent:" and '"a":9.0' in lines[7] and len(lines) == 8


def test_a_judging_mark_is_kept_for_a_policy_promoted_without_evaluations(tmp_path):
    from bus.blackboard import Blackboard

    board = Blackboard(tmp_path / "bb")
    policy = PolicySpec("c" * 40, {"gain": 2.0})
    with board.write() as w:
        leaderboard.mark(w, "pusht", policy, "agent-1", "judging", 5.0)
    with board.write() as w:
        leaderboard.mark(w, "pusht", policy, "agent-2", "promoted", 6.0)
    c = board.get("candidates", leaderboard.key("pusht", policy), CandidateRecord)
    assert (c.judged, c.agent, c.n) == ("promoted", "agent-1", 0)  # who asked first; nothing measured
    assert leaderboard.board_text([c], horizon=300, k=5) == "(nothing evaluated yet)"  # unmeasured: off the board
    board.close()
