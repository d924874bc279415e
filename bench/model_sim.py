"""A simulated hosted model: an OpenAI-compatible Chat Completions server on 127.0.0.1 for benchmarks.

The fleet's `openai` backend talks to it exactly as to a hosted model (same SDK, same wire format):
POST /v1/chat/completions answers `choices[0].message.tool_calls` (`function.name`, `arguments` as a
JSON string), `finish_reason: "tool_calls"` and `usage {prompt_tokens, completion_tokens,
prompt_tokens_details.cached_tokens}`.

Decisions. Each agent (told apart by the request's `user` field, which the framework sets to
"agent-N") has a state machine that follows the built-in researcher's method, acting only through the
tools the framework offers:

1. `read_files` (the current workspace);
2. `commit` the template `enpire/agents/pusht_policy.py` as policy.py (the full source is written out,
   so the reply costs its real output tokens);
3. cross-entropy generations: ONE reply with `population` parallel `evaluate` calls (params in policy
   units, scaled from [0, 1]^d with the built-in researcher's own helpers, `n_seeds` each) plus a
   `post_finding` on the previous generation; the next request's `role: "tool"` messages carry the
   results (JSON with successes, n, summary); score = success + 0.5 * mean progress (the built-in's
   score without its speed term, which the tool output does not carry);
4. a candidate whose tuning success reaches the target is validated on `validation_seeds` fresh
   tuning seeds, then `promote`d when validation also reaches it and no champion in the briefing is as
   good. The champion shown in the briefing (its params) is adopted as the search mean when it is
   better than the agent's own best: the team learns from each other through the blackboard.

Time. A reply takes ``overhead_s + input_tokens / input_tok_s + output_tokens / output_tok_s``.
Defaults 0.8 s, 4000 tok/s, 60 tok/s: the order of a hosted frontier model reached over the internet
(time to first token about 0.5-1 s, prefill a few thousand tokens per second, decoding 50-100 tokens
per second). Writing the 12.8 kB policy file (~3,200 tokens) therefore takes about 55 s, like a real
model typing it out. All three are constructor arguments (and `bench/mru_mtu.py` flags).

Tokens. No tokenizer can be downloaded here, so tokens are counted by a documented rule:
``ceil(utf8_bytes / 4)`` (OpenAI's own rule of thumb for English text and code) of
- input: the JSON text of the request's `messages` plus its `tools` (what the framework really sent);
- output: the JSON text of the reply message (its text and its tool calls with their arguments).
Cached input imitates automatic prefix caching: the byte prefix the request shares with the same
agent's previous request (tools first, then messages), counted in tokens, rounded down to a multiple
of 128 and only when it is at least 1024 tokens (OpenAI's published rule). Cached tokens are part of
`prompt_tokens`, as on the real API.

Faults. Set `sim.faults = Faults(...)` and arm provider failures (429, 500, timeout, malformed
bodies) that answer the next requests in place of the model; `bench/soak.py` does so at random times.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from enpire.agents import pusht_policy
from enpire.agents.builtin import BuiltinResearcher, SearchSettings

TEMPLATE_SOURCE = Path(pusht_policy.__file__).read_text()


def count_tokens(text: str) -> int:
    """The documented counting rule: ceil(utf-8 bytes / 4)."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def cached_tokens(previous: str, current: str) -> int:
    """Tokens of the prefix shared with the previous request, in steps of 128, from 1024 up."""
    n = min(len(previous), len(current))
    i = 0
    step = 4096
    while i < n:  # common prefix length, coarse to fine
        j = min(n, i + step)
        if previous[i:j] == current[i:j]:
            i = j
        elif step > 1:
            step //= 8
        else:
            break
    tokens = count_tokens(current[:i])
    return 0 if tokens < 1024 else tokens // 128 * 128


_CHAMPION = re.compile(r"## Champion\ncommit (\w+) params (\{.*?\}): judged (\d+)/(\d+) held-out")
_MEAN_SCORE = re.compile(r"mean score ([0-9.]+)")


