"""The tool surface of an agent: everything a backend may do goes through here.

Built-in and model-driven backends use the same tools, so the fleet treats them alike: edits go to
the agent's own workspace branch, evaluations and promotions go to the scheduler as messages, and
findings go to the blackboard.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import (
    Address,
    ChampionChanged,
    EvalRequest,
    EvalResult,
    Failure,
    FindingPosted,
    PolicySpec,
    PromoteRequest,
    PromoteResult,
    QueueDepth,
    RoomReleased,
    TokensUsed,
    TrainRequest,
    TrainResult,
)
from bus.records import Champion, Digest, EpisodeRecord, Finding, TestedRecord, TokenRecord
from enpire.agents.pacing import Room
from enpire.agents.toolkit import ToolError
from enpire.learning import mlp_policy, visuomotor_policy
from enpire.learning.dataset import trainable
from enpire.workspace import Workspace

LEARNED_POLICY = Path(mlp_policy.__file__)  # the numpy policy file a state checkpoint of the trainer runs in
# A checkpoint that names its kind (`policy_kind` in weights.npz) runs in that kind's policy file.
LEARNED_POLICIES = {"visuomotor": Path(visuomotor_policy.__file__)}




def fingerprint(change: object) -> str:
    """A stable id of a change (parameters or a diff), so an idea a peer already tested is recognised."""
    return hashlib.sha1(msgspec.json.encode(change, order="sorted")).hexdigest()[:16]


def _policy_file(weights: bytes) -> Path:
    """The policy file a checkpoint runs in: its `policy_kind`'s, else the MLP's."""
    import io

    import numpy as np

    try:
        with np.load(io.BytesIO(weights), allow_pickle=False) as data:
            kind = str(data["policy_kind"]) if "policy_kind" in data.files else ""
    except Exception:  # noqa: BLE001 - not an npz at all: the MLP policy file names the problem when it loads
        kind = ""
    if kind and kind not in LEARNED_POLICIES:
        raise ToolError(f"checkpoint of unknown policy_kind {kind!r} (known: {', '.join(LEARNED_POLICIES)})")
    return LEARNED_POLICIES.get(kind, LEARNED_POLICY)


def failure_summary(result: EvalResult) -> str:
    """Short, model-friendly account of how an evaluation's episodes ended."""
    n = len(result.episodes)
    if n == 0:
        return "no episodes"
    wins = sum(e.success for e in result.episodes)
    reasons = Counter(e.reason.split(":")[0] if not e.success else "success" for e in result.episodes)
    near = sum(1 for e in result.episodes if not e.success and e.score >= 0.8)
    mean_score = sum(e.score for e in result.episodes) / n
    parts = ", ".join(f"{k} {v}" for k, v in reasons.most_common())
    at_k = sum(e.success_at_k or e.success for e in result.episodes)
    return (f"{wins}/{n} succeeded (pass@1), {at_k}/{n} pass@k; mean score {mean_score:.3f}; "
            f"near misses (score>=0.8) {near}; outcomes: {parts}")


