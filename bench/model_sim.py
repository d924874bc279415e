"""A simulated hosted model: an OpenAI-compatible Chat Completions server on 127.0.0.1 for benchmarks.

The fleet's `openai` backend talks to it exactly as to a hosted model (same SDK, same wire format):
POST /v1/chat/completions answers `choices[0].message.tool_calls` (`function.name`, `arguments` as a
JSON string), `finish_reason: "tool_calls"` and `usage {prompt_tokens, completion_tokens,
prompt_tokens_details.cached_tokens}`.

Decisions. Each agent (told apart by the request's `user` field, which the framework sets to
"agent-N") acts only through the tools the framework offers, on what its request carries:

1. `read_file`: the policy the team starts from (the fleet's baseline on main: the template
   `enpire/agents/pusht_policy.py`, whose parameters are tuned from its `INITIAL_PARAMS`), and
   `evaluate` it as it is (`n_seeds` episodes), so the robots have work while the model reads;
2. then every turn, from the briefing's leaderboard (the team's best and most recent candidates,
   tallied by the scheduler from verdicts), champion and fleet line: `promote` the best entry not
   yet judged whose success reaches target + margin on `validation_seeds` episodes; `evaluate`
   `population` candidates, `n_seeds` episodes each: first top-ups of (at most `topups`) entries not
   yet judged that reach target + margin with fewer episodes (less what teammates already run; all
   the rest at once when that is at most two episodes per cell of the fleet, else at most doubling,
   so a lucky start is dropped cheaply on a small fleet), the rest new candidates sampled around the
   team's best entry (`init_std` in [0, 1]^d, scaled with the built-in researcher's helpers; with
   `elites` > 1, the mean and spread of the best entries; numbers written to four significant
   digits); `post_finding` on the turn's results.

There is no private search state: a team divides one search kept on the blackboard instead of
running one search per agent, and a candidate any member found is topped up and promoted by
whichever member reads the board next.

Time. A reply takes ``overhead_s + input_tokens / input_tok_s + output_tokens / output_tok_s``.
Defaults 0.8 s, 4000 tok/s, 60 tok/s: the order of a hosted frontier model reached over the internet
(time to first token about 0.5-1 s, prefill a few thousand tokens per second, decoding 50-100 tokens
per second); a turn of five evaluate calls and a finding (~650 output tokens) takes about 13 s, most
of it decoding. All three are constructor arguments (and `bench/mru_mtu.py` flags).

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
_FLEET = re.compile(r"## Fleet\n(\d+) cells")
_RESULTS = re.compile(r"## New results\n(.*?)(?=\n\n|\n## |\Z)", re.S)
_BOARD = re.compile(r"## Team's best candidates[^\n]*\n(.*?)(?=\n## |\Z)", re.S)
_ENTRY = re.compile(r"^(\S+) commit (\w+) params (\{.*?\}): (\d+)/(\d+) succeeded, progress ([0-9.]+), (\d+) steps"
                    r"(?:; (\d+) more running)?(?:; held-out judging: (\w+))?$")


@dataclass
class SearchConfig:
    population: int = 4  # new candidates per turn, sampled around the team's elites
    n_seeds: int = 5  # tuning episodes per new candidate
    validation_seeds: int = 40  # episodes before promotion (at 20, ~0.9 policies got through)
    topups: int = 2  # open entries topped up per turn
    margin: float = 0.05  # promote only at target + margin on tuning seeds: held-out judging must agree
    elites: int = 1  # best leaderboard entries the search distribution is fitted to (1: around the best)
    init_std: float = 0.15  # in [0, 1]^d units, also the largest spread
    min_std: float = 0.03
    target: float = 0.9
    # The agents' random draws: agent-i samples from seed (seed, i) (seed 0: 1000 + i, as before seeds
    # could be chosen). The same seed gives the same candidate draws; repeat a benchmark with other seeds.
    seed: int = 0
    # Hostile policies ((name, files) pairs) the team also commits and evaluates, so that at least
    # `hostile_share` of its evaluate calls run one (bench/soak.py: the sandbox under attack in a real
    # fleet). With hostile policies on, every other call names the team's own commit explicitly.
    hostile: tuple[tuple[str, dict[str, str]], ...] = ()
    hostile_share: float = 0.0


@dataclass
class Entry:
    """One line of the team's leaderboard, as the briefing shows it."""

    ref: str
    params: dict[str, float]
    successes: int
    n: int
    pending: int
    judged: str

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0


@dataclass
class AgentState:
    name: str
    rng: np.random.Generator
    read: bool = False
    turns: int = 0
    pending: dict[str, Any] = field(default_factory=dict)  # call id -> what it asked
    hostile_ids: list[str] = field(default_factory=list)  # commits of the hostile policies
    hostile_next: int = 0