@dataclass
class SearchConfig:
    population: int = 4  # parallel evaluate calls per generation (candidate 0 is the mean)
    n_seeds: int = 5  # tuning episodes per candidate
    validation_seeds: int = 10
    elites: int = 2
    init_std: float = 0.15
    min_std: float = 0.02
    smoothing: float = 0.3
    target: float = 0.9


@dataclass
class Candidate:
    kind: str  # "cand" or "validate"
    params: dict[str, float]
    x: np.ndarray


@dataclass
class AgentState:
    name: str
    helper: BuiltinResearcher  # parameter scaling [0, 1]^d <-> policy units
    rng: np.random.Generator
    mean: np.ndarray
    std: np.ndarray
    commit: str = ""
    generation: int = 0
    pending: dict[str, Any] = field(default_factory=dict)  # call id -> what it asked
    best_validated: float = 0.0
    promoting: bool = False
    last_body: str = ""
    last_finding: dict | None = None


class Policy:
    """The decisions: a function of the agent's state and the tool results the request carries."""

    def __init__(self, search: SearchConfig):
        self.search = search
        self.agents: dict[str, AgentState] = {}
        self.lock = threading.Lock()

    def _agent(self, name: str) -> AgentState:
        if name not in self.agents:
            index = int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else len(self.agents)
            helper = BuiltinResearcher(SearchSettings(), index, range(0, 1))
            mean = helper._unit(dict(pusht_policy.INITIAL_PARAMS))
            self.agents[name] = AgentState(name, helper, np.random.default_rng(1000 + index), mean,
                                           np.full_like(mean, self.search.init_std))
        return self.agents[name]

    def decide(self, name: str, messages: list[dict]) -> tuple[str, list[dict]]:
        """Returns (text, tool calls as [{"name", "arguments" (dict)}])."""
        with self.lock:
            a = self._agent(name)
            results = _tool_results(messages, a.pending)
            champion = _champion(messages)
            return self._step(a, results, champion)

    def _step(self, a: AgentState, results: list[tuple[Any, str]], champion) -> tuple[str, list[dict]]:
        s = self.search
        a.pending.clear()
        cands: list[tuple[Candidate, dict | None]] = []
        validation: tuple[Candidate, dict | None] | None = None
        for what, content in results:
            data = _loads(content)
            if what == "read_files":
                pass
            elif what == "commit" and data and data.get("commit"):
                a.commit = data["commit"]
            elif isinstance(what, Candidate) and what.kind == "cand":
                cands.append((what, data))
            elif isinstance(what, Candidate) and what.kind == "validate":
                validation = (what, data)
            elif what == "promote":
                a.promoting = False
        if not a.commit:
            if any(w == "read_files" for w, _ in results):
                return self._call(a, "Writing the phased push heuristic as policy.py.", [
                    ("commit", {"files": {"policy.py": TEMPLATE_SOURCE},
                                "message": "heuristic policy: approach behind the block, push, turn"})])
            return self._call(a, "Reading the workspace first.", [("read_files", {})])

        calls: list[tuple[Any, dict]] = []
        text = ""
        champ_rate = champion[2] / champion[3] if champion and champion[3] else 0.0
        # Adopt the champion (shown in the briefing) when it is better than where this search stands.
        if champion is not None and champ_rate > a.best_validated:
            try:
                params = json.loads(champion[1])
                a.mean = a.helper._unit({**pusht_policy.INITIAL_PARAMS, **params})
                a.best_validated = champ_rate
            except (ValueError, KeyError):
                pass
        if cands:
            scored = [(_rate(d) + 0.5 * _progress(d), c, d) for c, d in cands]
            scored.sort(key=lambda t: -t[0])
            elite = np.array([c.x for _, c, _ in scored[: s.elites]])
            new_mean = (1 - s.smoothing) * elite.mean(axis=0) + s.smoothing * a.mean
            stalled = scored[0][1] is cands[0][0]  # the mean itself was best
            a.std = np.maximum(elite.std(axis=0) * (1.5 if stalled else 1.0), s.min_std)
            best_score, best, best_data = scored[0]
            best_rate = _rate(best_data)
            moved = sorted(zip(a.helper.names, new_mean - a.mean, strict=True), key=lambda kv: -abs(kv[1]))[:3]
            a.mean = new_mean
            calls.append((("post_finding", None), _finding(
                f"generation {a.generation}: moving the search mean toward the elites improves success",
                "mean shift " + ", ".join(f"{k} {d:+.3f}" for k, d in moved),
                f"best {best_data.get('summary', '') if best_data else 'error'}",
                "no_change" if stalled else "improved")))
            validated_ok = validation is not None and _rate(validation[1]) >= s.target and _rate(validation[1]) > champ_rate
            if best_rate >= s.target and best_rate > champ_rate and not a.promoting and not validated_ok:
                calls.append((Candidate("validate", best.params, best.x),
                               {"commit": a.commit, "params": best.params, "n_seeds": s.validation_seeds}))
                text = f"Candidate reached {best_rate:.0%}: validating it on fresh seeds. "
        # The validation of a candidate came back: promote it if it reaches the target and beats the champion.
        if validation is not None:
            cand, data = validation
            rate = _rate(data)
            if rate >= s.target and rate > champ_rate and rate >= a.best_validated - 0.05:
                a.best_validated = max(a.best_validated, rate)
                a.promoting = True
                calls.append((("promote", None), {"commit": a.commit, "params": cand.params}))
                calls.append((("post_finding", None), _finding(
                    f"candidate validated at {rate:.0%} on {data.get('n', 0)} fresh tuning seeds should beat the "
                    "champion on held-out seeds", f"promotion request for params {_short(cand.params)}",
                    f"validation {data.get('summary', '')}", "improved")))
                return self._calls(a, text + f"Validated at {rate:.0%}: promoting.", calls)
        # The next generation, run side by side.
        a.generation += 1
        for i in range(s.population):
            x = a.mean.copy() if i == 0 else np.clip(a.mean + a.std * a.rng.standard_normal(a.mean.shape), 0, 1)
            params = a.helper._params(x)
            calls.append((Candidate("cand", params, x), {"commit": a.commit, "params": params, "n_seeds": s.n_seeds}))
        return self._calls(a, text + f"Generation {a.generation}: evaluating {s.population} candidates.", calls)

    def _call(self, a: AgentState, text: str, calls: list[tuple[str, dict]]) -> tuple[str, list[dict]]:
        return self._calls(a, text, [((name, None), args) for name, args in calls])

    def _calls(self, a: AgentState, text: str, calls: list[tuple[Any, dict]]) -> tuple[str, list[dict]]:
        out = []
        for what, args in calls:
            call_id = "call_" + uuid.uuid4().hex[:20]
            if isinstance(what, Candidate):
                name, a.pending[call_id] = "evaluate", what
            else:
                name = what[0]
                a.pending[call_id] = name
            out.append({"id": call_id, "name": name, "arguments": args})
        return text, out