@dataclass
class Tools:
    agent: str
    task: str
    workspace: Workspace
    scheduler: Address  # the judge: evaluations and promotions
    board: Blackboard
    eval_timeout_s: float = 3600.0
    trainer: Address | None = None
    artifacts: Path | None = None  # the trainer's checkpoints by content hash (state dir's artifacts/)
    events: EventHub | None = None  # the fleet's events: champion and queue without reading the blackboard
    state_dir: Path | None = None  # where recorded trajectories live (episode inspection)
    room: Room = field(default_factory=Room)  # the team's pacing marks: one Room shared by a fleet's agents

    @property
    def branch(self) -> str:
        return f"agent/{self.agent}"

    async def read_files(self, commit: str | None = None) -> dict[str, str | bytes]:
        """Files of a commit (default: the agent's branch head): text as str, checkpoints as bytes."""
        def read() -> dict[str, str | bytes]:
            ws = self.workspace
            return ws.read(commit or ws.head(self.branch) or ws.head("main"))
        return await trio.to_thread.run_sync(read)

    async def commit(self, files: dict[str, str | bytes | None], message: str, branch: str | None = None) -> str:
        return await trio.to_thread.run_sync(self.workspace.commit, branch or self.branch, files, message)

    async def commit_checkpoint(self, artifact: str, message: str) -> str:
        """Make a trained checkpoint a policy version: a commit holding the learning library's policy
        file as `policy.py` and the checkpoint as `weights.npz`, on the agent's `learned/` branch (its
        heuristic branch stays as it was). The commit id is evaluated and promoted like any other."""
        if self.artifacts is None:
            raise ToolError("this fleet keeps no checkpoints")
        if not re.fullmatch(r"[0-9a-f]{32}", artifact):
            raise ToolError(f"{artifact!r} is not a checkpoint hash (32 hex digits)")
        path = self.artifacts / f"{artifact}.npz"
        try:
            weights = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            raise ToolError(f"no checkpoint {artifact} in {self.artifacts}") from None
        if hashlib.sha256(weights).hexdigest()[:32] != artifact:
            raise ToolError(f"checkpoint {artifact} does not match its content hash: the file was altered")
        files = {"policy.py": _policy_file(weights).read_text(), "weights.npz": weights}
        return await self.commit(files, f"{message} (checkpoint {artifact})", branch=f"learned/{self.agent}")

    def training_successes(self) -> int:
        """Successful episodes on the episode store that a training recipe for this task would use."""
        return sum(trainable(r, self.task) for r in self.board.values("episodes", EpisodeRecord))

    def new_job_id(self, kind: str = "") -> str:
        return f"{self.agent}-{kind + '-' if kind else ''}{uuid.uuid4().hex[:10]}"

    async def evaluate(self, policy: PolicySpec, seeds: list[int], attempts: int = 0, job_id: str = "") -> EvalResult:
        """Run `policy` on tuning `seeds`; `attempts` is k of pass@k (0: the task's [tasks.X] attempts)."""
        job_id = job_id or self.new_job_id()
        reply = await self.scheduler.ask(
            EvalRequest(job_id=job_id, agent=self.agent, task=self.task, policy=policy, seeds=seeds, attempts=attempts),
            timeout=self.eval_timeout_s,
        )
        if isinstance(reply, Failure):
            raise ToolError(f"evaluation refused: {reply.error}")
        assert isinstance(reply, EvalResult)
        return reply

    async def promote(self, policy: PolicySpec, job_id: str = "") -> PromoteResult:
        job_id = job_id or self.new_job_id("promote")
        reply = await self.scheduler.ask(
            PromoteRequest(job_id=job_id, agent=self.agent, task=self.task, policy=policy), timeout=self.eval_timeout_s
        )
        if isinstance(reply, Failure):
            raise ToolError(f"promotion refused: {reply.error}")
        assert isinstance(reply, PromoteResult)
        return reply  # on promotion the scheduler has pointed the workspace's main at the champion

    async def train(self, recipe: str, *, time_budget_s: float = 300.0, options: dict[str, str] | None = None,
                    max_rss_mb: int = 4096, job_id: str = "") -> TrainResult:
        """Train a recipe on the fleet's recorded episodes; the result names a checkpoint (artifact hash)."""
        if self.trainer is None:
            raise ToolError("this fleet has no trainer")
        request = TrainRequest(job_id=job_id or self.new_job_id("train"), agent=self.agent, task=self.task,
                               recipe=recipe, time_budget_s=time_budget_s, max_rss_mb=max_rss_mb,
                               options=options or {})
        reply = await self.trainer.ask(request, timeout=time_budget_s + 120.0)
        if isinstance(reply, Failure):
            raise ToolError(f"training refused: {reply.error}")
        assert isinstance(reply, TrainResult)
        return reply

    def champion(self) -> Champion | None:
        """The champion as the judge last announced it (the blackboard only before any announcement)."""
        event = self.events.latest(ChampionChanged) if self.events else None
        if event is None or event.task != self.task:
            return self.board.get("champion", self.task, Champion)
        return Champion(event.task, event.policy, event.judged_successes, event.judged_n, event.t, agent=event.agent,
                        successes=event.successes, n=event.n, decision=event.decision)

    def confirmation(self) -> str | None:
        """The champion's confirmation as the judge last announced it: "" while it leads (agents may hold),
        "unlikely" (the search goes on), "met" or "not_met"; None before any announcement."""
        event = self.events.latest(ChampionChanged) if self.events else None
        return event.confirmation if event is not None and event.task == self.task else None

    def queue_depth(self) -> QueueDepth | None:
        """The fleet's queue as the lease queue last announced it (None before any announcement)."""
        return self.events.latest(QueueDepth) if self.events else None

    async def room_changed(self, timeout: float) -> None:
        """Wait until the room in the fleet's queue may have changed: the lease queue announces its depth,
        or a teammate gives back room its turn held (or `timeout` passes)."""
        if self.events is None:
            await trio.sleep(timeout)
            return
        with self.events.subscribe(QueueDepth, RoomReleased, buffer=1) as changes, trio.move_on_after(timeout):
            await changes.receive()

    async def champion_changed(self, timeout: float) -> None:
        """Wait until the judge announces a change of the champion (or `timeout` passes)."""
        if self.events is None:
            await trio.sleep(timeout)
            return
        with self.events.subscribe(ChampionChanged, buffer=1) as changes, trio.move_on_after(timeout):
            await changes.receive()

    def digest(self) -> Digest | None:
        latest = self.board.items("digests", Digest)
        return latest[-1][1] if latest else None

    async def post_finding(self, hypothesis: str, change: str, evidence: str, outcome: str, *,
                     fingerprint: str = "", score: float = 0.0, regime: str = "") -> Finding:
        finding = Finding(
            finding_id=f"{self.agent}-{uuid.uuid4().hex[:10]}", agent=self.agent, t=time.time(),
            hypothesis=hypothesis, change=change, evidence=evidence, outcome=outcome,
            fingerprint=fingerprint, score=score, regime=regime,
        )
        await self.board.transact(lambda w: w.append("findings", finding))
        if self.events:
            self.events.publish(FindingPosted(finding_id=finding.finding_id, agent=self.agent, t=finding.t))
        return finding

    def tested(self, fp: str) -> TestedRecord | None:
        """What any agent found when it evaluated the change with this fingerprint."""
        return self.board.get("tested", fp, TestedRecord)

    async def record_tested(self, fp: str, result: EvalResult, score: float) -> None:
        record = TestedRecord(self.agent, time.time(), result.successes, len(result.episodes), score,
                              failure_summary(result))
        await self.board.transact(lambda w: w.put("tested", fp, record, overwrite=False))

    async def record_tokens(self, call: TokenRecord) -> None:
        """Append one model call to the token ledger (in a worker thread: LMDB's fsync never holds the
        loop) and announce it (TokensUsed)."""
        await self.board.transact(lambda w: w.append("tokens", call))
        if self.events is not None:
            self.events.publish(TokensUsed(call=call))

    def record_tokens_from_thread(self, call: TokenRecord, trio_token: trio.lowlevel.TrioToken) -> None:
        """`record_tokens` from another thread (the CLI agents' model relay): the append on that thread,
        only the announcement hops to the loop the events live on (`trio_token`'s)."""
        self.board.append("tokens", call)
        if self.events is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the fleet stopped while this call was billed
                trio.from_thread.run_sync(self.events.publish, TokensUsed(call=call), trio_token=trio_token)
