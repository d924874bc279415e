"""OpenAI Chat Completions and Responses APIs with tools, through the official SDK's async client (on trio).

`base_url` points Chat Completions at any compatible server (vLLM, llama.cpp, Ollama, …); the Responses
API is what Codex-family models answer on. Both send the stable prefix first (system, tools, task card, the
turns) and the briefing last, which is what OpenAI's automatic prefix caching rewards; images a tool
returns follow its output as a user message (tool outputs carry text only).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from typing import Any, Literal

import openai

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

CHAT_STOPS: dict[str, Stop] = {"tool_calls": "tool_use", "function_call": "tool_use", "stop": "end",
                               "length": "max_tokens", "content_filter": "refusal"}


def _data_url(img) -> str:
    return f"data:{img.media_type};base64,{base64.b64encode(img.data).decode()}"


# ----------------------------------------------------------------------------- Chat Completions


def to_messages(prompt: Prompt) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": prompt.system},
                                      {"role": "user", "content": prompt.card}]
    for turn in prompt.turns:
        msg: dict[str, Any] = {"role": "assistant", "content": turn.reply.text or None}
        if turn.reply.calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in turn.reply.calls]
        elif not turn.reply.text:
            msg["content"] = "(no reply)"
        messages.append(msg)
        messages += [{"role": "tool", "tool_call_id": o.call_id, "content": o.content} for o in turn.outputs]
        images = [(o, i) for o in turn.outputs for i in o.images]
        if images:
            messages.append({"role": "user", "content": [
                *({"type": "text", "text": f"image returned by {o.name} (call {o.call_id})"} for o in
                  dict.fromkeys(o for o, _ in images)),
                *({"type": "image_url", "image_url": {"url": _data_url(i)}} for _, i in images)]})
        if turn.nudge:
            messages.append({"role": "user", "content": turn.nudge})
    messages.append({"role": "user", "content": prompt.briefing})
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
    out_details = getattr(u, "completion_tokens_details", None)
    usage = Usage(int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(details, "cached_tokens", 0) or 0), 0,
                  int(getattr(u, "completion_tokens", 0) or 0), int(getattr(out_details, "reasoning_tokens", 0) or 0))
    raw = str(getattr(choices[0], "finish_reason", "") or "")
    refusal = str(getattr(message, "refusal", "") or "")
    stop: Stop = "refusal" if refusal else CHAT_STOPS.get(raw, "other")
    return ModelReply(str(message.content or ""), calls, usage, stop, raw, refusal)


class _OpenAIBase:
    def __init__(self, model: str, *, api_key_env: str = "OPENAI_API_KEY", base_url: str | None = None,
                 timeout_s: float = 120.0, sdk_retries: int = 0, user: str = ""):
        key = os.environ.get(api_key_env, "")
        self.user = user  # which agent calls (the API's `user` field); never a secret
        if not key and base_url is None:
            raise LLMConfigError(f"environment variable {api_key_env} is not set (the OpenAI API key)")
        self.model = model
        self.api_key_env = api_key_env
        self.secrets = (key,) if key else ()
        self.hosted = base_url is None
        self._client = openai.AsyncOpenAI(api_key=key or "unused", base_url=base_url, timeout=timeout_s,
                                          max_retries=sdk_retries)

    async def _send(self, create, request: dict[str, Any], parser) -> ModelReply:
        try:
            response = await create(**request)
        except ModelError:
            raise
        except Exception as e:
            raise sdk_error(e, self.secrets) from None
        try:
            return parser(response)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(truncate(f"malformed response: {type(e).__name__}", 200)) from None

    async def probe(self) -> Usage | None:
        async def one_token() -> Usage:
            return (await self._tiny()).usage

        return await probe_model(self._client, self.model, self.secrets, self.api_key_env, one_token)

    async def _tiny(self) -> ModelReply:
        raise NotImplementedError


class OpenAIClient(_OpenAIBase):
    """A `ModelClient` for Chat Completions. The key comes only from the environment variable named;
    local servers (a base_url given) may need none."""

    def __init__(self, model: str, *, token_field: Literal["max_tokens", "max_completion_tokens"] | None = None,
                 **kw):
        super().__init__(model, **kw)
        # api.openai.com wants max_completion_tokens; local servers all know max_tokens.
        self.token_field = token_field or ("max_completion_tokens" if self.hosted else "max_tokens")

    def request(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> dict[str, Any]:
        return dict(
            model=self.model,
            messages=to_messages(prompt),
            tools=[{"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": t.parameters}} for t in tools],
            parallel_tool_calls=True,  # the loop orders calls that touch the branch itself
            **{self.token_field: max_output_tokens},
            **({"user": self.user} if self.user else {}),
        )

    async def complete(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> ModelReply:
        return await self._send(self._client.chat.completions.create, self.request(prompt, tools, max_output_tokens),
                                parse)

    async def _tiny(self) -> ModelReply:
        return await self._send(self._client.chat.completions.create, {
            "model": self.model, "messages": [{"role": "user", "content": "ping"}], self.token_field: 1}, parse)


# ----------------------------------------------------------------------------- Responses API


def to_input(prompt: Prompt) -> list[dict[str, Any]]:
    """The Responses API's input items: card, turns (function_call / function_call_output), briefing."""
    items: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "input_text", "text": prompt.card}]}]
    for turn in prompt.turns:
        if turn.reply.text or not turn.reply.calls:
            items.append({"role": "assistant", "content": [{"type": "output_text",
                                                              "text": turn.reply.text or "(no reply)"}]})
        items += [{"type": "function_call", "call_id": c.id, "name": c.name, "arguments": c.arguments}
                  for c in turn.reply.calls]
        items += [{"type": "function_call_output", "call_id": o.call_id, "output": o.content} for o in turn.outputs]
        images = [i for o in turn.outputs for i in o.images]
        if images:
            items.append({"role": "user", "content": [
                {"type": "input_text", "text": "images returned by the tools above"},
                *({"type": "input_image", "image_url": _data_url(i), "detail": "auto"} for i in images)]})
        if turn.nudge:
            items.append({"role": "user", "content": [{"type": "input_text", "text": turn.nudge}]})
    items.append({"role": "user", "content": [{"type": "input_text", "text": prompt.briefing}]})
    return items


