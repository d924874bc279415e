"""Scripted model servers on loopback, speaking each provider's streaming wire format.

`ScriptedModel("anthropic", script)` answers the Anthropic Messages API with SSE (what Claude Code
calls at ANTHROPIC_BASE_URL); `ScriptedModel("openai", script)` answers the OpenAI Responses API with
SSE (what Codex calls through a custom model provider's base_url). A script is a function from what the
request shows (`Exchange`: the tools offered, the latest tool results, the prompt) to a `Reply` (text
and tool calls). Every request is logged with the usage the server reported for it, so a test can
compare the fleet's token ledger with the server call for call.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass(frozen=True)
class Reply:
    text: str = ""
    calls: tuple[tuple[str, dict], ...] = ()  # (tool name as the CLI offered it, arguments)
    status: int = 200  # another status: the server answers with this HTTP error instead (no usage)
    delay_s: float = 0.0  # the server stalls this long before answering (a hung model call)


@dataclass(frozen=True)
class Usage:
    """What the server reported for one call, in the ledger's convention (input counts cached input)."""

    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int


@dataclass
class Exchange:
    """One request as the script sees it."""

    tools: list[str]  # names of the tools offered (MCP tools as the CLI names them)
    results: list[str]  # texts of the tool results the request ends with (the last turn's outputs)
    images: int  # images among those results
    prompt: str  # text of the first user message
    body: dict[str, Any]

    def tool(self, suffix: str) -> str:
        """The offered tool whose name ends with `suffix` (MCP tools carry a server prefix)."""
        for name in self.tools:
            if name == suffix or name.endswith("__" + suffix) or name.endswith("." + suffix):
                return name
        raise LookupError(f"no tool named *{suffix} among {self.tools}")


Script = Callable[[Exchange], Reply]


@dataclass
class Logged:
    path: str
    exchange: Exchange
    reply: Reply
    usage: Usage
    headers: dict[str, str]


def _texts(content: Any) -> tuple[list[str], int]:
    """Texts and image count of a tool result's content (string or list of blocks, either provider)."""
    if isinstance(content, str):
        return [content], 0
    texts, images = [], 0
    for block in content or []:
        kind = block.get("type", "")
        if kind in ("text", "input_text", "output_text"):
            texts.append(block.get("text", ""))
        elif kind in ("image", "input_image"):
            images += 1
    return texts, images


def _anthropic_exchange(body: dict) -> Exchange:
    tools = [t.get("name", "") for t in body.get("tools", [])]
    messages = body.get("messages", [])
    prompt = ""
    if messages:
        first = messages[0].get("content")
        prompt = first if isinstance(first, str) else "\n".join(_texts(first)[0])
    results, images = [], 0
    last = messages[-1] if messages else {}
    if last.get("role") == "user" and isinstance(last.get("content"), list):
        for block in last["content"]:
            if block.get("type") == "tool_result":
                t, i = _texts(block.get("content"))
                results.append("\n".join(t))
                images += i
    return Exchange(tools, results, images, prompt, body)


