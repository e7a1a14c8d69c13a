"""Chat completions over any engine: chat template in, OpenAI `ChatCompletion`(`Chunk`)s out.

Shared by both engines, so everything a client sees (prompt rendering, limits, usage counts, stream
framing) is tested on CPU. The prompt is rendered with the model folder's own chat template, the same
one training used, and tokenized without extra special tokens (the template carries them).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from jinja2 import TemplateError
from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from ray_zephyr.serving.engine import Engine, FinishReason, Piece, Sampling
from ray_zephyr.serving.metrics import ServingMetrics
from ray_zephyr.serving.protocol import ChatRequest, OpenAIError


@dataclass(frozen=True)
class TokenizedRequest:
    """A validated request, its prompt tokens and how to sample."""

    request: ChatRequest
    prompt_ids: list[int]
    sampling: Sampling
    id: str
    created: int


@dataclass(frozen=True)
class Answer:
    """One finished choice."""

    text: str
    finish_reason: FinishReason
    tokens: int


class ChatService:
    def __init__(self, engine: Engine, model_name: str, max_n: int, default_max_tokens: int = 1024,
                 metrics: ServingMetrics | None = None):
        self.engine, self.model_name, self.max_n, self.metrics = engine, model_name, max_n, metrics
        self.default_max_tokens = default_max_tokens  # when a request sets none: the room left, capped by this
        self.created = int(time.time())

    def models(self) -> dict:
        model = Model(id=self.model_name, created=self.created, object="model", owned_by="ray-zephyr")
        return {"object": "list", "data": [model.model_dump(exclude_none=True)]}

    def tokenize_request(self, request: ChatRequest) -> TokenizedRequest:
        """Check the request against this model and render its prompt; OpenAIError if it cannot run."""
        if request.model != self.model_name:
            raise OpenAIError(404, f"model {request.model!r} does not exist; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")
        if request.n > self.max_n:
            raise OpenAIError(400, f"n is {request.n}; this server allows at most {self.max_n}", param="n")
        prompt_ids = self.render(request)
        context = self.engine.context_length
        room = context - len(prompt_ids)
        if room <= 0:
            raise OpenAIError(400, f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}",
                              param="messages", code="context_length_exceeded")
        limit = request.token_limit
        if limit is not None and limit > room:
            raise OpenAIError(
                400,
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({limit}) exceeds the model's context "
                f"({context} tokens)",
                param="max_tokens", code="context_length_exceeded",
            )
        vocab = len(self.engine.tokenizer)
        for token in request.logit_bias:
            if not 0 <= token < vocab:
                raise OpenAIError(400, f"logit_bias names token {token}; this model's tokens are 0..{vocab - 1}",
                                  param="logit_bias")
        sampling = Sampling(max_tokens=limit or min(room, self.default_max_tokens), temperature=request.temperature,
                            top_p=request.top_p, n=request.n, stop=tuple(request.stop), seed=request.seed,
                            frequency_penalty=request.frequency_penalty, presence_penalty=request.presence_penalty,
                            logit_bias=tuple(request.logit_bias.items()))
        return TokenizedRequest(request, prompt_ids, sampling, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))

    def render(self, request: ChatRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        messages = [m.model_dump() for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:
            raise OpenAIError(400, f"the model's chat template rejected the messages: {exc}",
                              param="messages") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    async def _pieces(self, tokenized: TokenizedRequest) -> AsyncIterator[list[Piece]]:
        pieces = self.engine.generate(tokenized.prompt_ids, tokenized.sampling, tokenized.id)
        if self.metrics is None:
            async for batch in pieces:
                yield batch
            return
        start, first, tokens = self.metrics.started(len(tokenized.prompt_ids)), None, 0
        try:
            async for batch in pieces:
                first = first or self.metrics.first(start)
                tokens += sum(p.tokens for p in batch)
                yield batch
        finally:
            self.metrics.finished(tokens, first)

    def _usage(self, tokenized: TokenizedRequest, completion_tokens: int) -> CompletionUsage:
        prompt = len(tokenized.prompt_ids)
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion_tokens,
                               total_tokens=prompt + completion_tokens)

    async def answers(self, tokenized: TokenizedRequest) -> list[Answer]:
        """Each of the n choices whole, with its own token count (AI-feedback generation labels completions so)."""
        n = tokenized.sampling.n
        texts, finish, tokens = [""] * n, ["stop"] * n, [0] * n
        async for pieces in self._pieces(tokenized):
            for piece in pieces:
                texts[piece.index] += piece.text
                tokens[piece.index] += piece.tokens
                finish[piece.index] = piece.finish_reason or finish[piece.index]
        return [Answer(*choice) for choice in zip(texts, finish, tokens)]

    async def complete(self, tokenized: TokenizedRequest) -> ChatCompletion:
        answers = await self.answers(tokenized)
        choices = [
            Choice(index=i, message=ChatCompletionMessage(role="assistant", content=a.text),
                   finish_reason=a.finish_reason, logprobs=None)
            for i, a in enumerate(answers)
        ]
        return ChatCompletion(id=tokenized.id, object="chat.completion", created=tokenized.created,
                              model=self.model_name, choices=choices,
                              usage=self._usage(tokenized, sum(a.tokens for a in answers)))

    async def stream(self, tokenized: TokenizedRequest) -> AsyncIterator[ChatCompletionChunk]:
        """The role first, then text deltas, a finish reason per choice, and usage last if asked for."""

        def chunk(choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> ChatCompletionChunk:
            extra = {"usage": usage} if usage else {}
            return ChatCompletionChunk(id=tokenized.id, object="chat.completion.chunk", created=tokenized.created,
                                       model=self.model_name, choices=choices, **extra)

        yield chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""), finish_reason=None)
                     for i in range(tokenized.sampling.n)])
        tokens = 0
        async for pieces in self._pieces(tokenized):
            tokens += sum(p.tokens for p in pieces)
            yield chunk([ChunkChoice(index=p.index, delta=ChoiceDelta(content=p.text), finish_reason=p.finish_reason)
                         for p in pieces])
        if tokenized.request.include_usage:
            yield chunk([], self._usage(tokenized, tokens))