class Policy:
    """The decisions: a function of the briefing (leaderboard, champion) and the agent's last tool results.

    Every agent works on ONE team search whose state is the leaderboard the fleet keeps: it fits the
    search distribution (mean and spread of the best entries, in [0, 1]^d) to the team's results,
    samples `population` new candidates from it, tops up the evaluation of the best unjudged entry that
    reaches the target until it has `validation_seeds` episodes (unless teammates already run them),
    and promotes such an entry once it has them. No agent keeps a search of its own, so a larger team
    divides the same search instead of running several side by side.
    """

    def __init__(self, search: SearchConfig):
        self.search = search
        self.agents: dict[str, AgentState] = {}
        self.lock = threading.Lock()
        self.scale = BuiltinResearcher(SearchSettings(), 0, range(0, 1))  # [0, 1]^d <-> policy units

    def decide(self, name: str, messages: list[dict]) -> tuple[str, list[dict]]:
        """Returns (text, tool calls as [{"id", "name", "arguments" (dict)}])."""
        with self.lock:
            if name not in self.agents:
                index = name.rsplit("-", 1)[-1]
                i = int(index) if index.isdigit() else len(self.agents)
                seed = 1000 + i if self.search.seed == 0 else (self.search.seed, i)
                self.agents[name] = AgentState(name, np.random.default_rng(seed))
            a = self.agents[name]
            # The briefing is the request's last user message: it lists the results that came in since.
            briefing = next((m["content"] for m in reversed(messages) if m.get("role") == "user"
                             and isinstance(m.get("content"), str)), "")
            results = _new_results(briefing)
            if self.search.hostile:  # the ids the commit tool gave for the hostile policies
                commits = {c.get("id") for m in messages if m.get("role") == "assistant"
                           for c in m.get("tool_calls") or () if (c.get("function") or {}).get("name") == "commit"}
                for m in messages:
                    call = m.get("role") == "tool" and m.get("tool_call_id") in commits
                    found = _COMMIT.search(str(m.get("content") or "")) if call else None
                    if found and found.group(1) not in a.hostile_ids:
                        a.hostile_ids.append(found.group(1))
            fleet = _FLEET.search(briefing)
            return self._step(a, results, _board(briefing), _champion(briefing), int(fleet.group(1)) if fleet else 1)

    def _step(self, a: AgentState, results: list[dict], board: list[Entry], champion,
              cells: int = 1) -> tuple[str, list]:
        s = self.search
        if not a.read:  # look at the starting code and measure where it stands
            a.read = True
            return self._calls(a, "Reading the policy the team starts from and measuring it as it is.",
                               [("read_file", {"path": "policy.py"}), ("evaluate", {"params": {}, "n_seeds": s.n_seeds})])
        a.turns += 1
        calls: list[tuple[str, dict]] = []
        if s.hostile and a.turns == 1:
            calls += [("commit", {"files": files, "message": f"hostile policy: {name}"}) for name, files in s.hostile]
        evaluated = [(r.get("params") or {}, r) for r in results if r.get("kind") == "evaluate" and r.get("state") == "done"]
        if evaluated:
            best_params, best = max(evaluated, key=lambda pd: _rate(pd[1]))
            calls.append(("post_finding", _finding(
                f"turn {a.turns}: candidates sampled around the team's best entries keep improving success",
                f"{len(evaluated)} candidates, best {_short(best_params)}",
                best.get("summary", "") or "-", "improved" if _rate(best) >= s.target else "inconclusive")))
        champ_rate = champion[2] / champion[3] if champion and champion[3] else 0.0
        bar = min(1.0, max(s.target + s.margin - 1e-9, champ_rate + 1e-9))
        open_ = [e for e in board if not e.judged and e.rate >= bar]
        ready = next((e for e in open_ if e.n >= s.validation_seeds), None)
        if ready is not None:
            calls.append(("promote", {"params": ready.params}))
        # Top up the best open entries: at once when the fleet runs that in about one round of its cells,
        # else doubling their episodes at most, so a lucky start is dropped early.
        topups = [e for e in open_ if e.n + e.pending < s.validation_seeds and e.n > e.pending][: s.topups]
        for e in topups:
            rest = s.validation_seeds - e.n - e.pending
            calls.append(("evaluate", {"params": e.params, "n_seeds": rest if rest <= 2 * cells else min(
                rest, e.n - e.pending)}))
        mean, std = self._distribution(board, champion)
        fresh = max(1, s.population - len(topups))  # a turn's candidates: top-ups first, then new ones
        for _ in range(fresh):
            x = np.clip(mean + std * a.rng.standard_normal(mean.shape), 0.0, 1.0)
            calls.append(("evaluate", {"params": _rounded(self.scale._params(x)), "n_seeds": s.n_seeds}))
        if s.hostile:  # the team's own candidates: main (the branch head holds a hostile policy)
            calls = [(n, {**c, "commit": "main"}) if n in ("evaluate", "promote") else (n, c) for n, c in calls]
        if a.hostile_ids and s.hostile_share > 0:
            normal = sum(n == "evaluate" for n, _ in calls)
            for _ in range(max(1, math.ceil(normal * s.hostile_share / (1 - s.hostile_share)))):
                commit = a.hostile_ids[a.hostile_next % len(a.hostile_ids)]
                a.hostile_next += 1
                calls.append(("evaluate", {"commit": commit, "params": {}, "n_seeds": s.n_seeds}))
        text = (f"Turn {a.turns}: {fresh} new candidates around the team's best"
                + "".join(f", topping up {e.ref}" for e in topups) + (f", promoting {ready.ref}" if ready else "") + ".")
        return self._calls(a, text, calls)

    def _distribution(self, board: list[Entry], champion) -> tuple[np.ndarray, np.ndarray]:
        """Mean and spread of the team's elites; around the champion (or the template) before there are two."""
        s = self.search
        elites = np.array([self.scale._unit({**pusht_policy.INITIAL_PARAMS, **e.params})
                           for e in board[: s.elites]])
        if len(elites) >= 2:
            return elites.mean(axis=0), np.clip(elites.std(axis=0), s.min_std, s.init_std)
        start = dict(pusht_policy.INITIAL_PARAMS)
        if len(elites):
            return elites[0], np.full(len(start), s.init_std)
        if champion is not None:
            start.update(json.loads(champion[1]))
        return self.scale._unit(start), np.full(len(start), s.init_std)

    def _calls(self, a: AgentState, text: str, calls: list[tuple[str, dict]]) -> tuple[str, list[dict]]:
        out = []
        for name, args in calls:
            call_id = "call_" + uuid.uuid4().hex[:20]
            a.pending[call_id] = (name, json.dumps(args.get("params", {})))
            out.append({"id": call_id, "name": name, "arguments": args})
        return text, out


