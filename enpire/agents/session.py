"""An agent's session: the context every tool call runs in, built once per agent in the daemon.

It binds the agent's `Tools` (workspace branch, scheduler, trainer, blackboard), its job journal (whose
work runs in the session's nursery), its task card, the seeds it may be evaluated on (the harness picks
them; an agent never names seeds) and the lane that keeps a turn's branch-touching calls in order. The
API agent loop and the MCP server of CLI agents both open sessions with `open_session`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from enpire.agents.jobs import JobJournal
from enpire.agents.pacing import Room
from enpire.agents.toolkit import ToolError
from enpire.agents.tools import Tools
from enpire.tasks import TaskCard


@dataclass(frozen=True)
class SessionSettings:
    tool_output_chars: int = 12_000
    max_eval_seeds: int = 50
    max_findings: int = 20
    digest_chars: int = 3000
    digest: bool = True  # False (ablation): the digest tool lists every peer finding
    leaderboard: int = 5
    horizon: int = 300
    notes_dir: str = ""
    max_wait_s: float = 3600.0
    max_train_s: float = 1800.0


@dataclass
class Session:
    tools: Tools
    settings: SessionSettings
    card: TaskCard
    tuning_seeds: range
    rng: random.Random  # picks tuning seeds
    jobs: JobJournal
    lane: trio.Lock = field(default_factory=trio.Lock)
    secrets: tuple[str, ...] = ()

    @property
    def workspace(self):
        return self.tools.workspace

    async def head(self) -> str:
        """The agent's branch head; a new branch starts from main when main holds a policy. git runs in a
        worker thread, as every git call of a tool does: the daemon's loop never waits for a process."""
        return await trio.to_thread.run_sync(self._head)

    def _head(self) -> str:
        ws = self.tools.workspace
        head = ws.head(self.tools.branch)
        if head is not None:
            return head
        main = ws.head("main")
        if main is None:
            raise ToolError("the workspace has no main branch")
        return main

    async def resolve(self, commit: str, *, policy: bool = False) -> str:
        """A commit id (7+ hex digits of any commit in the workspace, a teammate's too) or "" for the branch
        head. With `policy`, the commit must hold policy.py."""
        if commit and len(commit) < 7 and not commit.startswith(("main", "agent/", "learned/")):
            raise ToolError(f"commit {commit!r}: give at least 7 hex digits")
        return await trio.to_thread.run_sync(self._resolve, commit, policy)

    def _resolve(self, commit: str, policy: bool) -> str:
        ws = self.tools.workspace
        full = ws.resolve(commit) if commit else self._head()
        if policy and "policy.py" not in ws.read_bytes_names(full):
            where = "your branch has no policy yet: write policy.py first" if not commit else f"{full[:12]} has no policy.py"
            raise ToolError(where)
        return full


@asynccontextmanager
async def open_session(tools: Tools, settings: SessionSettings, card: TaskCard, tuning_seeds: range, *,
                       rng_seed: int = 0, secrets: tuple[str, ...] = ()) -> AsyncIterator[Session]:
    """A session whose jobs live as long as the `async with` block (they are cancelled when it ends)."""
    async with trio.open_nursery() as nursery:
        yield Session(tools, settings, card, tuning_seeds, random.Random(rng_seed), JobJournal(nursery),
                      secrets=tuple(s for s in secrets if s))
        nursery.cancel_scope.cancel()


def session_settings(config) -> SessionSettings:
    a, task = config.agents, config.task()
    return SessionSettings(notes_dir=a.notes_dir, digest=a.digest, horizon=task.horizon)


def agent_session(config, tools: Tools, index: int, secrets: tuple[str, ...] = ()):
    """The session of agent number `index` of a fleet run by `config` (what the daemon and the MCP server open)."""
    from enpire.tasks import card

    task = config.task()
    return open_session(tools, session_settings(config), card(config.cells.task, config),
                        task.tuning_seeds.seeds(), rng_seed=index, secrets=secrets)


def agent_tools(config, index: int, workspace, scheduler, board, *, trainer=None, state_dir=None,
                events=None, room=None) -> Tools:
    """The Tools of agent number `index`: its branch, the fleet's actors and the state dir's stores."""
    from pathlib import Path

    from enpire.learning.dataset import ARTIFACTS

    root = Path(state_dir) if state_dir is not None else None
    return Tools(f"agent-{index}", config.cells.task, workspace, scheduler, board, trainer=trainer,
                 artifacts=root / ARTIFACTS if root else None, state_dir=root, events=events, room=room or Room())
