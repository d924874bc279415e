"""What a model backend exchanges with the agent loop: conversation values, the client protocol, errors.

Provider specifics (wire format, usage fields, SDK errors) live in the backend modules; each fills the
small `ModelClient` protocol and normalises usage and stop reasons to the values here.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from bus.records import TokenRecord
from enpire import ledger
from enpire.agents.toolkit import Image

# Why a reply ended, the same words for every provider.
Stop = Literal["tool_use", "end", "max_tokens", "refusal", "other"]


@dataclass(frozen=True)
class Usage:
    """Tokens of one model call, as the provider reported them. `input_tokens` counts every prompt token
    (cached reads and cache writes included); `output_tokens` counts reasoning tokens too."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total(self) -> int:
        return ledger.call_tokens(self.input_tokens, self.output_tokens)

    def ledger_record(self, agent: str, model: str, t: float, price: ledger.Price | None) -> TokenRecord:
        """This call as the token ledger keeps it, priced (the one place a call becomes a `TokenRecord`)."""
        cost = ledger.cost(price, self.input_tokens, self.cached_input_tokens, self.cache_write_tokens,
                           self.output_tokens)
        return TokenRecord(agent, model, t, self.input_tokens, self.cached_input_tokens, self.output_tokens,
                           cache_write_tokens=self.cache_write_tokens, reasoning_tokens=self.reasoning_tokens,
                           cost=cost)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it (it may be invalid: the registry says so)


@dataclass(frozen=True)
class ModelReply:
    text: str
    calls: list[ToolCall]
    usage: Usage
    stop: Stop = "end"
    raw_stop: str = ""  # the provider's own word, for logs
    refusal: str = ""  # the provider's refusal text, when it refused


@dataclass(frozen=True)
class ToolOutput:
    call_id: str
    name: str
    content: str
    is_error: bool = False
    images: tuple[Image, ...] = ()


@dataclass(frozen=True)
class Turn:
    """One model reply and what came back to it (tool outputs, or a nudge when it called no tool)."""

    reply: ModelReply
    outputs: list[ToolOutput]
    nudge: str = ""


@dataclass(frozen=True)
class Prompt:
    """What one model call carries, in the order it is sent: the stable prefix (system, then the task card
    as the first user message), the turns, then the briefing that changes every call (digest, results,
    budget) as the last user message. Only the briefing's place moves, so each request starts with the
    previous one up to the previous briefing, and providers can cache that prefix."""

    system: str
    card: str
    turns: list[Turn]
    briefing: str

    def chars(self) -> int:
        """Size of what is sent, in characters (a provider-independent proxy for input tokens)."""
        n = len(self.system) + len(self.card) + len(self.briefing)
        for t in self.turns:
            n += len(t.reply.text) + len(t.nudge)
            n += sum(len(c.name) + len(c.arguments) for c in t.reply.calls)
            n += sum(len(o.content) for o in t.outputs)
        return n


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object


class ModelError(Exception):
    """A failed model call, already scrubbed of secrets. `retryable` False means retrying as-is won't help;
    `fatal` means it never will (a wrong model name or key): the agent stops."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float | None = None,
                 auth: bool = False, bad_request: bool = False, fatal: bool = False):
        super().__init__(message)
        self.retryable = retryable and not fatal
        self.retry_after = retry_after
        self.auth = auth
        self.bad_request = bad_request
        self.fatal = fatal


class LLMConfigError(ValueError):
    """A backend cannot start (its key variable is unset, the model does not exist, the key is refused):
    one line naming the variable or the model, never a secret."""


class ModelClient(Protocol):
    model: str
    secrets: tuple[str, ...]  # values to scrub from every text the agent logs or posts

    async def complete(self, prompt: Prompt, tools: Sequence[ToolSpec], max_output_tokens: int) -> ModelReply: ...

    async def probe(self) -> Usage | None:
        """One cheap check at start; raises LLMConfigError for a wrong model name or key. Returns the usage
        of a model call when it had to make one (the caller bills it), else None."""


# ----------------------------------------------------------------------------- text hygiene

# Header-shaped or key-shaped text an error body might echo back.
_SECRETISH = re.compile(
    r"(?i)(bearer\s+[A-Za-z0-9._~+/=\-]+"
    r"|(x-api-key|api[_-]?key|authorization)[\"']?\s*[:=]\s*[\"']?(bearer\s+)?[^\s,\"'}]+"
    r"|sk-[A-Za-z0-9_\-]{8,})"
)


def scrub(text: str, secrets: Sequence[str] = (), *, headers: bool = True) -> str:
    """Replace the secrets' values and, with `headers`, anything shaped like an auth header or key.

    Tool outputs (policy code, notes) are scrubbed with headers=False so that code is never mangled;
    error texts, logs and findings get both."""
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
    return _SECRETISH.sub("[redacted]", text) if headers else text


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 40)] + f"\n…[cut: {len(text) - limit + 40} more chars]"


def sdk_error(e: Exception, secrets: Sequence[str]) -> ModelError:
    """Classify an exception from either SDK (both are generated alike: status_code, response.headers)."""
    message = truncate(scrub(f"{type(e).__name__}: {e}", secrets), 400)
    status = getattr(e, "status_code", None)
    if isinstance(status, int):
        retry_after = None
        response = getattr(e, "response", None)
        headers = getattr(response, "headers", None) or {}
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                retry_after = float(headers.get(name)) * scale
                break
            except (TypeError, ValueError):
                continue
        if status in (401, 403):
            return ModelError(message, retryable=False, auth=True)
        if status == 404:  # no such model (or endpoint): asking again will not create it
            return ModelError(message, retryable=False, fatal=True)
        if status in (408, 409, 429) or status >= 500:
            return ModelError(message, retry_after=retry_after)
        return ModelError(message, retryable=False, bad_request=True)
    return ModelError(message)  # timeouts, dropped connections, unparsable bodies: try again


async def probe_model(client: Any, model: str, secrets: Sequence[str], key_env: str,
                      one_token: Callable[[], Awaitable[Usage]]) -> Usage | None:
    """Ask either SDK for the model by name (GET models/{id}, free of tokens). A 404 there may be a server
    without that endpoint: a one-token request then decides. A wrong name or key raises LLMConfigError;
    returns the usage of the one-token request when one was needed (the caller bills it)."""
    try:
        await client.models.retrieve(model)
        return None
    except Exception as e:
        err = sdk_error(e, secrets)
    if err.auth:
        raise LLMConfigError(f"the key in {key_env} was refused ({err})")
    if not err.fatal:
        return None  # transient: the loop's own retries deal with it
    try:
        return await one_token()
    except Exception as e:
        err = e if isinstance(e, ModelError) else sdk_error(e, secrets)
        if err.fatal or err.auth:
            raise LLMConfigError(f"model {model!r} is not served at this endpoint ({err})") from None
        return None