def parse_response(response: Any) -> ModelReply:
    output = getattr(response, "output", None)
    if not isinstance(output, list):
        raise ModelError("malformed response: no output list")
    texts, calls, refusals = [], [], []
    for item in output:
        kind = getattr(item, "type", None)
        if kind == "function_call":
            if not getattr(item, "call_id", None) or not getattr(item, "name", None):
                raise ModelError("malformed response: function_call without call_id or name")
            calls.append(ToolCall(str(item.call_id), str(item.name), str(item.arguments or "{}")))
        elif kind == "message":
            for part in getattr(item, "content", None) or []:
                if getattr(part, "type", None) == "output_text":
                    texts.append(str(part.text))
                elif getattr(part, "type", None) == "refusal":
                    refusals.append(str(part.refusal))
    u = getattr(response, "usage", None)
    cached = int(getattr(getattr(u, "input_tokens_details", None), "cached_tokens", 0) or 0)
    reasoning = int(getattr(getattr(u, "output_tokens_details", None), "reasoning_tokens", 0) or 0)
    usage = Usage(int(getattr(u, "input_tokens", 0) or 0), cached, 0, int(getattr(u, "output_tokens", 0) or 0), reasoning)
    status = str(getattr(response, "status", "") or "")
    reason = str(getattr(getattr(response, "incomplete_details", None), "reason", "") or "")
    if refusals or reason == "content_filter":
        stop: Stop = "refusal"
    elif status == "incomplete" and reason == "max_output_tokens":
        stop = "max_tokens"
    elif calls:
        stop = "tool_use"
    else:
        stop = "end" if status in ("completed", "") else "other"
    return ModelReply("\n".join(texts), calls, usage, stop, reason or status, "\n".join(refusals))


class OpenAIResponsesClient(_OpenAIBase):
    """A `ModelClient` for the Responses API (stateless: store=False, the whole input every call)."""

    def request(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> dict[str, Any]:
        return dict(
            model=self.model,
            instructions=prompt.system,
            input=to_input(prompt),
            tools=[{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                    "strict": False} for t in tools],
            parallel_tool_calls=True,
            max_output_tokens=max_output_tokens,
            store=False,
            **({"user": self.user} if self.user else {}),
        )

    async def complete(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> ModelReply:
        return await self._send(self._client.responses.create, self.request(prompt, tools, max_output_tokens),
                                parse_response)

    async def _tiny(self) -> ModelReply:
        return await self._send(self._client.responses.create, {
            "model": self.model, "input": "ping", "max_output_tokens": 16, "store": False}, parse_response)
