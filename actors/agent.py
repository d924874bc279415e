"""An agent-team member: runs its backend (built-in researcher or a model) against the tool surface.

The backend's loop is the actor's `main()`. If it crashes, the supervisor restarts the actor and the
backend begins again from what the blackboard holds (champion, findings, its workspace branch).
"""

from __future__ import annotations

from actors.runtime import Actor
from enpire.agents.tools import Tools


class AgentActor(Actor):
    def __init__(self, name: str, backend, tools: Tools):
        self.name = name
        super().__init__()
        self.backend = backend
        self.tools = tools

    async def main(self) -> None:
        self.log.info("agent_started", backend=type(self.backend).__name__, task=self.tools.task)
        await self.backend.run(self.tools)
        self.log.info("agent_finished")
