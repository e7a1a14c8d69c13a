"""The one interface both engines implement, and the choice between them.

The service renders the chat template and tokenizes with the folder's own tokenizer, then asks an
engine to continue the token ids. An engine streams `Piece`s: new text for one choice, how many tokens
it took, and why the choice ended. Stop sequences never appear in the text (as with OpenAI).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from transformers import PreTrainedTokenizerBase

from ray_zephyr.errors import UserError
from ray_zephyr.lora import ADAPTER_CONFIG
from ray_zephyr.models import resolve_model_path
from ray_zephyr.serving.settings import ServeSettings

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt: the engine-neutral form of the OpenAI sampling fields."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x times the token was sampled in this choice
    presence_penalty: float = 0.0  # minus penalty once the token was sampled in this choice
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)


@dataclass(frozen=True)
class Piece:
    """New output for choice `index`: `text` is the delta, `tokens` the tokens it took."""

    index: int
    text: str
    tokens: int
    finish_reason: FinishReason | None = None


class Engine(Protocol):
    tokenizer: PreTrainedTokenizerBase
    context_length: int

    def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[list[Piece]]:
        """Stream pieces until every one of the `sampling.n` choices has finished."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve (Serve then replaces the replica)."""
        ...


def load_engine(settings: ServeSettings) -> Engine:
    """Build the configured engine; vLLM is imported only when asked for (an optional extra). The folder holds a
    Hugging Face model, or a LoRA adapter (peft format) that names its base model."""
    model_dir = resolve_model_path(settings.model)
    if not any((Path(model_dir) / name).is_file() for name in ("config.json", ADAPTER_CONFIG)):
        raise UserError(f"model {model_dir!r} is not a Hugging Face model folder nor a LoRA adapter folder (no "
                        f"config.json or {ADAPTER_CONFIG} in it)")
    if settings.engine == "vllm":
        from ray_zephyr.serving.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, settings.vllm_engine_args)
    from ray_zephyr.serving.transformers_engine import TransformersEngine

    return TransformersEngine(model_dir, max_batch_rows=settings.max_batch_rows)
