"""The CPU engine: a transformers causal LM decoded in dynamic batches with a padded KV cache.

A hand-written loop (rather than `model.generate`) gives what serving needs and `generate` does not:
requests join and leave the running batch between decoding steps (so concurrent requests share one
forward pass per token), token-by-token streaming, a private seeded generator per request (answers do
not depend on what else is in the batch), stop sequences cut out of the text, and honest finish reasons.
Every forward step runs on one worker thread, so the event loop stays free for HTTP; the batch itself
(`DecodeBatch`) lives in `batch.py`. tests/test_serve_engine.py checks greedy answers, alone and batched,
against `model.generate`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from tokenizers.decoders import DecodeStream
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr.lora import load_merged
from ray_zephyr.serving.batch import DecodeBatch
from ray_zephyr.serving.engine import FinishReason, Piece, Sampling

logger = logging.getLogger(__name__)
REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to


def find_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int | None:
    """Where the earliest stop sequence starts in `text[start:]`, if any does."""
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
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


class Choice:
    """One of a request's `n` answers: its text, decoded token by token (tokenizers' `DecodeStream`,
    so each token costs O(1) however long the answer; the whole answer is decoded once, at the end),
    and its finish reason."""

    def __init__(self, index: int):
        self.index = index
        self.detokenizer = DecodeStream(skip_special_tokens=True)
        self.tokens: list[int] = []  # end-of-sequence excluded
        self.text = ""
        self.sent = 0  # characters already sent
        self.counted = 0  # tokens generated, end-of-sequence included
        self.reported = 0  # tokens already accounted for in pieces
        self.finish: FinishReason | None = None


class Request:
    """A request's choices, its sampler and the queue its pieces travel through to `generate`."""

    def __init__(self, engine: TransformersEngine, prompt_ids: list[int], sampling: Sampling):
        self.engine, self.prompt_ids, self.sampling = engine, prompt_ids, sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.choices = [Choice(i) for i in range(sampling.n)]
        self.queue: asyncio.Queue[list[Piece] | BaseException | None] = asyncio.Queue()
        self.cancelled = False  # the client went away: its rows leave the batch at the next step

    @property
    def finished(self) -> bool:
        return all(c.finish for c in self.choices)

    def advance(self, choice: Choice, token: int) -> Piece | None:
        """Add the token `choice` sampled: its new text (held back where it may become a stop sequence),
        or None while there is nothing to send."""
        s, engine = self.sampling, self.engine
        choice.counted += 1
        finish: FinishReason | None = None
        searched = max(0, len(choice.text) - max(map(len, s.stop), default=0) + 1)
        if token in engine.eos_ids:
            finish = "stop"
        else:
            choice.tokens.append(token)
            choice.text += choice.detokenizer.step(engine.tokenizer.backend_tokenizer, token) or ""
        if finish is None and choice.counted >= s.max_tokens:
            finish = "length"
        if finish:  # the stream holds back an unfinished character at the end; the answer ends with it
            choice.text = engine.tokenizer.decode(choice.tokens, skip_special_tokens=True)
        cut = find_stop(choice.text, s.stop, searched)
        if cut is not None:
            choice.text, finish = choice.text[:cut], "stop"
        end = len(choice.text) if finish else safe_end(choice.text, s.stop)
        delta, choice.sent = choice.text[choice.sent:end], max(choice.sent, end)
        if not delta and finish is None:
            return None
        choice.finish = finish
        tokens, choice.reported = choice.counted - choice.reported, choice.counted
        return Piece(index=choice.index, text=delta, tokens=tokens, finish_reason=finish)


class TransformersEngine:
    """Serves a Hugging Face folder with transformers on the CPU, up to `max_batch_rows` choices at once. A LoRA
    adapter folder is merged into its base as it loads (no adapter arithmetic per token)."""

    def __init__(self, model_dir: str, max_batch_rows: int = 64):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_merged(model_dir, AutoModelForCausalLM.from_pretrained).eval()
        self.context_length = self.model.config.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.max_batch_rows = max_batch_rows
        self.batch = DecodeBatch(self.model)  # touched only on the worker thread
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._waiting: list[Request] = []
        self._loop_task: asyncio.Task | None = None
        self._failure: Exception | None = None

    async def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[list[Piece]]:
        request = Request(self, prompt_ids, sampling)
        self._waiting.append(request)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())
        try:
            while (item := await request.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True  # a no-op once finished; else its rows are dropped at the next step

    async def _decode_loop(self) -> None:
        """Step the batch while anyone is waiting or decoding; admit waiting requests between steps."""
        loop = asyncio.get_running_loop()
        while self._waiting or self.batch.rows:
            admitted, rows = [], len(self.batch.rows)
            while self._waiting and (not admitted and not rows or
                                     rows + self._waiting[0].sampling.n <= self.max_batch_rows):
                request = self._waiting.pop(0)
                if not request.cancelled:
                    admitted.append(request)
                    rows += request.sampling.n
            try:
                results = await loop.run_in_executor(self._worker, self.batch.step, admitted)
            except Exception as exc:  # noqa: BLE001 - the batch is lost: fail its requests, then the health check
                logger.exception("decoding step failed")
                self._failure = exc
                for request in {*admitted, *(r for r, _ in self.batch.rows), *self._waiting}:
                    request.queue.put_nowait(exc)
                self._waiting.clear()
                self.batch.clear()
                return
            for request, pieces in results:
                if pieces:
                    request.queue.put_nowait(pieces)
                if request.finished:
                    request.queue.put_nowait(None)

    async def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the decoding loop failed: {self._failure!r}")