_COMMIT = re.compile(r'"commit":\s*"([0-9a-f]{7,64})"')


def _rounded(params: dict[str, float]) -> dict[str, float]:
    """Four significant digits, as a model writes numbers (and as the leaderboard shows them back)."""
    return {k: float(f"{v:.4g}") for k, v in params.items()}


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


def _new_results(briefing: str) -> list[dict]:
    """The jobs of the briefing's "## New results" section (one JSON object per line)."""
    section = _RESULTS.search(briefing)
    return [d for line in (section.group(1).splitlines() if section else []) if (d := _loads(line.strip()))]


def _rate(data: dict | None) -> float:
    if not data or not data.get("n"):
        return 0.0
    return float(data.get("successes", 0)) / float(data["n"])


def _board(briefing: str) -> list[Entry]:
    section = _BOARD.search(briefing)
    entries = []
    for text in (section.group(1).splitlines() if section else []):
        m = _ENTRY.match(text.strip())
        if m:
            entries.append(Entry(m.group(1), json.loads(m.group(3)), int(m.group(4)), int(m.group(5)),
                                 int(m.group(8) or 0), m.group(9) or ""))
    return entries


def _champion(briefing: str):
    match = _CHAMPION.search(briefing)
    return (match.group(1), match.group(2), int(match.group(3)), int(match.group(4))) if match else None


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
    fixed_tokens: int = 0  # of the input: tools, system prompt and briefing (the rest is the turns window)
    episodes: int = 0  # episodes its evaluate calls asked for


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
                                      [c["name"] for c in calls], count_tokens(
                                          json.dumps(body.get("tools") or [], sort_keys=True) + json.dumps(messages[:2])),
                                      sum(c["arguments"].get("n_seeds", 0) for c in calls if c["name"] == "evaluate")))
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
            # B: the fixed part of a turn's prompt; window: the rest of it; per candidate: all tokens / candidates
            "mean_fixed_input_tokens": round(float(np.mean([c.fixed_tokens for c in calls])), 1) if calls else 0.0,
            "mean_window_input_tokens": round(float(np.mean([c.input_tokens - c.fixed_tokens for c in calls])), 1)
            if calls else 0.0,
            "mean_output_tokens": round(float(np.mean([c.output_tokens for c in calls])), 1) if calls else 0.0,
            "candidates": sum(c.tools.count("evaluate") for c in calls),
            "episodes_asked": sum(c.episodes for c in calls),
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
    after: Fault | None = None  # only the agent this earlier fault fired on meets it (an outage's tail)
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

    def arm(self, kind: str, agent: str = "", after: Fault | None = None) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r} (kinds: {', '.join(FAULT_KINDS)})")
        fault = Fault(kind, agent, after)
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
                if fault.after.fired_on == agent if fault.after else fault.agent in ("", agent):
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
