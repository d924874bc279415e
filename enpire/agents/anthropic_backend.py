"""Anthropic Messages API with tool use, through the official SDK's async client (it runs on trio).

Cache breakpoints (`cache_control`) sit at the end of the stable prefix: the system text (tools come before
it in the cache order), the task card, and the last tool result of the turns, so each call reads the
previous call's prefix from the cache and only the briefing and the newest turn are new input.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from typing import Any

import anthropic
import msgspec

from enpire import ledger
from enpire.agents.model import (
    LLMConfigError,
    ModelError,
    ModelReply,
    Prompt,
    Stop,
    ToolCall,
    ToolSpec,
    Usage,
    probe_model,
    sdk_error,
    truncate,
)

CACHE = {"type": "ephemeral"}
STOPS: dict[str, Stop] = {"tool_use": "tool_use", "end_turn": "end", "stop_sequence": "end", "max_tokens": "max_tokens",
                          "refusal": "refusal", "pause_turn": "other", "model_context_window_exceeded": "max_tokens"}


def _as_object(arguments: str) -> dict[str, Any]:
    """tool_use input must be an object when replayed; a call the model garbled is replayed as {}."""
    try:
        value = msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _image(img) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": img.media_type,
                                        "data": base64.b64encode(img.data).decode()}}


def to_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """card, turns, briefing; the briefing joins the last user message (roles must alternate)."""
    first: list[dict[str, Any]] = [{"type": "text", "text": prompt.card, "cache_control": CACHE}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for turn in prompt.turns:
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.reply.text}] if turn.reply.text else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": _as_object(c.arguments)}
                    for c in turn.reply.calls]
        messages.append({"role": "assistant", "content": content or [{"type": "text", "text": "(no reply)"}]})
        results: list[dict[str, Any]] = []
        for o in turn.outputs:
            body: Any = o.content
            if o.images:
                body = [{"type": "text", "text": o.content}, *(_image(i) for i in o.images)]
            results.append({"type": "tool_result", "tool_use_id": o.call_id, "content": body, "is_error": o.is_error})
        if turn.nudge or not results:
            results.append({"type": "text", "text": turn.nudge or "Continue."})
        messages.append({"role": "user", "content": results})
    if len(messages) > 1:  # a breakpoint at the end of the turns: the next call reads all of it from the cache
        messages[-1]["content"][-1] = {**messages[-1]["content"][-1], "cache_control": CACHE}
    messages[-1]["content"].append({"type": "text", "text": prompt.briefing})
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
    usage = Usage(ledger.anthropic_input(int(getattr(u, "input_tokens", 0) or 0), cached, written), cached, written,
                  int(getattr(u, "output_tokens", 0) or 0))
    raw = str(getattr(message, "stop_reason", "") or "")
    stop = STOPS.get(raw, "other")
    text = "\n".join(texts)
    return ModelReply(text, calls, usage, stop, raw, refusal=text if stop == "refusal" else "")


class AnthropicClient:
    """A `ModelClient` for the Messages API. The key comes only from the environment variable named."""

    def __init__(self, model: str, *, api_key_env: str = "ANTHROPIC_API_KEY", base_url: str | None = None,
                 timeout_s: float = 120.0, sdk_retries: int = 0, user: str = ""):
        key = os.environ.get(api_key_env, "")
        if not key and base_url is None:
            raise LLMConfigError(f"environment variable {api_key_env} is not set (the Anthropic API key)")
        self.user = user  # which agent calls (metadata.user_id); never a secret
        self.model = model
        self.api_key_env = api_key_env
        self.secrets = (key,) if key else ()
        # Our own loop retries (backoff, pause); sdk_retries > 0 adds the SDK's retries underneath.
        self._client = anthropic.AsyncAnthropic(api_key=key or "unused", base_url=base_url, timeout=timeout_s,
                                                max_retries=sdk_retries)

    def request(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> dict[str, Any]:
        return dict(
            model=self.model,
            max_tokens=max_output_tokens,
            system=[{"type": "text", "text": prompt.system, "cache_control": CACHE}],
            tools=[{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools],
            messages=to_messages(prompt),
            **({"metadata": {"user_id": self.user}} if self.user else {}),
        )

    async def complete(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> ModelReply:
        try:
            message = await self._client.messages.create(**self.request(prompt, tools, max_output_tokens))
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

    async def probe(self) -> Usage | None:
        async def one_token() -> Usage:
            message = await self._client.messages.create(model=self.model, max_tokens=1,
                                                         messages=[{"role": "user", "content": "ping"}])
            return parse(message).usage

        return await probe_model(self._client, self.model, self.secrets, self.api_key_env, one_token)