def _finding(hypothesis: str, change: str, evidence: str, outcome: str) -> dict:
    return {"hypothesis": hypothesis[:1000], "change": change[:1000], "evidence": evidence[:2000] or "-",
            "outcome": outcome}


def _short(params: dict) -> str:
    return json.dumps({k: round(v, 3) for k, v in params.items()})


def _loads(content: str) -> dict | None:
    try:
        data = json.loads(content)
        return data if isinstance(data, dict) else None
    except (ValueError, TypeError):
        return None  # an error output (plain text)


def _rate(data: dict | None) -> float:
    if not data or not data.get("n"):
        return 0.0
    return float(data.get("successes", 0)) / float(data["n"])


def _progress(data: dict | None) -> float:
    m = _MEAN_SCORE.search((data or {}).get("summary", "") or "")
    return float(m.group(1)) if m else 0.0


def _tool_results(messages: list[dict], pending: dict[str, Any]) -> list[tuple[Any, str]]:
    """The outputs of this agent's last calls, matched by tool_call_id."""
    out = []
    for m in messages:
        if m.get("role") == "tool" and m.get("tool_call_id") in pending:
            out.append((pending[m["tool_call_id"]], m.get("content") or ""))
    return out


def _champion(messages: list[dict]):
    for m in messages:
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            match = _CHAMPION.search(m["content"])
            if match:
                return match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    return None


