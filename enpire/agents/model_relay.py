"""The model endpoint of a CLI agent: a metering relay in the daemon, reached from inside the jail.

A CLI coding agent runs in its own network namespace; the only way out is one unix socket bound into its
jail. Inside, `forward()` (run by `enpire.agents.jail_init`) listens on loopback TCP and pipes each
connection to that socket; outside, `ModelRelay` reads each HTTP request, checks the per-agent relay
token the CLI was given instead of a real key, refuses a call once the agent's token budget is spent,
forwards the call to the real endpoint with the real key in the header the CLI used, and streams the reply back while reading the
usage the provider reports (Anthropic Messages and OpenAI Responses / Chat Completions, streaming SSE or
JSON). So every model call lands in the token ledger as it happens, whatever the CLI prints, and the
CLI never holds a key of the fleet.

Threads, not trio: each connection is a blocking byte pipe, and the ledger callback is thread-safe.
"""

from __future__ import annotations

import hmac
import http.client
import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from enpire import ledger
from enpire.agents.model import Usage
from enpire.untrusted_json import json_object

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}
AUTH_HEADERS = ("x-api-key", "authorization", "api-key")


@dataclass(frozen=True)
class CallUsage(Usage):
    """One model call as the provider reported it, and which model answered."""

    model: str = ""


