"""OpenAI Chat Completions with tools, through the official SDK's async client (it runs on trio).

`base_url` points it at any compatible server (vLLM, llama.cpp, Ollama, …).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import openai

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


def to_messages(prompt: Prompt) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": prompt.system},
                                      {"role": "user", "content": prompt.briefing}]
    for turn in prompt.turns:
        msg: dict[str, Any] = {"role": "assistant", "content": turn.reply.text or None}
        if turn.reply.calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in turn.reply.calls]
        elif not turn.reply.text:
            msg["content"] = "(no reply)"
        messages.append(msg)
        messages += [{"role": "tool", "tool_call_id": o.call_id, "content": o.content} for o in turn.outputs]
        if turn.nudge:
            messages.append({"role": "user", "content": turn.nudge})
    return messages


def parse(completion: Any) -> ModelReply:
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise ModelError("malformed response: no choices[0].message")
    message = choices[0].message
    calls = []
    for c in getattr(message, "tool_calls", None) or []:
        fn = getattr(c, "function", None)
        if not getattr(c, "id", None) or fn is None or not getattr(fn, "name", None):
            raise ModelError("malformed response: tool call without id or function name")
        calls.append(ToolCall(str(c.id), str(fn.name), str(fn.arguments or "{}")))
    u = getattr(completion, "usage", None)
    details = getattr(u, "prompt_tokens_details", None)
    usage = Usage(int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(details, "cached_tokens", 0) or 0),
                  int(getattr(u, "completion_tokens", 0) or 0))
    return ModelReply(str(message.content or ""), calls, usage, str(getattr(choices[0], "finish_reason", "") or ""))


class OpenAIClient:
    """A `ModelClient` for Chat Completions. The key comes only from the environment variable named;
    local servers (a base_url given) may need none."""

    def __init__(self, model: str, *, api_key_env: str = "OPENAI_API_KEY", base_url: str | None = None,
                 timeout_s: float = 120.0, sdk_retries: int = 0,
                 token_field: Literal["max_tokens", "max_completion_tokens"] | None = None, user: str = ""):
        key = os.environ.get(api_key_env, "")
        self.user = user  # which agent calls (the API's `user` field); never a secret
        if not key and base_url is None:
            raise LLMConfigError(f"environment variable {api_key_env} is not set (the OpenAI API key)")
        self.model = model
        self.secrets = (key,) if key else ()
        # api.openai.com wants max_completion_tokens; local servers all know max_tokens.
        self.token_field = token_field or ("max_completion_tokens" if base_url is None else "max_tokens")
        self._client = openai.AsyncOpenAI(api_key=key or "unused", base_url=base_url, timeout=timeout_s,
                                          max_retries=sdk_retries)

    async def complete(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> ModelReply:
        try:
            completion = await self._client.chat.completions.create(
                model=self.model,
                messages=to_messages(prompt),
                tools=[{"type": "function", "function": {"name": t.name, "description": t.description,
                                                         "parameters": t.parameters}} for t in tools],
                **{self.token_field: max_output_tokens},
                **({"user": self.user} if self.user else {}),
            )
        except ModelError:
            raise
        except Exception as e:
            raise sdk_error(e, self.secrets) from None
        try:
            return parse(completion)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(truncate(f"malformed response: {type(e).__name__}", 200)) from None
