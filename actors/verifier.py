"""The verifier actor: success, score and reason come from trusted code only.

It judges the state (and, for vision verification, the camera frame) that the cell's driver read from
the simulator or scene. It never sees policy output, and nothing an agent writes is loaded here.
Each verdict is signed for the lease and attempt it answers (`enpire/seal.py`), so the cell that relays
it to the scheduler cannot change it into a success or report one the verifier never gave.
"""

from __future__ import annotations

import trio

from actors.runtime import Actor
from bus.messages import Message, VerifyReply, VerifyRequest
from enpire import seal, verify


class Verifier(Actor):
    name = "verifier"
    concurrent_handlers = True  # verdicts are independent; vision checks run in worker threads

    def __init__(self, task_kinds: dict[str, str], key: bytes | None = None):
        """task_kinds maps a task name to its verification kind (the task's driver family); `key` signs
        verdicts (shared with the scheduler only; None = unsigned, for tests of the verifier alone)."""
        super().__init__()
        self.task_kinds = task_kinds
        self.key = key
        self.verdicts = 0

    async def handle(self, msg: Message) -> Message:
        if not isinstance(msg, VerifyRequest):
            raise TypeError(f"verifier does not handle {type(msg).__name__}")
        kind = self.task_kinds.get(msg.task)
        if kind is None:
            raise ValueError(f"unknown task {msg.task!r}")
        if msg.frame is None:  # a state check takes microseconds: no thread hop
            verdict = verify.verify(kind, msg.state)
        else:  # image processing: keep the actor responsive meanwhile
            verdict = await trio.to_thread.run_sync(verify.verify, kind, msg.state, msg.frame.numpy(), "vision")
        at_reset = verify.verify(kind, msg.reset_state) if msg.reset_state is not None else None
        self.verdicts += 1
        sig = reset_sig = b""
        if self.key is not None:
            sig = seal.sign(self.key, msg.lease_id, msg.episode_id, msg.attempt, verdict)
            if at_reset is not None:
                reset_sig = seal.sign(self.key, msg.lease_id, msg.episode_id, seal.RESET_ATTEMPT, at_reset)
        return VerifyReply(episode_id=msg.episode_id, verdict=verdict, at_reset=at_reset, signature=sig,
                           reset_signature=reset_sig)
