"""The CPU engine: a transformers causal LM decoded with a plain KV-cache loop.

A hand-written loop (rather than `model.generate`) gives what serving needs and `generate` does not
give per request: token-by-token streaming without a thread per request, a private seeded generator
(reproducible under concurrency), stop sequences cut out of the text, and honest finish reasons.
Every forward step runs on one worker thread: concurrent requests interleave token by token, the
event loop stays free for HTTP, and requests never fight over the cores.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr.serving.engine import FinishReason, Piece, Sampling

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """[rows, vocab] logits -> [rows] token ids: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence starts in `text`, if any does."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stop: tuple[str, ...]) -> int:
    """How much of unfinished `text` can be sent: hold back a tail that may still become a stop
    sequence, and half a UTF-8 character."""
    end = len(text)
    if text.endswith(REPLACEMENT_CHAR):
        end = len(text.rstrip(REPLACEMENT_CHAR))
    for k in range(min(end, max(map(len, stop), default=1) - 1), 0, -1):
        if any(s.startswith(text[end - k:end]) for s in stop):
            return end - k
    return end


class _Choices:
    """The decoding state of one request: `n` rows sampled from the same prompt."""

    def __init__(self, engine: TransformersEngine, prompt_ids: list[int], sampling: Sampling):
        self.engine, self.sampling = engine, sampling
        self.next_input = torch.tensor([prompt_ids] * sampling.n)
        self.cache = None
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[list[int]] = [[] for _ in range(sampling.n)]
        self.counted = [0] * sampling.n  # tokens generated, eos included
        self.reported = [0] * sampling.n  # tokens already accounted for in pieces
        self.sent = [0] * sampling.n  # characters already sent
        self.finish: list[FinishReason | None] = [None] * sampling.n

    @property
    def finished(self) -> bool:
        return all(self.finish)

    def step(self) -> list[Piece]:
        """One forward pass for all rows; the pieces it produced."""
        with torch.inference_mode():
            out = self.engine.model(input_ids=self.next_input, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        next_ids = sample_next(out.logits[:, -1].float(), self.sampling.temperature, self.sampling.top_p,
                               self.generator)
        self.next_input = next_ids[:, None]
        pieces = [self._advance(i, token) for i, token in enumerate(next_ids.tolist()) if not self.finish[i]]
        return [p for p in pieces if p is not None]

    def _advance(self, i: int, token: int) -> Piece | None:
        self.counted[i] += 1
        finish: FinishReason | None = None
        if token in self.engine.eos_ids:
            finish = "stop"
        else:
            self.tokens[i].append(token)
        text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        cut = find_stop(text, self.sampling.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        if finish is None and self.counted[i] >= self.sampling.max_tokens:
            finish = "length"
        end = len(text) if finish else safe_end(text, self.sampling.stop)
        delta, self.sent[i] = text[self.sent[i]:end], max(self.sent[i], end)
        if not delta and finish is None:
            return None
        self.finish[i] = finish
        tokens, self.reported[i] = self.counted[i] - self.reported[i], self.counted[i]
        return Piece(index=i, text=delta, tokens=tokens, finish_reason=finish)


class TransformersEngine:
    """Serves a Hugging Face folder with transformers on the CPU."""

    def __init__(self, model_dir: str):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.context_length = self.model.config.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    async def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[list[Piece]]:
        loop = asyncio.get_running_loop()
        choices = _Choices(self, prompt_ids, sampling)
        while not choices.finished:
            pieces = await loop.run_in_executor(self._worker, choices.step)
            if pieces:
                yield pieces

    async def check_health(self) -> None:
        return None
