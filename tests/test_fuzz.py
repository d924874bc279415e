"""Fuzzing the readers of everything stored or configured: each bad input gets a clear error, never a crash."""

import random
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.blackboard import Blackboard, RecordError
from bus.messages import PolicySpec, Verdict
from bus.records import Champion, EpisodeRecord, Finding
from enpire import config as cfg
from enpire.episodes import EpisodeFileError, read_trajectory, write_trajectory

TOML = (Path(__file__).resolve().parent.parent / "enpire.toml").read_text()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_enpire_toml_gives_config_error_or_a_valid_config(data):
    text = TOML
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["delete", "insert", "replace_value", "duplicate_line"]))
        lines = text.splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        if kind == "delete":
            j = data.draw(st.integers(0, max(0, len(text) - 1)))
            text = text[:j] + text[j + data.draw(st.integers(1, 20)):]
        elif kind == "insert":
            j = data.draw(st.integers(0, len(text)))
            text = text[:j] + data.draw(st.text(max_size=12)) + text[j:]
        elif kind == "replace_value" and "=" in lines[i]:
            key = lines[i].split("=")[0]
            value = data.draw(st.sampled_from(["-1", "0", "1e309", '"x"', "[]", "{}", "true", "nan", "99999999999"]))
            lines[i] = f"{key}= {value}"
            text = "\n".join(lines)
        else:
            lines.insert(i, lines[i])
            text = "\n".join(lines)
    try:
        config = cfg.decode(text, "enpire.toml")
    except cfg.ConfigError as e:
        message = str(e)
        assert message.startswith("enpire.toml: ") and "\n" not in message.strip()
        return
    cfg.check(config)  # whatever decoded is a consistent configuration


def _episode_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "e.npz"
    write_trajectory(path, rng.normal(size=(31, 5)).astype(np.float32), rng.normal(size=(30, 2)).astype(np.float32),
                     rng.normal(size=30).astype(np.float32))
    return path


def test_episode_file_round_trip(tmp_path):
    arrays = read_trajectory(_episode_file(tmp_path))
    assert arrays["observations"].shape == (31, 5) and arrays["actions"].shape == (30, 2)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_truncated_or_corrupted_episode_files_name_the_file(tmp_path, data):
    path = _episode_file(tmp_path)
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    try:
        arrays = read_trajectory(bad)
    except EpisodeFileError as e:
        assert str(bad) in str(e)
        return
    assert set(arrays) == {"observations", "actions", "rewards"}  # the damage missed the data


def test_episode_file_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, observations=np.array([object()], dtype=object), actions=np.zeros((0, 2)), rewards=np.zeros(0))
    with pytest.raises(EpisodeFileError, match="evil.npz"):
        read_trajectory(path)


RECORDS = [
    EpisodeRecord("e", "j", "agent", "pusht", 1, PolicySpec("c", {"a": 1.0}), "cell", Verdict(True, 1.0, "ok", "v"),
                  True, 1, 10, 0.1, 1.0, 0.01, 2.0),
    Finding("f", "agent-0", 1.0, "h", "c", "e", "improved", "fp", 0.5),
    Champion("pusht", PolicySpec("c"), 9, 10, 1.0),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(RECORDS), st.data())
def test_truncated_blackboard_records_give_record_error(tmp_path, record, data):
    board = Blackboard(tmp_path / "bb", map_size=1 << 22)
    raw = msgspec.msgpack.encode(record)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with board.write() as w:
        w._txn.put(b"k", raw[:cut], db=board._dbs["findings"])
    try:
        value = board.get("findings", "k", type(record))
    except RecordError as e:
        assert "table 'findings' key 'k'" in str(e)
    else:
        assert isinstance(value, type(record))
    board.close()


def test_random_bytes_as_records(tmp_path):
    board = Blackboard(tmp_path / "bb", map_size=1 << 22)
    rng = random.Random(0)
    for i in range(300):
        with board.write() as w:
            w._txn.put(f"k{i}".encode(), rng.randbytes(rng.randint(0, 200)), db=board._dbs["episodes"])
    for i in range(300):
        try:
            board.get("episodes", f"k{i}", EpisodeRecord)
        except RecordError:
            pass
