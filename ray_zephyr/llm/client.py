"""Chat calls to any OpenAI-compatible endpoint: bounded concurrency, retries with backoff, timeouts, a cache.

The `openai` package does the HTTP, the timeouts and the retries (exponential backoff with jitter on
timeouts, connection errors, 408/409/429 and 5xx); this module adds a bound on requests in flight, the
content-keyed cache, token counts, and turns a final failure into a short reason instead of an exception.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import openai

from ray_zephyr.errors import UserError
from ray_zephyr.llm.cache import ResponseCache
from ray_zephyr.llm.config import EndpointConfig

T = TypeVar("T")


class Unparseable(ValueError):
    """An answer that cannot be read; `reason` is the countable part."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Reply:
    """One chat answer (`texts`, one per choice), or `error`: why no answer came."""

    texts: list[str] = field(default_factory=list)
    error: str | None = None
    cached: bool = False
    finish_reasons: list[str | None] = field(default_factory=list)  # one per choice: stop, length, ...
    completion_tokens: int | None = None  # over all choices, as the API's usage counts them


@dataclass
class CallStats:
    calls: int = 0  # requests that reached the endpoint (retries by the client included once)
    cached: int = 0
    reasks: int = 0  # extra requests made because an answer could not be parsed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter = field(default_factory=Counter)


def failure_reason(exc: Exception) -> str:
    """A short, countable name for a call that failed after its retries."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    return type(exc).__name__


def _api_key(endpoint: EndpointConfig) -> str:
    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else "none"
    if key is None:
        raise UserError(f"endpoint {endpoint.base_url}: environment variable {endpoint.api_key_env} is not set")
    return key


def check_endpoint(endpoint: EndpointConfig, role: str) -> None:
    """Before any generation: the key is set and the endpoint answers one cheap request (GET /models, free on paid
    APIs), so a closed port, a wrong host or a refused key is one line at once, not after every answer is made."""
    client = openai.OpenAI(base_url=endpoint.base_url, api_key=_api_key(endpoint),
                           timeout=min(endpoint.timeout_s, 30.0), max_retries=1)
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        via = f" (from ${endpoint.api_key_env})" if endpoint.api_key_env else " (none sent: set api_key_env)"
        raise UserError(f"{role} endpoint {endpoint.base_url} refused the key{via}: HTTP {exc.status_code}") from None
    except openai.APIStatusError:
        pass  # it answered; some servers have no /models route
    except openai.APIConnectionError as exc:
        raise UserError(f"{role} endpoint {endpoint.base_url} cannot be reached ({failure_reason(exc)}: "
                        f"{exc.__cause__ or exc}); is it running?") from None
    finally:
        client.close()


class ChatClient:
    def __init__(self, endpoint: EndpointConfig, cache: ResponseCache | None = None):
        key = _api_key(endpoint)
        self.endpoint, self.cache, self.stats = endpoint, cache, CallStats()
        self._client = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=key, timeout=endpoint.timeout_s,
                                          max_retries=endpoint.max_retries)
        self._slots = asyncio.Semaphore(endpoint.max_concurrency)

    async def chat(self, messages: list[dict], *, attempt: int = 0, **sampling) -> Reply:
        """`sampling`: temperature, top_p, max_tokens, n, seed. `attempt` makes a deliberate re-ask a new request."""
        request = {"model": self.endpoint.model, "messages": messages, **sampling}
        key = {**request, "attempt": attempt}
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats.cached += 1
            return Reply(texts=hit["texts"], cached=True, finish_reasons=hit.get("finish_reasons", []),
                         completion_tokens=hit.get("completion_tokens"))
        async with self._slots:
            self.stats.calls += 1
            try:
                response = await self._client.chat.completions.create(**request)
            except openai.OpenAIError as exc:
                reason = failure_reason(exc)
                self.stats.errors[reason] += 1
                return Reply(error=reason)
        texts = [choice.message.content or "" for choice in response.choices]
        finish_reasons = [choice.finish_reason for choice in response.choices]
        tokens = response.usage.completion_tokens if response.usage is not None else None
        if response.usage is not None:
            self.stats.prompt_tokens += response.usage.prompt_tokens
            self.stats.completion_tokens += response.usage.completion_tokens
        if self.cache is not None:
            self.cache.put(key, {"texts": texts, "finish_reasons": finish_reasons, "completion_tokens": tokens})
        return Reply(texts=texts, finish_reasons=finish_reasons, completion_tokens=tokens)

    async def ask(self, messages: list[dict], parse: Callable[[str], T], retries: int,
                  **sampling) -> tuple[T | None, str | None, list[str]]:
        """`parse(answer)`, asking again (a new, separately cached request) up to `retries` times while it raises
        Unparseable; returns (value, None, replies) or (None, reason, replies) with reason `unparseable_*` or
        `judge_<failure>`; `replies` are the raw answers, one per attempt, for the judgment's audit trail."""
        reason, replies = None, []
        for attempt in range(retries + 1):
            self.stats.reasks += attempt > 0
            reply = await self.chat(messages, attempt=attempt, **sampling)
            if reply.error is not None:
                return None, f"judge_{reply.error}", replies
            replies.append(reply.texts[0])
            try:
                return parse(reply.texts[0]), None, replies
            except Unparseable as exc:
                reason = f"unparseable_{exc.reason}"
        return None, reason, replies

    async def close(self) -> None:
        await self._client.close()
