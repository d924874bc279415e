"""Scripted loopback model servers in each API's wire format (Anthropic Messages, OpenAI Chat Completions,
OpenAI Responses), for driving the agent loop through the official SDKs. Every request is logged with the
usage the server reported for it, so a test can compare the token ledger with the server call for call."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

APIS = ("anthropic", "openai", "responses")

# A step answers one POST: given (headers, body) it returns (status, body bytes, extra headers, delay).
Step = Callable[[dict, dict], tuple[int, bytes, dict, float]]


@dataclass
class Logged:
    method: str
    path: str
    headers: dict
    body: dict
    t: float
    usage: dict | None = None  # what the server reported (None for errors and GETs)


@dataclass
class ScriptedAPI:
    steps: list[Step]
    fallback: Step
    models: tuple[str, ...] = ("claude-test", "gpt-test")  # GET /v1/models/{id} knows these; others are 404
    requests: list[Logged] = field(default_factory=list)

    def __post_init__(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                model = self.path.rsplit("/", 1)[-1]
                api.requests.append(Logged("GET", self.path, dict(self.headers), {}, time.time()))
                if model in api.models:
                    self._answer(200, json.dumps({"type": "model", "id": model, "object": "model", "created": 1,
                                                  "owned_by": "test", "display_name": model,
                                                  "created_at": "2025-01-01T00:00:00Z"}).encode(), {})
                else:
                    self._answer(404, json.dumps(_not_found(model)).encode(), {})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = json.loads(raw)
                entry = Logged("POST", self.path, headers, body, time.time())
                api.requests.append(entry)
                step = api.steps.pop(0) if api.steps else api.fallback
                status, data, extra, delay = step(headers, body)
                if status == 200:
                    try:
                        entry.usage = json.loads(data).get("usage")
                    except ValueError:
                        pass
                time.sleep(delay)
                self._answer(status, data, extra)

            def _answer(self, status, data, extra):
                try:
                    self.send_response(status)
                    for k, v in {"content-type": "application/json", "content-length": str(len(data)), **extra}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout): nothing to answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def posts(self) -> list[Logged]:
        return [r for r in self.requests if r.method == "POST"]

    def answered(self) -> list[Logged]:
        return [r for r in self.posts() if r.usage is not None]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _not_found(model: str) -> dict:
    return {"type": "error", "error": {"type": "not_found_error", "message": f"model: {model}",
                                       "code": "model_not_found"}}


def not_found(h: dict, b: dict) -> tuple[int, bytes, dict, float]:
    return 404, json.dumps(_not_found(b.get("model", ""))).encode(), {}, 0.0


def usage_for(api: str, i: int) -> dict:
    """A different split every call, each call 1000 tokens in all (input with cache + output)."""
    if api == "anthropic":  # input_tokens excludes cache reads and writes
        return {"input_tokens": 800 - 100 * (i % 7), "cache_read_input_tokens": 100 * (i % 7),
                "cache_creation_input_tokens": 50, "output_tokens": 150}
    if api == "openai":
        return {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1000,
                "prompt_tokens_details": {"cached_tokens": 100 * (i % 7)},
                "completion_tokens_details": {"reasoning_tokens": 10 * (i % 5)}}
    return {"input_tokens": 900, "output_tokens": 100, "total_tokens": 1000,
            "input_tokens_details": {"cached_tokens": 100 * (i % 7)},
            "output_tokens_details": {"reasoning_tokens": 10 * (i % 5)}}


def expected_ledger(api: str, usage: dict) -> tuple[int, int, int, int, int]:
    """(input incl. cache, cached, cache write, output, reasoning) as the ledger must record `usage`."""
    if api == "anthropic":
        read, write = usage.get("cache_read_input_tokens", 0), usage.get("cache_creation_input_tokens", 0)
        return usage["input_tokens"] + read + write, read, write, usage["output_tokens"], 0
    if api == "openai":
        return (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], 0,
                usage["completion_tokens"], usage["completion_tokens_details"]["reasoning_tokens"])
    return (usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"], 0, usage["output_tokens"],
            usage["output_tokens_details"]["reasoning_tokens"])


def reply(api: str, calls: list[tuple[str, dict | str]], i: int, *, text: str = "", stop: str = "",
          refusal: str = "") -> Step:
    """One model reply with these tool calls; `stop`: "" (normal), "max_tokens" (cut off), "refusal"."""
    usage = usage_for(api, i)

    def step(h: dict, b: dict) -> tuple[int, bytes, dict, float]:
        resolved = [(name, args(b) if callable(args) else args) for name, args in calls]
        return 200, json.dumps(_body(api, resolved, i, text, stop, refusal, usage)).encode(), {}, 0.0

    return step


def _body(api, calls, i, text, stop, refusal, usage) -> dict:
    enc = [(n, a if isinstance(a, str) else json.dumps(a)) for n, a in calls]
    if api == "anthropic":
        content = ([{"type": "text", "text": refusal or text}] if (refusal or text) else [])
        content += [{"type": "tool_use", "id": f"toolu_{i}_{k}", "name": n, "input": json.loads(a) if a.startswith("{")
                     else {}} for k, (n, a) in enumerate(enc)]
        reason = {"max_tokens": "max_tokens", "refusal": "refusal"}.get(stop) or ("tool_use" if calls else "end_turn")
        return {"id": f"msg_{i}", "type": "message", "role": "assistant", "model": "claude-test", "content": content,
                "stop_reason": reason, "stop_sequence": None, "usage": usage}
    if api == "openai":
        message = {"role": "assistant", "content": text or None, "refusal": refusal or None}
        if calls:
            message["tool_calls"] = [{"id": f"call_{i}_{k}", "type": "function", "function": {"name": n, "arguments": a}}
                                     for k, (n, a) in enumerate(enc)]
        reason = {"max_tokens": "length"}.get(stop) or ("tool_calls" if calls else "stop")
        return {"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1, "model": "gpt-test",
                "choices": [{"index": 0, "finish_reason": reason, "message": message}], "usage": usage}
    output: list[dict] = []
    if text or refusal:
        part = {"type": "refusal", "refusal": refusal} if refusal else {"type": "output_text", "text": text,
                                                                         "annotations": []}
        output.append({"type": "message", "id": f"msg_{i}", "role": "assistant", "status": "completed",
                       "content": [part]})
    output += [{"type": "function_call", "id": f"fc_{i}_{k}", "call_id": f"call_{i}_{k}", "name": n, "arguments": a,
                "status": "completed"} for k, (n, a) in enumerate(enc)]
    body = {"id": f"resp_{i}", "object": "response", "created_at": 1, "model": "gpt-test",
            "status": "incomplete" if stop == "max_tokens" else "completed", "output": output, "usage": usage,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    if stop == "max_tokens":
        body["incomplete_details"] = {"reason": "max_output_tokens"}
    return body


def output_cap(api: str, body: dict) -> int:
    return body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")


def job_ids(body: dict) -> list[str]:
    """Job ids the request shows (in tool outputs or the briefing), in order of appearance."""
    return list(dict.fromkeys(re.findall(r'\\?"job\\?":\s*\\?"([\w-]+)', json.dumps(body))))


def canonical(api: str, body: dict) -> str:
    """The request's content in the order providers cache it: tools, system, then the conversation."""
    if api == "anthropic":
        return json.dumps([body["tools"], body["system"], body["messages"]])
    if api == "openai":
        return json.dumps([body["tools"], body["messages"]])
    return json.dumps([body["tools"], body["instructions"], body["input"]])


def shared_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
