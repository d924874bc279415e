"""The TensorBoard sink writes progress events as scalars that TensorBoard's own format reads back."""

import struct

import pytest

from bus.messages import Progress
from enpire import sinks

tensorboardX = pytest.importorskip("tensorboardX", reason="the [tensorboard] extra is not installed")


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `logdir`, parsed with tensorboardX's Event protobuf."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_progress_events_become_tensorboard_scalars(tmp_path):
    sink = sinks.TensorBoardSink(tmp_path / "tb", started=1000.0)
    for i, t in enumerate((1010.0, 1020.0, 1030.0)):
        sink.write(Progress(t=t, episodes=10 * (i + 1), champion="c", champion_success=0.5 + 0.1 * i,
                            champion_n=30 * i, mru=0.8, tokens=500 * i, tokens_per_min=100.0, time_left_s=90.0 - t + 1000))
    sink.close()
    scalars = _scalars(tmp_path / "tb")
    assert scalars["fleet/episodes"] == [(10, 10.0), (20, 20.0), (30, 30.0)]
    assert [round(v, 3) for _, v in scalars["champion/success_confirmed"]] == [0.5, 0.6, 0.7]
    assert scalars["fleet/time_left_s"][-1] == (30, 60.0)
    assert scalars["fleet/tokens"][-1] == (30, 1000.0)


def test_missing_package_is_a_clear_refusal(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    with pytest.raises(sinks.SinkUnavailable, match=r"tensorboardX is not installed: pip install"):
        sinks.TensorBoardSink(tmp_path / "tb", started=0.0)
