"""K completions per prompt from one model, as a Ray Data batch-inference pass.

Four back ends, one output: on CPU the project's own serving stack in-process (`load_engine` +
`ChatService`, so prompts are rendered and limited exactly as the served model renders them); on GPU
vLLM through `ray.data.llm` (imported only then); any OpenAI-compatible endpoint through `ChatClient` (a
paid API, or our Ray Serve app); or a Python function (a task's own teacher). Rows are
`{id, messages, temperature?}`; the result maps each id to its completions `{generator, text, finish_reason, tokens}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import defaultdict

import numpy as np
import ray

from ray_zephyr.aif.config import GeneratorConfig


def row_seed(seed: int, row_id: str, generator: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{row_id}/{generator}".encode()).digest()[:8], "little") >> 1


class _Completions:
    """Ray Data UDF: a batch of rows -> one output row per input row with its completions (JSON)."""

    def __init__(self, spec: GeneratorConfig):
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = asyncio.run(self._batch(batch))
        return {"id": batch["id"], "completions": np.array([json.dumps(r) for r in results], dtype=object)}

    async def _batch(self, batch: dict[str, np.ndarray]) -> list[list[dict]]:
        return await asyncio.gather(*(self._one(json.loads(m), float(t), int(s)) for m, t, s in
                                      zip(batch["messages"], batch["temperature"], batch["seed"])))

    async def _one(self, messages: list[dict], temperature: float, seed: int) -> list[dict]:
        raise NotImplementedError


class EngineCompletions(_Completions):
    """Our serving stack without HTTP: the same template rendering, limits and engine as `serve/app.py`."""

    def __init__(self, spec: GeneratorConfig):
        from ray_zephyr.serving.engine import load_engine
        from ray_zephyr.serving.service import ChatService
        from ray_zephyr.serving.settings import ServeSettings

        super().__init__(spec)
        settings = ServeSettings(model=spec.model, engine="transformers", num_gpus=0, max_n=spec.n)
        self.service = ChatService(load_engine(settings), spec.name, spec.n)

    async def _one(self, messages: list[dict], temperature: float, seed: int) -> list[dict]:
        from ray_zephyr.serving.protocol import ChatRequest, OpenAIError

        request = ChatRequest.model_validate({
            "model": self.spec.name, "messages": messages, "n": self.spec.n, "temperature": temperature,
            "top_p": self.spec.top_p, "max_tokens": self.spec.max_tokens, "seed": seed})
        try:
            done = await self.service.complete(self.service.prepare(request))
        except OpenAIError as exc:  # e.g. a prompt longer than the model's context: counted, not fatal
            return [{"generator": self.spec.name, "text": None, "error": exc.error.code or "invalid_request"}]
        tokens = done.usage.completion_tokens // max(1, len(done.choices))
        return [{"generator": self.spec.name, "text": c.message.content, "finish_reason": c.finish_reason,
                 "tokens": tokens} for c in done.choices]


class EndpointCompletions(_Completions):
    """Any OpenAI-compatible endpoint, `n` choices per request, with the client's retries and concurrency bound."""

    async def _batch(self, batch: dict[str, np.ndarray]) -> list[list[dict]]:
        from ray_zephyr.aif.client import ChatClient

        self.client = ChatClient(self.spec.endpoint)  # its connections belong to this batch's event loop
        try:
            return await super()._batch(batch)
        finally:
            await self.client.close()

    async def _one(self, messages: list[dict], temperature: float, seed: int) -> list[dict]:
        reply = await self.client.chat(messages, temperature=temperature, top_p=self.spec.top_p,
                                       max_tokens=self.spec.max_tokens, n=self.spec.n, seed=seed)
        if reply.error is not None:
            return [{"generator": self.spec.name, "text": None, "error": f"generator_{reply.error}"}]
        return [{"generator": self.spec.name, "text": t} for t in reply.texts]


class FunctionCompletions(_Completions):
    """A Python function as a generator: a task's own teacher, or any program that writes answers."""

    def __init__(self, spec: GeneratorConfig):
        from ray_zephyr.aif.judge import load_function

        super().__init__(spec)
        self.function = load_function(spec.function)

    async def _one(self, messages: list[dict], temperature: float, seed: int) -> list[dict]:
        return [{"generator": self.spec.name, "text": text} for text in self.function(messages, self.spec.n, seed)]


def _vllm_pass(ds: ray.data.Dataset, spec: GeneratorConfig) -> ray.data.Dataset:
    """vLLM via ray.data.llm (GPU only; not exercised by the CPU test suite). One row per sample."""
    from ray.data.llm import build_llm_processor, vLLMEngineProcessorConfig

    from ray_zephyr.embedded import resolve_model_path

    config = vLLMEngineProcessorConfig(model_source=resolve_model_path(spec.model), engine_kwargs=spec.engine_kwargs,
                                       concurrency=spec.concurrency, batch_size=spec.batch_size)
    samples = ds.flat_map(lambda row: [{**row, "seed": row["seed"] + k} for k in range(spec.n)])
    processor = build_llm_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "messages": json.loads(row["messages"]), "sampling_params": {
            "temperature": row["temperature"], "top_p": spec.top_p, "max_tokens": spec.max_tokens, "seed": row["seed"]}},
        postprocess=lambda row: {"id": row["id"], "completions": json.dumps([{
            "generator": spec.name, "text": row["generated_text"], "tokens": int(row.get("num_generated_tokens", 0))}])},
    )
    return processor(samples)


def generate(rows: list[dict], spec: GeneratorConfig, seed: int) -> dict[str, list[dict]]:
    """Completions of `spec` for each row id (rows: {id, messages, temperature?})."""
    items = [{"id": str(r["id"]), "messages": json.dumps(r["messages"]), "seed": row_seed(seed, str(r["id"]), spec.name),
              "temperature": float(r.get("temperature", spec.temperature))} for r in rows]
    ds = ray.data.from_items(items)
    if spec.engine == "vllm":
        out = _vllm_pass(ds, spec)
    else:
        udf = {"transformers": EngineCompletions, "openai": EndpointCompletions, "function": FunctionCompletions}[spec.engine]
        out = ds.map_batches(udf, fn_constructor_kwargs={"spec": spec}, batch_size=spec.batch_size,
                             concurrency=spec.concurrency, num_gpus=spec.num_gpus, batch_format="numpy")
    completions: dict[str, list[dict]] = defaultdict(list)
    for row in out.iter_rows():
        completions[row["id"]] += json.loads(row["completions"])
    return completions
