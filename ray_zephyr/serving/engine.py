"""The one interface both engines implement. Types only: `engines.py` picks and builds an engine, so the
engines import this module and it imports neither of them.

The service renders the chat template and tokenizes with the folder's own tokenizer, then asks an
engine to continue the token ids. An engine streams `Piece`s: new text for one choice, how many tokens
it took, and why the choice ended. Stop sequences never appear in the text (as with OpenAI).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from transformers import PreTrainedTokenizerBase

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
