"""The CPU engine: a transformers causal LM decoded in dynamic batches with a padded KV cache.

A hand-written loop (rather than `model.generate`) gives what serving needs and `generate` does not:
requests join and leave the running batch between decoding steps (so concurrent requests share one
forward pass per token), token-by-token streaming, a private seeded generator per request (answers do
not depend on what else is in the batch), stop sequences cut out of the text, and honest finish reasons.
Every forward step runs on one worker thread, so the event loop stays free for HTTP; the batch itself
(`DecodeBatch`) lives in `batch.py`, each request's choices and their text (`Request`) in `decoding.py`.
tests/test_serve_engine.py checks greedy answers, alone and batched, against `model.generate`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr.lora import load_merged
from ray_zephyr.serving.batch import DecodeBatch
from ray_zephyr.serving.decoding import Request
from ray_zephyr.serving.engine import Piece, Sampling

logger = logging.getLogger(__name__)


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
        request = Request(self.tokenizer, self.eos_ids, prompt_ids, sampling)
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