def _openai_exchange(body: dict, last_calls: set[str]) -> Exchange:
    tools = []
    for t in body.get("tools", []):
        if t.get("type") == "namespace":  # a group of tools (Codex puts MCP servers' tools in one)
            tools += [f"{t.get('name', '')}.{c.get('name', '')}" for c in t.get("tools", [])]
        else:
            tools.append(t.get("name", t.get("type", "")))
    items = body.get("input", [])
    prompt = ""
    for item in items:
        if item.get("role") == "user":
            prompt = "\n".join(_texts(item.get("content"))[0])
    results, images = [], 0
    for item in items:  # the outputs of the calls of the last reply
        if item.get("type") != "function_call_output" or item.get("call_id") not in last_calls:
            continue
        t, i = _texts(item.get("output"))
        results.append("\n".join(t))
        images += i
    return Exchange(tools, results, images, prompt, body)


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class ScriptedModel:
    """A loopback model server; `url` is its base URL (Anthropic: no /v1; OpenAI: with /v1)."""

    def __init__(self, provider: Literal["anthropic", "openai"], script: Script, model: str = "scripted-1"):
        self.provider = provider
        self.script = script
        self.model = model
        self.log: list[Logged] = []
        self.errors: list[str] = []  # script failures (a test asserts there are none)
        self.errors_sent: list[int] = []  # HTTP errors the script asked for
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_calls: set[str] = set()  # call ids of the last reply (OpenAI: whose outputs come next)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}" + ("/v1" if self.provider == "openai" else "")

    def __enter__(self) -> ScriptedModel:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    # -------------------------------------------------------------- replies

    def _usage(self, body: bytes, reply: Reply, first: bool) -> Usage:
        """Deterministic usage from the sizes of the request and the reply (differs call to call)."""
        size = len(body) // 4 + 1
        cached = size // 3 if not first else 0
        write = 0 if self.provider == "openai" else (size // 5 if first else 11)
        out = len(json.dumps([reply.text, reply.calls])) // 4 + 3
        reasoning = out // 2 if self.provider == "openai" else 0
        return Usage(size + write, cached, write, out, reasoning)

    def respond(self, path: str, raw: bytes, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, "application/json", b'{"error": "body is not JSON"}'
        if self.provider == "anthropic" and path.rstrip("/").endswith("/v1/messages/count_tokens"):
            return 200, "application/json", json.dumps({"input_tokens": len(raw) // 4 + 1}).encode()
        wanted = "/v1/messages" if self.provider == "anthropic" else "/v1/responses"
        if path.split("?")[0].rstrip("/") != wanted:
            return 404, "application/json", json.dumps({"error": f"no such endpoint {path}"}).encode()
        exchange = (_anthropic_exchange(body) if self.provider == "anthropic"
                    else _openai_exchange(body, self._last_calls))
        with self._lock:
            try:
                reply = self.script(exchange)
            except Exception as e:  # a script bug shows in the test, not as a hung CLI
                self.errors.append(f"{type(e).__name__}: {e}")
                reply = Reply(text=f"script error: {e}")
            if reply.status != 200:
                self.errors_sent.append(reply.status)
                kind = "invalid_request_error" if reply.status < 500 else "api_error"
                error = {"type": "error", "error": {"type": kind, "message": reply.text or "scripted error"}}
                return reply.status, "application/json", json.dumps(error).encode()
            usage = self._usage(raw, reply, first=not self.log)
            self.log.append(Logged(path, exchange, reply, usage, dict(headers or {})))
        if reply.delay_s:
            self._stop.wait(reply.delay_s)
        stream = self._anthropic(reply, usage) if self.provider == "anthropic" else self._openai(reply, usage)
        return 200, "text/event-stream", b"".join(stream)

    def _anthropic(self, reply: Reply, u: Usage):
        uncached = u.input_tokens - u.cached_input_tokens - u.cache_write_tokens
        msg = {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant", "model": self.model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": uncached, "cache_read_input_tokens": u.cached_input_tokens,
                         "cache_creation_input_tokens": u.cache_write_tokens, "output_tokens": 1}}
        yield _sse("message_start", {"type": "message_start", "message": msg})
        index = 0
        if reply.text:
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": reply.text}})
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        for name, args in reply.calls:
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:16]}", "name": name, "input": {}}
            yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "input_json_delta", "partial_json": json.dumps(args)}})
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        stop = "tool_use" if reply.calls else "end_turn"
        yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": u.output_tokens}})
        yield _sse("message_stop", {"type": "message_stop"})

    def _openai(self, reply: Reply, u: Usage):
        rid = f"resp_{uuid.uuid4().hex[:16]}"
        seq = iter(range(1_000_000))
        base = {"id": rid, "object": "response", "created_at": 0, "model": self.model, "status": "in_progress",
                "output": []}
        yield _sse("response.created", {"type": "response.created", "sequence_number": next(seq), "response": base})
        items = []
        if reply.text:
            items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "role": "assistant",
                          "status": "completed",
                          "content": [{"type": "output_text", "text": reply.text, "annotations": []}]})
        for name, args in reply.calls:
            namespace, _, short = name.rpartition(".")  # a tool of a namespace (Codex: MCP servers' tools)
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:12]}",
                    "call_id": f"call_{uuid.uuid4().hex[:12]}", "name": short, "arguments": json.dumps(args),
                    "status": "completed"}
            if namespace:
                item["namespace"] = namespace
            items.append(item)
        self._last_calls = {i["call_id"] for i in items if i["type"] == "function_call"}
        for i, item in enumerate(items):
            yield _sse("response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq),
                                                      "output_index": i, "item": item})
            if item["type"] == "message":
                yield _sse("response.output_text.delta", {"type": "response.output_text.delta",
                                                          "sequence_number": next(seq), "item_id": item["id"],
                                                          "output_index": i, "content_index": 0, "delta": reply.text})
            yield _sse("response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(seq),
                                                     "output_index": i, "item": item})
        usage = {"input_tokens": u.input_tokens, "input_tokens_details": {"cached_tokens": u.cached_input_tokens},
                 "output_tokens": u.output_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                 "total_tokens": u.input_tokens + u.output_tokens}
        done = dict(base, status="completed", output=items, usage=usage)
        yield _sse("response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": done})

    def _handler(self):
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, kind: str, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", kind)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client was stopped mid-call (a test's doing)

            def do_GET(self) -> None:
                self._send(404, "application/json", b'{"error": "not found"}')

            do_HEAD = do_GET

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                self._send(*model.respond(self.path, raw, {k.lower(): v for k, v in self.headers.items()}))

        return Handler


@dataclass
class Steps:
    """A script made of steps taken in order, each a function of the exchange; side requests (a CLI's
    own housekeeping calls without the main tools) get `side` and do not advance the steps."""

    steps: list[Callable[[Exchange], Reply]]
    main_tool: str  # a tool only the main agent loop offers (Claude Code: "Bash"; Codex: "exec_command")
    side: Reply = field(default_factory=lambda: Reply(text="ok"))
    done: Reply = field(default_factory=lambda: Reply(text="Done for this turn."))
    taken: int = 0
    seen: list[Exchange] = field(default_factory=list)

    def __call__(self, ex: Exchange) -> Reply:
        if self.main_tool not in ex.tools:
            return self.side
        self.seen.append(ex)
        if self.taken >= len(self.steps):
            return self.done
        step = self.steps[self.taken]
        self.taken += 1
        return step(ex)