@dataclass
class Timing:
    overhead_s: float = 0.8
    input_tok_s: float = 4000.0
    output_tok_s: float = 60.0

    def latency(self, input_tokens: int, output_tokens: int) -> float:
        return self.overhead_s + input_tokens / self.input_tok_s + output_tokens / self.output_tok_s


@dataclass
class CallLog:
    agent: str
    t: float
    latency_s: float
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    tools: list[str]


class ModelSimulator:
    """The HTTP server (a thread per request) around `Policy`; `start()` returns the base_url."""

    faults: Faults | None = None  # set to inject provider failures (see `Faults`)

    def __init__(self, timing: Timing | None = None, search: SearchConfig | None = None, model: str = "sim-model"):
        self.timing = timing or Timing()
        self.policy = Policy(search or SearchConfig())
        self.model = model
        self.calls: list[CallLog] = []
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                fault = sim.faults.take(raw) if sim.faults is not None else None
                if fault is not None:
                    return self._fault(*sim.faults.reply(fault, self.headers.get("Authorization", "")))
                try:
                    body = json.loads(raw)
                    status, reply = sim.handle(body)
                except Exception as e:  # a malformed request: say so like the API does
                    status, reply = 400, {"error": {"message": f"{type(e).__name__}: {e}",
                                                    "type": "invalid_request_error"}}
                self._send(status, reply)

            def handle(self) -> None:
                try:
                    super().handle()
                except ConnectionError:  # the client went away (a killed daemon, a timeout): nobody to answer
                    pass

            def _fault(self, status: int, data: bytes, headers: dict[str, str], hold_s: float) -> None:
                time.sleep(hold_s)
                if not status:  # a timeout: the client has given up by now; drop the connection unanswered
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-sim", daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def handle(self, body: dict) -> tuple[int, dict]:
        began = time.time()
        messages = body["messages"]
        agent = str(body.get("user") or "agent-0")
        prompt_text = json.dumps(body.get("tools") or [], sort_keys=True) + json.dumps(messages)
        input_tokens = count_tokens(prompt_text)
        with self._lock:
            cached = cached_tokens(self._last.get(agent, ""), prompt_text)
            self._last[agent] = prompt_text
        text, calls = self.policy.decide(agent, messages)
        message = {"role": "assistant", "content": text or None,
                   "tool_calls": [{"id": c["id"], "type": "function",
                                   "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                                  for c in calls] or None}
        output_tokens = count_tokens(json.dumps({"content": message["content"], "tool_calls": message["tool_calls"]}))
        # max_tokens is not enforced: the simulator always answers in full and charges what it produced.
        finish = "tool_calls" if calls else "stop"
        latency = self.timing.latency(input_tokens, output_tokens)
        time.sleep(max(0.0, latency - (time.time() - began)))
        with self._lock:
            self.calls.append(CallLog(agent, began, latency, input_tokens, cached, output_tokens,
                                      [c["name"] for c in calls]))
        if not message["tool_calls"]:
            del message["tool_calls"]
        return 200, {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(began),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                      "total_tokens": input_tokens + output_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached}},
        }

    def summary(self) -> dict:
        with self._lock:
            calls = list(self.calls)
        agents = sorted({c.agent for c in calls})
        return {
            "calls": len(calls),
            "input_tokens": sum(c.input_tokens for c in calls),
            "cached_tokens": sum(c.cached_tokens for c in calls),
            "output_tokens": sum(c.output_tokens for c in calls),
            "model_time_s": round(sum(c.latency_s for c in calls), 1),
            "per_agent": {a: {"calls": sum(c.agent == a for c in calls),
                              "mean_input_tokens": round(float(np.mean([c.input_tokens for c in calls
                                                                        if c.agent == a])), 1),
                              "max_input_tokens": max(c.input_tokens for c in calls if c.agent == a)}
                          for a in agents},
        }


FAULT_KINDS = ("rate_limit", "server_error", "timeout", "bad_json", "not_completion")


@dataclass
class Fault:
    """One armed provider failure; the simulator notes when it fired and on which agent's request."""

    kind: str  # one of FAULT_KINDS
    agent: str = ""  # only this agent's requests meet it; "" = the next request of any agent
    fired_at: float | None = None
    fired_on: str = ""


class Faults:
    """Provider failures armed from outside (e.g. `bench/soak.py`), each answering one request in place
    of the model, in the order armed:

    - ``rate_limit``: 429 with a ``retry-after`` header of `retry_after_s`;
    - ``server_error``: 500 whose message echoes the request's Authorization header (as careless
      gateways do), so any unscrubbed path would leak the key;
    - ``timeout``: holds the request `hold_s` (set it past the client's timeout), then drops it;
    - ``bad_json``: 200 with a completion cut off mid-body;
    - ``not_completion``: 200 with valid JSON that is no completion (an inference server's error object).

    The model never sees a faulted request, so the agent's retry gets the decision it would have got."""

    def __init__(self, hold_s: float, retry_after_s: float = 1.0):
        self.hold_s = hold_s
        self.retry_after_s = retry_after_s
        self._armed: list[Fault] = []
        self._lock = threading.Lock()

    def arm(self, kind: str, agent: str = "") -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r} (kinds: {', '.join(FAULT_KINDS)})")
        fault = Fault(kind, agent)
        with self._lock:
            self._armed.append(fault)
        return fault

    def disarm(self) -> list[Fault]:
        """Drop the faults that have not fired yet and return them."""
        with self._lock:
            left, self._armed = self._armed, []
        return left

    def take(self, raw: bytes) -> Fault | None:
        """The first armed fault meant for the agent that sent this request body, now fired."""
        try:
            agent = str(json.loads(raw).get("user") or "agent-0")
        except (ValueError, AttributeError):
            return None  # not a request the model would answer either
        with self._lock:
            for i, fault in enumerate(self._armed):
                if fault.agent in ("", agent):
                    del self._armed[i]
                    fault.fired_at, fault.fired_on = time.time(), agent
                    return fault
        return None

    def reply(self, fault: Fault, authorization: str) -> tuple[int, bytes, dict[str, str], float]:
        """(status, body, extra headers, seconds to hold); status 0 = drop the connection unanswered."""
        if fault.kind == "rate_limit":
            error = {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}
            return 429, json.dumps({"error": error}).encode(), {"retry-after": f"{self.retry_after_s:g}"}, 0.0
        if fault.kind == "server_error":
            error = {"message": f"upstream failed for request with Authorization: {authorization}",
                     "type": "server_error", "code": None}
            return 500, json.dumps({"error": error}).encode(), {}, 0.0
        if fault.kind == "timeout":
            return 0, b"", {}, self.hold_s
        if fault.kind == "bad_json":
            return 200, b'{"id": "chatcmpl-cut", "object": "chat.completion", "choices": [{"index": 0, "mess', {}, 0.0
        return 200, json.dumps({"object": "error", "message": "model overloaded, try again", "code": 503}).encode(), {}, 0.0


if __name__ == "__main__":  # serve on its own, e.g. to point a hand-started fleet at it
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3600.0)
    args = p.parse_args()
    sim = ModelSimulator()
    print(sim.start(), flush=True)
    try:
        time.sleep(args.seconds)
    finally:
        sim.stop()
