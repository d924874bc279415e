import multiprocessing as mp
import os
import signal

import msgspec
import pytest

from bus.blackboard import Blackboard, RecordError
from bus.messages import PolicySpec, Verdict
from bus.records import Champion, EpisodeRecord, Finding


def _episode(i: int) -> EpisodeRecord:
    return EpisodeRecord(
        episode_id=f"job:{i}", job_id="job", kind="agent", task="pusht", seed=i, policy=PolicySpec("abc"),
        cell_id="cell-0", verdict=Verdict(i % 2 == 0, 0.5, "x", "pusht_state"), success_at_k=False, attempts=1,
        steps=10, reset_s=0.0, run_s=0.1, verify_s=0.0, finished=0.0,
    )


def test_typed_records_round_trip(tmp_path):
    board = Blackboard(tmp_path / "bb")
    board.put("episodes", "job:1", _episode(1))
    assert board.get("episodes", "job:1", EpisodeRecord) == _episode(1)
    assert board.get("episodes", "missing", EpisodeRecord) is None
    champ = Champion("pusht", PolicySpec("c1", {"a": 1.0}), judged_successes=90, judged_n=100, promoted=1.0)
    board.put("champion", "pusht", champ)
    assert board.get("champion", "pusht", Champion) == champ


def test_first_write_wins_when_not_overwriting(tmp_path):
    board = Blackboard(tmp_path / "bb")
    assert board.put("episodes", "e", _episode(1), overwrite=False)
    assert not board.put("episodes", "e", _episode(2), overwrite=False)
    assert board.get("episodes", "e", EpisodeRecord).seed == 1


def test_wrong_type_is_a_clear_error(tmp_path):
    board = Blackboard(tmp_path / "bb")
    board.put("episodes", "e", _episode(1))
    with pytest.raises(RecordError, match="table 'episodes' key 'e'"):
        board.get("episodes", "e", Champion)


def test_append_keeps_order_and_map_grows(tmp_path):
    board = Blackboard(tmp_path / "bb", map_size=1 << 20)  # 1 MiB: must grow on its own
    for i in range(4000):
        board.append("findings", Finding(str(i), "a", 0.0, "h" * 300, "c", "e", "note"))
    keys = [k for k, _ in board.items("findings", Finding)]
    assert keys == sorted(keys) and len(keys) == 4000
    assert board.map_size > 1 << 20
    assert board.values("findings", Finding)[-1].finding_id == "3999"


def _writer(path: str, ready) -> None:
    board = Blackboard(path)
    for i in range(200):
        board.put("episodes", f"job:{i}", _episode(i))
        board.incr("episodes")
    ready.set()
    while True:  # keep writing until killed mid-stream
        i += 1
        board.put("episodes", f"job:{i}", _episode(i))
        board.incr("episodes")


def test_records_survive_sigkill_of_writer(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(str(tmp_path / "bb"), ready))
    proc.start()
    assert ready.wait(60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    board = Blackboard(tmp_path / "bb")
    n = board.counter("episodes")
    assert n >= 200
    for i in range(200):
        assert board.get("episodes", f"job:{i}", EpisodeRecord).seed == i
    # every committed episode is readable: no torn record
    assert all(isinstance(r, EpisodeRecord) for r in board.values("episodes", EpisodeRecord))
    assert abs(board.count("episodes") - n) <= 1  # the kill may land between the two transactions


def test_two_processes_share_the_board(tmp_path):
    board = Blackboard(tmp_path / "bb")
    board.put("episodes", "a", _episode(1))
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_reader_writer, args=(str(tmp_path / "bb"),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert board.get("episodes", "b", EpisodeRecord).seed == 2


def _reader_writer(path: str) -> None:
    board = Blackboard(path)
    assert board.get("episodes", "a", EpisodeRecord).seed == 1
    board.put("episodes", "b", _episode(2))


def test_records_are_msgpack_not_pickle(tmp_path):
    board = Blackboard(tmp_path / "bb")
    board.put("episodes", "e", _episode(1))
    with board.read() as r:
        raw = r._txn.get(b"e", db=board._dbs["episodes"])
    assert msgspec.msgpack.decode(raw)["seed"] == 1


def test_transact_commits_in_a_worker_thread_and_returns_the_result(tmp_path):
    import threading

    import trio

    board = Blackboard(tmp_path / "bb")
    threads = []

    def write(w) -> int:
        threads.append(threading.current_thread())
        w.put("meta", "x", PolicySpec(commit="a"))
        return w.incr("n", 2)

    assert trio.run(board.transact, write) == 2
    assert threads and threads[0] is not threading.main_thread()  # the loop never waits for the fsync
    assert board.get("meta", "x", PolicySpec) == PolicySpec(commit="a")

    def fail(w) -> None:
        w.put("meta", "y", PolicySpec(commit="b"))
        raise ValueError("no")
    with pytest.raises(ValueError):
        trio.run(board.transact, fail)
    assert board.get("meta", "y", PolicySpec) is None  # all or nothing


def test_a_truncated_data_file_is_refused_not_a_crash(tmp_path):
    """A copy interrupted part way: opening it must say so, never die of SIGBUS on a page past its end
    (checked in a child process, so a regression cannot take the test run down with it)."""
    import subprocess
    import sys

    board = Blackboard(tmp_path / "bb")
    for i in range(300):
        board.put("findings", f"f{i:04d}", Finding(f"f{i}", "a", 0.0, "h" * 200, "c", "e", "note"))
    board.close()
    data = tmp_path / "bb" / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    probe = ("import sys; from bus.blackboard import Blackboard, BlackboardError\n"
             "try:\n    Blackboard(sys.argv[1], readonly=True).values('findings', object)\n"
             "except BlackboardError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "bb")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert "cut short" in r.stdout and "data.mdb" in r.stdout, r.stdout