class UsageMeter:
    """Reads the usage out of a provider's reply as its bytes pass (SSE events or one JSON body)."""

    def __init__(self, model: str):
        self.model = model
        self.found = False
        self.u = dict(input=0, cached=0, write=0, output=0, reasoning=0)
        self._buf = b""

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def finish(self, whole_body: bytes | None = None) -> CallUsage | None:
        if whole_body is not None:  # a JSON (non-streaming) reply
            self._event(whole_body)
        elif self._buf.strip().startswith(b"data:"):
            self._event(self._buf.strip()[5:].strip())
        if not self.found:
            return None
        u = self.u
        return CallUsage(input_tokens=u["input"], cached_input_tokens=u["cached"], cache_write_tokens=u["write"],
                         output_tokens=u["output"], reasoning_tokens=u["reasoning"], model=self.model)

    def _event(self, data: bytes) -> None:
        event = json_object(data)
        if event is None:
            return
        kind = event.get("type", "")
        if kind == "message_start":  # Anthropic: input side (and a placeholder output count)
            self._anthropic(event.get("message", {}))
        elif kind == "message_delta":  # Anthropic: the final output count
            usage = event.get("usage") or {}
            if "output_tokens" in usage:
                self.u["output"] = int(usage["output_tokens"] or 0)
                self.found = True
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self._responses(event.get("response", {}))
        elif kind == "message":  # Anthropic JSON reply
            self._anthropic(event)
        elif event.get("object") == "response":  # OpenAI Responses JSON reply
            self._responses(event)
        elif isinstance(event.get("usage"), dict) and "prompt_tokens" in event["usage"]:  # Chat Completions
            u = event["usage"]
            self.model = event.get("model") or self.model
            cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            reasoning = int((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
            self.u.update(input=int(u.get("prompt_tokens") or 0), cached=cached, write=0,
                          output=int(u.get("completion_tokens") or 0), reasoning=reasoning)
            self.found = True

    def _anthropic(self, message: dict) -> None:
        u = message.get("usage") or {}
        if not u:
            return
        self.model = message.get("model") or self.model
        cached = int(u.get("cache_read_input_tokens") or 0)
        write = int(u.get("cache_creation_input_tokens") or 0)
        self.u.update(input=ledger.anthropic_input(int(u.get("input_tokens") or 0), cached, write), cached=cached, write=write,
                      output=int(u.get("output_tokens") or 0))
        self.found = True

    def _responses(self, response: dict) -> None:
        u = response.get("usage") or {}
        if not u:
            return
        self.model = response.get("model") or self.model
        self.u.update(input=int(u.get("input_tokens") or 0), write=0,
                      cached=int((u.get("input_tokens_details") or {}).get("cached_tokens") or 0),
                      output=int(u.get("output_tokens") or 0),
                      reasoning=int((u.get("output_tokens_details") or {}).get("reasoning_tokens") or 0))
        self.found = True


MAX_BODY = 32 << 20  # one model request (the providers' own limit is about this)
MAX_CONNECTIONS = 16  # open at once: each is a thread and a descriptor of the daemon's
CLIENT_TIMEOUT_S = 120.0  # a CLI that stops sending or reading mid-request holds its connection no longer


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A thread per connection, at most MAX_CONNECTIONS of them: a jail that opens more gets them closed."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(timeout=1.0):  # never blocks the accept loop (or shutdown) for long
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ModelRelay:
    """The daemon's end of one CLI agent's model endpoint (a unix socket at `path`).

    `record(usage)` is called once per model call the provider answered with usage; `allow()` says
    whether the agent may make another call (its token budget); `token` is what the CLI sends as its key.
    """

    def __init__(self, path: Path, upstream: str, *, token: str, key: str,
                 record: Callable[[CallUsage], None], allow: Callable[[], str | None], on_refusal=None,
                 timeout_s: float = 300.0):
        self.path = Path(path)
        self.upstream = urlsplit(upstream.rstrip("/"))
        if self.upstream.scheme not in ("http", "https") or not self.upstream.hostname:
            raise ValueError(f"[agents] base_url = {upstream!r}: expected http(s)://host[:port][/path]")
        self.token, self.key = token, key
        self.record, self.allow, self.timeout_s = record, allow, timeout_s
        self.on_refusal = on_refusal or (lambda reason: None)
        self.calls = 0
        if self.path.exists():
            self.path.unlink()
        self._server = _UnixHTTPServer(str(self.path), self._handler())
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-relay", daemon=True)

    def start(self) -> ModelRelay:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)

    def _connect(self) -> http.client.HTTPConnection:
        u = self.upstream
        if u.scheme == "https":
            return http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=self.timeout_s)
        return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.timeout_s)

    def _authorised(self, headers) -> tuple[str, bool] | None:
        """(header, bearer) the CLI sent its relay token in; None when no header holds the token."""
        for name in AUTH_HEADERS:
            value = headers.get(name, "")
            bearer = value.lower().startswith("bearer ")
            if bearer:
                value = value[7:]
            if value and hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return name, bearer
        return None

    def _handler(self):
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = CLIENT_TIMEOUT_S

            def log_message(self, *args) -> None:
                pass

            def _refuse(self, status: int, message: str) -> None:
                relay.on_refusal(message)
                body = json.dumps({"type": "error", "error": {"type": "enpire_refused", "message": message}}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _relay(self) -> None:
                length = self.headers.get("content-length") or "0"
                if not length.isdigit() or int(length) > MAX_BODY:
                    self.close_connection = True  # its body is not read: nothing after it can be parsed
                    return self._refuse(413, f"model relay: a request needs a content-length of at most {MAX_BODY} "
                                             f"bytes, not {length[:20]!r}")
                raw = self.rfile.read(int(length))
                auth = relay._authorised(self.headers)
                if auth is None:
                    return self._refuse(401, "model relay: wrong or missing relay token")
                reason = relay.allow() if self.command == "POST" else None
                if reason:
                    return self._refuse(429 if "budget" not in reason else 400, reason)
                model = str((json_object(raw) or {}).get("model", ""))[:200]
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP
                           and k.lower() not in AUTH_HEADERS}
                name, bearer = auth  # the real key goes where the CLI put its token (x-api-key, Bearer, ...)
                headers[name] = f"Bearer {relay.key}" if bearer else relay.key
                headers["content-length"] = str(len(raw))
                path = relay.upstream.path + self.path
                try:
                    conn = relay._connect()
                    conn.request(self.command, path, body=raw, headers=headers)
                    resp = conn.getresponse()
                except OSError as e:
                    return self._refuse(502, f"model relay: upstream {relay.upstream.geturl()} unreachable: {e}")
                try:
                    self._stream(resp, model)
                finally:
                    conn.close()

            def _stream(self, resp, model: str) -> None:
                # The provider bills a call it answered even if the CLI hangs up mid-stream (a CLI that is
                # stopped, or one that drops a request): read the reply to its end whatever the client does.
                meter = UsageMeter(model)
                streaming = "text/event-stream" in (resp.getheader("content-type") or "")
                body = bytearray()
                client = True
                try:
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_BY_HOP:
                            self.send_header(k, v)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                except OSError:
                    client = False
                while True:
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    if streaming:
                        meter.feed(chunk)
                    elif len(body) < 8 << 20:
                        body += chunk
                    if client:
                        try:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                        except OSError:
                            client = False
                if client:
                    try:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                    except OSError:
                        pass
                else:
                    self.close_connection = True
                usage = meter.finish(None if streaming else bytes(body))
                if usage is not None and 200 <= resp.status < 300:
                    relay.calls += 1
                    relay.record(usage)

            do_POST = do_GET = _relay

        return Handler


def forward(listen_port: int, socket_path: str) -> int:
    """Inside the jail: accept loopback TCP on `listen_port` (0 = any) and pipe each connection to the
    daemon's unix socket. Returns the port; the accept loop runs in a daemon thread."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve(client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(socket_path)
        except OSError:
            client.close()
            return
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        pipe(upstream, client)
        client.close()
        upstream.close()

    def accept() -> None:
        while True:
            client, _ = server.accept()
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, name="forward", daemon=True).start()
    return server.getsockname()[1]
