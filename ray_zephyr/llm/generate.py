"""K completions per prompt from one generator, as a Ray Data batch-inference pass (for AI feedback and for
the answers evaluation grades).

Four generator kinds, one output: a model folder through the project's own serving stack in-process
(`load_engine` + `ChatService`, so prompts are rendered and limited exactly as the served model renders
them), with the transformers engine or vLLM (on GPU, or on CPU with vLLM's CPU build); any OpenAI-compatible
endpoint through `ChatClient` (a paid API, or our Ray Serve app); or a Python function (a task's own
teacher). Rows are `{id, messages, temperature?}`; the result maps each id to its completions
`{generator, text, finish_reason, tokens}`.

vLLM runs in our engine actor rather than `ray.data.llm`'s vLLM processor (Ray 2.60), which fits less well
here: it returns one sample per request (`outputs[0]`), so n completions would be n requests with their
prompts prefilled n times; it gives no finish reason, so completions cut at max_tokens could not be told
from finished ones; and its chat template stage is not the served model's rendering and prompt-length
check, where ours turns a too-long prompt into one counted drop instead of a failed pass.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import numpy as np
import ray

from ray_zephyr.llm.config import GeneratorConfig
from ray_zephyr.seeding import seeded_int


def row_seed(seed: int, row_id: str, generator: str) -> int:
    return seeded_int(seed, row_id, generator) >> 1  # 63 bits: engines take a signed 64-bit seed


class _Completions:
    """Ray Data UDF: a batch of rows -> one output row per input row with its completions (JSON). Generators
    that load nothing (an endpoint, a function) are stateless and run as Ray Data tasks, in worker processes
    that stay warm between passes; an engine loads a model and runs in an actor (`EngineCompletions`)."""

    def __init__(self, spec: GeneratorConfig):
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._run(self._batch(batch))
        return {"id": batch["id"], "completions": np.array([json.dumps(r) for r in results], dtype=object)}

    def _run(self, batch_coroutine):
        return asyncio.run(batch_coroutine)

    async def _batch(self, batch: dict[str, np.ndarray]) -> list[list[dict]]:
        return await asyncio.gather(*(self._one(json.loads(m), float(t), int(s)) for m, t, s in
                                      zip(batch["messages"], batch["temperature"], batch["seed"])))

    async def _one(self, messages: list[dict], temperature: float, seed: int) -> list[dict]:
        raise NotImplementedError


class EngineCompletions(_Completions):
    """Our serving stack without HTTP: the same template rendering, limits and engine (transformers or vLLM)
    as `ray_zephyr/serving/app.py`. A batch's prompts are submitted at once, so either engine decodes them together. One
    event loop per actor, for all its batches: an engine's background tasks (vLLM's output handler) live on it."""

    def __init__(self, spec: GeneratorConfig):
        from ray_zephyr.runtime import quiet_model_loading
        from ray_zephyr.serving.engines import load_engine
        from ray_zephyr.serving.service import ChatService

        quiet_model_loading()
        super().__init__(spec)
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)  # an engine built here binds to the loop its batches run on
        self.service = ChatService(load_engine(spec.serve_settings()), spec.name, spec.n)

    def _run(self, batch_coroutine):
        return self.loop.run_until_complete(batch_coroutine)

    async def _one(self, messages: list[dict], temperature: float, seed: int) -> list[dict]:
        from ray_zephyr.serving.protocol import ChatRequest, OpenAIError

        request = ChatRequest.model_validate({
            "model": self.spec.name, "messages": messages, "n": self.spec.n, "temperature": temperature,
            "top_p": self.spec.top_p, "max_tokens": self.spec.max_tokens, "seed": seed})
        try:
            answers = await self.service.answers(self.service.tokenize_request(request))
        except OpenAIError as exc:  # e.g. a prompt longer than the model's context: counted, not fatal
            return [{"generator": self.spec.name, "text": None, "error": exc.error.code or "invalid_request"}]
        return [{"generator": self.spec.name, "text": a.text, "finish_reason": a.finish_reason, "tokens": a.tokens}
                for a in answers]


class EndpointCompletions(_Completions):
    """Any OpenAI-compatible endpoint, `n` choices per request, with the client's retries and concurrency bound."""

    async def _batch(self, batch: dict[str, np.ndarray]) -> list[list[dict]]:
        from ray_zephyr.llm.client import ChatClient

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
        # The API counts tokens over all choices: each choice's own count is known only when there is one.
        tokens = reply.completion_tokens if len(reply.texts) == 1 else None
        reasons = reply.finish_reasons or [None] * len(reply.texts)
        return [{"generator": self.spec.name, "text": t, "finish_reason": r, "tokens": tokens}
                for t, r in zip(reply.texts, reasons, strict=True)]


class FunctionCompletions(_Completions):
    """A Python function as a generator: a task's own teacher, or any program that writes answers."""

    def __init__(self, spec: GeneratorConfig):
        from ray_zephyr.llm.functions import load_function

        super().__init__(spec)
        self.function = load_function(spec.function)

    async def _one(self, messages: list[dict], temperature: float, seed: int) -> list[dict]:
        return [{"generator": self.spec.name, "text": text} for text in self.function(messages, self.spec.n, seed)]


def check_generator(spec: GeneratorConfig, key: str) -> None:
    """Before any compute: an endpoint generator's endpoint answers, a model generator's model exists (a missing
    folder is one line here, not a traceback from every Ray Data actor that tries to load it)."""
    from ray_zephyr.llm.client import check_endpoint
    from ray_zephyr.models import check_model_source

    if spec.kind == "openai":
        check_endpoint(spec.endpoint, key)
    elif spec.kind in ("transformers", "vllm"):
        check_model_source(spec.model, f"{key} model")


def generate(rows: list[dict], spec: GeneratorConfig, seed: int) -> dict[str, list[dict]]:
    """Completions of `spec` for each row id (rows: {id, messages, temperature?})."""
    items = [{"id": str(r["id"]), "messages": json.dumps(r["messages"]), "seed": row_seed(seed, str(r["id"]), spec.name),
              "temperature": float(r.get("temperature", spec.temperature))} for r in rows]
    ds = ray.data.from_items(items)
    if spec.kind in ("transformers", "vllm"):
        out = ds.map_batches(EngineCompletions, fn_constructor_kwargs={"spec": spec}, batch_size=spec.batch_size,
                             compute=ray.data.ActorPoolStrategy(size=spec.concurrency), num_gpus=spec.num_gpus,
                             batch_format="numpy")
    else:
        udf = EndpointCompletions(spec) if spec.kind == "openai" else FunctionCompletions(spec)
        out = ds.map_batches(udf, batch_size=spec.batch_size, compute=ray.data.TaskPoolStrategy(size=spec.concurrency),
                             batch_format="numpy")
    completions: dict[str, list[dict]] = defaultdict(list)
    for row in out.iter_rows():
        completions[row["id"]] += json.loads(row["completions"])
    return completions
