"""The report's figures from a synthetic run: what they draw, what they leave out, and no empty figures."""

import json

import numpy as np

from bus.blackboard import Blackboard
from bus.messages import PolicySpec, Purpose, Segment, Verdict
from bus.records import CandidateRecord, Champion, EpisodeRecord, Meta, TimelineRecord, TokenRecord
from enpire import report

T0 = 1_000_000.0
A, B, START = PolicySpec("a" * 40, {"x": 1.0}), PolicySpec("b" * 40, {"x": 2.0}), PolicySpec("0" * 40)


PURPOSES = {"agent": Purpose.EVAL, "heldout": Purpose.PROMOTE, "background": Purpose.CONFIRM}


def _episode(i: int, kind: str, job: str, policy: PolicySpec, success: bool, t: float, purpose=None) -> EpisodeRecord:
    return EpisodeRecord(f"{job}:{i}", job, kind, "pusht", i, policy, "cell-0",
                         Verdict(success, 1.0 if success else 0.2, "success" if success else "timeout", "pusht_state"),
                         success, 1, 100, 0.1, 1.0, 0.01, t, purpose=purpose or PURPOSES[kind])


def _run(tmp_path, tokens=False, final=True):
    state = tmp_path / "state"
    board = Blackboard(state / "blackboard.lmdb")
    board.put("meta", "meta", Meta(1, "run", T0))
    # cell-0 runs 1 s, then idles 0.05 s, for 100 s: sub-second idle gaps between long runs
    segs, t = [], T0
    while t < T0 + 100:
        segs += [Segment("running", t, t + 1.0, "agent"), Segment("idle", t + 1.0, t + 1.05)]
        t += 1.05
    board.append("timeline", TimelineRecord("cell-0", segs))
    board.append("timeline", TimelineRecord("cell-1", [Segment("idle", T0, T0 + 50),
                                                       Segment("running", T0 + 50, T0 + 100, "heldout")]))
    episodes = [_episode(0, "agent", "j-agent", B, i % 3 == 0, T0 + 5 + i) for i in range(12)]
    for i in range(30):  # judging of A: 27/30, promoted; of B: 10/30, rejected
        episodes.append(_episode(0, "heldout", "j-a", A, i >= 3, T0 + 20 + 0.1 * i))
        episodes.append(_episode(0, "heldout", "j-b", B, i < 10, T0 + 40 + 0.1 * i))
    episodes += [_episode(0, "background", "j-c", A, i % 10 != 0, T0 + 50 + i) for i in range(40)]  # confirmation
    # the starting policy judged while there was no champion; the final paired judging (not a candidate's)
    episodes += [_episode(0, "background", "j-s", START, i < 2, T0 + 2 + 0.1 * i, Purpose.BASELINE) for i in range(20)]
    episodes += [_episode(0, "heldout", "j-f", A, True, T0 + 95, Purpose.FINAL) for _ in range(10)]
    for n, e in enumerate(episodes):
        board.put("episodes", f"e{n}", e)
    board.put("candidates", "pusht/a", CandidateRecord("pusht", A, "agent-0", judged="promoted"))
    board.put("candidates", "pusht/b", CandidateRecord("pusht", B, "agent-0", judged="rejected"))
    board.put("champion", "pusht", Champion("pusht", A, 27, 30, T0 + 23, "agent-0", 36, 40))
    if tokens:
        for i in range(5):
            board.append("tokens", TokenRecord("agent-0", "m", T0 + 10 * i, 1000, 200, 100))
    board.close()
    if final:
        rate = lambda s, n: {"successes": s, "n": n, "rate": s / n, "wilson95": [0, 1]}  # noqa: E731
        (state / "report.json").write_text(json.dumps({"target": 0.8, "start_vs_champion": {
            "task": "pusht", "seeds": {"first": 1_000_500, "count": 50},
            "start": {"policy": START.ref, **rate(5, 50)}, "champion": {"policy": A.ref, **rate(45, 50)}}}))
    return state


def test_cells_timeline_never_paints_short_idle_gaps_over_running():
    segs, t = [], 0.0
    while t < 100:
        segs += [Segment("running", t, t + 1.0), Segment("idle", t + 1.0, t + 1.05)]
        t += 1.05
    bars = report.binned_states(segs, 0.0, 100.0)
    assert [b[2] for b in bars] == ["running"] and abs(bars[0][1] - 100.0) < 1e-6
    # an idle stretch wider than a column shows
    bars = report.binned_states([Segment("idle", 0, 50), Segment("running", 50, 100)], 0.0, 100.0)
    assert [(round(s), round(w), st) for s, w, st in bars] == [(0, 50, "idle"), (50, 50, "running")]


