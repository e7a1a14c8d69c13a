"""One request in the transformers engine: its `n` choices, each decoded token by token into text, with
stop sequences held back while they may still form and cut out once they do.

Its own module so that `batch.py` (which advances every choice by a token a step) and
`transformers_engine.py` (which creates requests and streams their pieces) both import it, and it neither.
"""

from __future__ import annotations

import asyncio
import random

import torch
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from ray_zephyr.serving.engine import FinishReason, Piece, Sampling

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


class ChoiceState:
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
    """A request's choices, its sampler and the queue its pieces travel through to the engine's `generate`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int], prompt_ids: list[int],
                 sampling: Sampling):
        self.tokenizer, self.eos_ids, self.prompt_ids, self.sampling = tokenizer, eos_ids, prompt_ids, sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.choices = [ChoiceState(i) for i in range(sampling.n)]
        self.queue: asyncio.Queue[list[Piece] | BaseException | None] = asyncio.Queue()
        self.cancelled = False  # the client went away: its rows leave the batch at the next step

    @property
    def finished(self) -> bool:
        return all(c.finish for c in self.choices)

    def advance(self, choice: ChoiceState, token: int) -> Piece | None:
        """Add the token `choice` sampled: its new text (held back where it may become a stop sequence),
        or None while there is nothing to send."""
        s = self.sampling
        choice.counted += 1
        finish: FinishReason | None = None
        searched = max(0, len(choice.text) - max(map(len, s.stop), default=0) + 1)
        if token in self.eos_ids:
            finish = "stop"
        else:
            choice.tokens.append(token)
            choice.text += choice.detokenizer.step(self.tokenizer.backend_tokenizer, token) or ""
        if finish is None and choice.counted >= s.max_tokens:
            finish = "length"
        if finish:  # the stream holds back an unfinished character at the end; the answer ends with it
            choice.text = self.tokenizer.decode(choice.tokens, skip_special_tokens=True)
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
