"""Anthropic Messages API with tool use, through the official SDK's async client (it runs on trio)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import anthropic
import msgspec

from enpire.agents.llm import (
    LLMConfigError,
    ModelError,
    ModelReply,
    Prompt,
    ToolCall,
    ToolSpec,
    Usage,
    sdk_error,
    truncate,
)


def _as_object(arguments: str) -> dict[str, Any]:
    """tool_use input must be an object when replayed; a call the model garbled is replayed as {}."""
    try:
        value = msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def to_messages(prompt: Prompt) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt.briefing}]
    for turn in prompt.turns:
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.reply.text}] if turn.reply.text else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": _as_object(c.arguments)}
                    for c in turn.reply.calls]
        messages.append({"role": "assistant", "content": content or [{"type": "text", "text": "(no reply)"}]})
        results: list[dict[str, Any]] = [
            {"type": "tool_result", "tool_use_id": o.call_id, "content": o.content, "is_error": o.is_error}
            for o in turn.outputs
        ]
        if turn.nudge or not results:
            results.append({"type": "text", "text": turn.nudge or "Continue."})
        messages.append({"role": "user", "content": results})
    return messages


def parse(message: Any) -> ModelReply:
    """The SDK's Message -> ModelReply; a body without the expected fields is a retryable ModelError."""
    content = getattr(message, "content", None)
    if not isinstance(content, list):
        raise ModelError("malformed response: no content list")
    texts, calls = [], []
    for block in content:
        kind = getattr(block, "type", None)
        if kind == "text":
            texts.append(str(block.text))
        elif kind == "tool_use":
            if not getattr(block, "id", None) or not getattr(block, "name", None):
                raise ModelError("malformed response: tool_use block without id or name")
            calls.append(ToolCall(str(block.id), str(block.name), msgspec.json.encode(block.input or {}).decode()))
    u = getattr(message, "usage", None)
    cached = int(getattr(u, "cache_read_input_tokens", 0) or 0)
    written = int(getattr(u, "cache_creation_input_tokens", 0) or 0)
    # Anthropic's input_tokens excludes cache reads and writes; the ledger counts all input.
    usage = Usage(int(getattr(u, "input_tokens", 0) or 0) + cached + written, cached, int(getattr(u, "output_tokens", 0) or 0))
    return ModelReply("\n".join(texts), calls, usage, str(getattr(message, "stop_reason", "") or ""))


class AnthropicClient:
    """A `ModelClient` for the Messages API. The key comes only from the environment variable named."""

    def __init__(self, model: str, *, api_key_env: str = "ANTHROPIC_API_KEY", base_url: str | None = None,
                 timeout_s: float = 120.0, sdk_retries: int = 0, user: str = ""):
        key = os.environ.get(api_key_env, "")
        if not key and base_url is None:
            raise LLMConfigError(f"environment variable {api_key_env} is not set (the Anthropic API key)")
        self.user = user  # which agent calls (metadata.user_id); never a secret
        self.model = model
        self.secrets = (key,) if key else ()
        # Our own loop retries (backoff, pause); sdk_retries > 0 adds the SDK's retries underneath.
        self._client = anthropic.AsyncAnthropic(api_key=key or "unused", base_url=base_url, timeout=timeout_s,
                                                max_retries=sdk_retries)

    async def complete(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> ModelReply:
        try:
            message = await self._client.messages.create(
                model=self.model,
                max_tokens=max_output_tokens,
                # The system prompt and tools never change: mark them for prompt caching.
                system=[{"type": "text", "text": prompt.system, "cache_control": {"type": "ephemeral"}}],
                tools=[{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools],
                messages=to_messages(prompt),
                **({"metadata": {"user_id": self.user}} if self.user else {}),
            )
        except ModelError:
            raise
        except Exception as e:  # SDK status/connection errors, unparsable bodies
            raise sdk_error(e, self.secrets) from None
        try:
            return parse(message)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(truncate(f"malformed response: {type(e).__name__}", 200)) from None