def test_judgings_robot_hours_and_tokens_from_records(tmp_path):
    state = _run(tmp_path, tokens=True)
    board = Blackboard(state / "blackboard.lmdb", readonly=True)
    episodes = board.values("episodes", EpisodeRecord)
    timelines = {r.cell_id: r.segments for r in board.values("timeline", TimelineRecord)}
    tokens = board.values("tokens", TokenRecord)
    board.close()
    judged = report.judgings(episodes, {A.ref: "promoted", B.ref: "rejected"})
    assert [(p.policy, p.successes, p.n, p.outcome) for p in judged] == [(A.ref, 27, 30, "promoted"),
                                                                           (B.ref, 10, 30, "rejected")]
    # a judging still running is drawn as pending (no style of its own would leave it out of the figure)
    assert [p.outcome for p in report.judgings(episodes, {A.ref: "judging"})] == ["", ""]
    series = report.confirmations(episodes)
    assert sorted(series) == [f"{START.ref}: starting policy", f"{A.ref}: confirmation"]
    confirm, start = series[f"{A.ref}: confirmation"], series[f"{START.ref}: starting policy"]
    assert (confirm[-1].successes, confirm[-1].n) == (36, 40) and (start[-1].successes, start[-1].n) == (2, 20)
    hours = report.robot_hours(timelines, np.array([T0, T0 + 50, T0 + 200]))
    running = sum(s.end - s.start for segs in timelines.values() for s in segs if s.state == "running")
    assert hours[0] == 0 and 0 < hours[1] < hours[2] and abs(hours[2] - running / 3600) < 1e-9
    assert list(report.tokens_by(tokens, np.array([T0 - 1, T0, T0 + 25, T0 + 99]))) == [0, 1100, 3300, 5500]


def test_success_figure_has_target_promotions_n_and_the_final_pair(tmp_path):
    state = _run(tmp_path)
    board = Blackboard(state / "blackboard.lmdb", readonly=True)
    episodes = board.values("episodes", EpisodeRecord)
    board.close()
    final = json.loads((state / "report.json").read_text())["start_vs_champion"]
    fig = report.plot_success(report.judgings(episodes, {A.ref: "promoted", B.ref: "rejected"}),
                              report.confirmations(episodes), final, 0.8, lambda t: t - T0,
                              "wall-clock time since start (s)", "t")
    ax, bars = fig.axes
    assert any(list(line.get_ydata()) == [0.8, 0.8] for line in ax.lines)  # the target line
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("n=30") == 2 and "n=40" in texts  # n at every judging and at the confirmation's end
    labels = ax.get_legend_handles_labels()[1]
    assert "judging: promoted" in labels and "judging: rejected" in labels
    assert [t.get_text() for t in bars.texts] == ["5/50", "45/50"] and "50 held-out seeds" in bars.get_title()
    assert report.plot_success([], {}, None, 0.8, lambda t: t, "x", "t") is None  # nothing to draw: no figure


def test_report_writes_only_figures_with_data(tmp_path):
    state = _run(tmp_path, tokens=False)
    out, written = report.write(state)
    assert written == ["success.png", "success_robot_hours.png", "cells.png"]
    for name in written:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "tokens.png").exists() and not (out / "success_tokens.png").exists()
    summary = (out / "summary.md").read_text()
    assert "final judging, start" in summary and "45/50" in summary and "judgings: 2 (1 promoted)" in summary
    assert "(12 agent, 60 judging, 60 confirmation and starting policy, 10 final judging)" in summary
    assert "tokens.png" not in summary
    state = _run(tmp_path / "with_tokens", tokens=True, final=False)
    _, written = report.write(state)
    assert "tokens.png" in written and "success_tokens.png" in written


def test_a_bad_report_json_is_one_line_exit_2(tmp_path, capsys):
    state = _run(tmp_path, tokens=False)
    for text, says in (("garbage{", "not a readable report"), ("[1, 2]", "but a list"),
                       ('{"target": "x"}', "not a success rate"), ('{"start_vs_champion": 3}', "not an object")):
        (state / "report.json").write_text(text)
        assert report.main(["--state-dir", str(state)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "report.json" in err and says in err, err

