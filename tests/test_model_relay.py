"""The metering model relay of CLI agents: token check, budget refusal, usage read off the wire."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from enpire.agents.model_relay import ModelRelay, UsageMeter, forward
from tests.scripted_models import Reply, ScriptedModel


def _post(port: int, path: str, body: dict, key: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=json.dumps(body), headers={"x-api-key": key, "content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


@pytest.mark.parametrize("provider,path", [("anthropic", "/v1/messages"), ("openai", "/responses")])
def test_relay_records_each_call_as_the_server_reported_it(tmp_path, provider, path):
    replies = iter([Reply(text="a"), Reply(text="bb", calls=(("Bash", {"command": "ls"}),)), Reply(text="ccc")])
    recorded, refusals = [], []
    with ScriptedModel(provider, lambda ex: next(replies)) as model:
        relay = ModelRelay(tmp_path / "model.sock", model.url, token="relay-token", key="sk-real-key",
                           record=recorded.append, allow=lambda: None, on_refusal=refusals.append).start()
        port = forward(0, str(tmp_path / "model.sock"))
        try:
            for i in range(3):
                status, data = _post(port, path, {"model": "m", "stream": True, "messages": [{"role": "user",
                                                                                                "content": "x" * (100 * i)}]},
                                     "relay-token")
                assert status == 200 and b"event:" in data
            status, _ = _post(port, path, {"model": "m"}, "sk-guessed")
            assert status == 401 and refusals == ["model relay: wrong or missing relay token"]
        finally:
            relay.close()
    assert len(recorded) == len(model.log) == 3
    for got, logged in zip(recorded, model.log, strict=True):
        u = logged.usage
        assert (got.input_tokens, got.cached_input_tokens, got.cache_write_tokens, got.output_tokens,
                got.reasoning_tokens) == (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens,
                                          u.output_tokens, u.reasoning_tokens)
    assert len({r.input_tokens for r in recorded}) == 3  # the usage differs call to call: no constant passes


def test_relay_refuses_past_the_budget_and_replaces_the_key(tmp_path):
    with ScriptedModel("anthropic", lambda ex: Reply(text="ok")) as model:
        spent = []
        relay = ModelRelay(tmp_path / "m.sock", model.url, token="t0k", key="sk-real",
                           record=spent.append, allow=lambda: "token budget exhausted (10 of 10)" if spent else None)
        relay.start()
        port = forward(0, str(tmp_path / "m.sock"))
        try:
            assert _post(port, "/v1/messages", {"model": "m", "stream": True, "messages": []}, "t0k")[0] == 200
            status, data = _post(port, "/v1/messages", {"model": "m", "stream": True, "messages": []}, "t0k")
        finally:
            relay.close()
    assert status == 400 and b"token budget exhausted" in data
    assert len(model.log) == 1 and len(spent) == 1
    assert model.log[0].headers["x-api-key"] == "sk-real"  # the CLI held only its relay token


def test_usage_meter_reads_chat_completions_and_json_bodies():
    meter = UsageMeter("m")
    meter.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, '
               b'"prompt_tokens_details": {"cached_tokens": 2}}}\n\ndata: [DONE]\n\n')
    u = meter.finish()
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens) == (7, 2, 3)
    body = json.dumps({"type": "message", "model": "claude", "usage": {"input_tokens": 5, "output_tokens": 4,
                                                                      "cache_read_input_tokens": 6}}).encode()
    u = UsageMeter("m").finish(body)
    assert (u.model, u.input_tokens, u.cached_input_tokens, u.output_tokens) == ("claude", 11, 6, 4)
    assert UsageMeter("m").finish(b"not json") is None


def test_a_call_the_cli_hangs_up_on_is_still_recorded(tmp_path):

    recorded = []
    with ScriptedModel("openai", lambda ex: Reply(text="late", delay_s=0.5)) as model:
        relay = ModelRelay(tmp_path / "m.sock", model.url, token="t", key="k", record=recorded.append,
                           allow=lambda: None).start()
        port = forward(0, str(tmp_path / "m.sock"))
        try:
            body = json.dumps({"model": "m", "stream": True, "input": []}).encode()
            with socket.create_connection(("127.0.0.1", port)) as s:  # send, then hang up before the reply
                s.sendall(b"POST /responses HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t\r\n"
                          b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 10
            while not recorded and time.time() < deadline:
                time.sleep(0.05)
        finally:
            relay.close()
    assert len(recorded) == len(model.log) == 1  # the provider answered (and bills) it: the ledger has it
    assert recorded[0].output_tokens == model.log[0].usage.output_tokens


@contextlib.contextmanager
def _relay(tmp_path, recorded: list):
    """A relay to a scripted Anthropic server, and the loopback port a jail's forwarder gives the CLI."""
    with ScriptedModel("anthropic", lambda ex: Reply(text="ok")) as model:
        relay = ModelRelay(tmp_path / "m.sock", model.url, token="t0k", key="sk-real", record=recorded.append,
                           allow=lambda: None).start()
        try:
            yield model, forward(0, str(tmp_path / "m.sock"))
        finally:
            relay.close()


def _call_ok(port: int) -> int:
    return _post(port, "/v1/messages", {"model": "m", "stream": True, "messages": []}, "t0k")[0]


def test_a_hostile_body_from_the_jail_is_answered_and_the_relay_keeps_serving(tmp_path):
    """The relay reads the model name from the CLI's request body; a body nested past the parser's limit,
    or one whose model is not a string, must not cost the relay its answer or its next call."""
    recorded, statuses = [], []
    with _relay(tmp_path, recorded) as (_model, port):
        for body in (b"[" * 100_000, b'{"model": ' * 5_000, json.dumps({"model": {"x": [1]}}).encode()):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/v1/messages", body=body, headers={"x-api-key": "t0k"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            conn.close()
        status = _call_ok(port)
    assert all(100 <= s < 600 for s in statuses)  # an HTTP answer each, whatever upstream made of the body
    assert status == 200 and recorded and recorded[-1].input_tokens > 0


def test_the_relay_bounds_bodies_connections_and_silent_clients(tmp_path, monkeypatch):
    """A content-length the relay would have to hold (or none it can read) is refused before any body is
    read; connections that send nothing are at most MAX_CONNECTIONS threads, each closed after
    CLIENT_TIMEOUT_S; then calls are served again."""
    from enpire.agents import model_relay

    monkeypatch.setattr(model_relay, "CLIENT_TIMEOUT_S", 1.0)
    recorded, statuses, idle = [], [], []
    with _relay(tmp_path, recorded) as (model, port):
        for length in (str(1 << 40), "-5", "many"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"POST /v1/messages HTTP/1.1\r\nx-api-key: t0k\r\ncontent-length: {length}\r\n\r\n".encode())
                statuses.append(s.recv(100).split(b" ")[1])
        threads = threading.active_count()
        for _ in range(model_relay.MAX_CONNECTIONS + 8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(tmp_path / "m.sock"))
            idle.append(s)
        time.sleep(0.5)
        held = threading.active_count() - threads
        time.sleep(3.0)  # past the client timeout: the silent ones are closed
        status = _call_ok(port)
        for s in idle:
            s.close()
    assert statuses == [b"413"] * 3 and not model.log[:-1]  # none of them reached the model
    assert 0 < held <= model_relay.MAX_CONNECTIONS
    assert status == 200 and len(recorded) == 1
