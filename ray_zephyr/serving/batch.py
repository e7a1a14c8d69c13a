"""The running batch of the transformers engine: one row per unfinished choice, one KV cache for all.

Rows have different lengths, so the cache is left-padded to the longest row and an attention mask
hides the padding; each row carries its own position ids, as `model.generate` does for a left-padded
batch. A new request is prefilled alone (one row, repeated `n` times), then its cache is padded and
stacked onto the batch's; finished rows are dropped, and padding columns no row needs any more are
cut off, so the cache stays as long as the longest live row.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ray_zephyr.serving.decoding import ChoiceState, Request
from ray_zephyr.serving.engine import Piece
from ray_zephyr.serving.sampling import RowSampling


def _each_layer(cache, change) -> None:
    """Apply `change` to every layer's keys and values ([rows, heads, length, head_dim])."""
    for layer in cache.layers:
        layer.keys, layer.values = change(layer.keys), change(layer.values)


def _pad_left(cache, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad `cache` and its [rows, columns] `mask` to `length` columns; the new mask."""
    pad = length - mask.shape[1]
    if pad:
        _each_layer(cache, lambda t: F.pad(t, (0, 0, pad, 0)))
    return F.pad(mask, (pad, 0))


class DecodeBatch:
    """Rows (request, choice), their sampling, KV cache, attention mask, next input token and next position."""

    def __init__(self, model):
        self.model = model
        self.vocab = model.config.vocab_size
        # the KV cache's argument and output: `cache` since transformers 5.24, whose `past_key_values` warns and goes
        # in 5.40; vLLM's CPU build pins a 5.x before the rename
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.clear()

    def clear(self) -> None:
        self.rows: list[tuple[Request, ChoiceState]] = []
        self.sampling = RowSampling.empty()
        self.cache = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.next_ids = torch.zeros(0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)

    def step(self, admitted: list[Request]) -> list[tuple[Request, list[Piece]]]:
        """Drop cancelled rows, prefill the admitted requests, then decode one token for every row."""
        self._keep([i for i, (request, _) in enumerate(self.rows) if not request.cancelled])
        pieces: dict[int, tuple[Request, list[Piece]]] = {}
        for request in admitted:
            pieces[id(request)] = (request, self._prefill(request))
        if self.rows:
            with torch.inference_mode():
                mask = F.pad(self.mask, (0, 1), value=1)
                out = self.model(input_ids=self.next_ids[:, None], attention_mask=mask,
                                 position_ids=self.positions[:, None], use_cache=True, **{self.cache_name: self.cache})
            self.cache, self.mask, self.positions = getattr(out, self.cache_name), mask, self.positions + 1
            self.next_ids = self.sampling.sample(out.logits[:, -1])
            for (request, choice), token in zip(self.rows, self.next_ids.tolist()):
                if (piece := request.advance(choice, token)) is not None:
                    pieces.setdefault(id(request), (request, []))[1].append(piece)
            self._keep([i for i, (_, choice) in enumerate(self.rows) if not choice.finish])
        return list(pieces.values())

    def _prefill(self, request: Request) -> list[Piece]:
        """Run the prompt once, sample each choice's first token, and add the unfinished choices as rows."""
        n, prompt = request.sampling.n, torch.tensor([request.prompt_ids])
        with torch.inference_mode():
            out = self.model(input_ids=prompt, use_cache=True)
        sampling = RowSampling.for_request(request.sampling, request.generator, self.vocab)
        first = sampling.sample(out.logits[:, -1].expand(n, -1))
        pieces = [request.advance(choice, token) for choice, token in zip(request.choices, first.tolist())]
        live = [i for i, c in enumerate(request.choices) if not c.finish]
        if live:
            cache = getattr(out, self.cache_name)
            _each_layer(cache, lambda t: t.expand(len(live), -1, -1, -1).contiguous())
            mask = torch.ones(len(live), prompt.shape[1], dtype=torch.long)
            rows = [(request, request.choices[i]) for i in live]
            self._stack(cache, mask, first[live], rows, sampling.take(live), prompt.shape[1])
        return [p for p in pieces if p is not None]

    def _stack(self, cache, mask: torch.Tensor, next_ids: torch.Tensor, rows: list, sampling: RowSampling,
               position: int) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_pad_left(self.cache, self.mask, length), _pad_left(cache, mask, length)])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
        self.rows += rows
        self.sampling = self.sampling.join(sampling, self.vocab)
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.positions = torch.cat([self.positions, torch.full((len(rows),), position)])

    def _keep(self, indices: list[int]) -> None:
        """Keep only these rows, and cut the padding columns no kept row needs."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.clear()
            return
        index = torch.tensor(indices)
        self.rows = [self.rows[i] for i in indices]
        self.sampling = self.sampling.take(indices)
        self.mask, self.next_ids, self.positions = self.mask[index], self.next_ids[index], self.positions[index]
        start = int(self.mask.any(0).nonzero()[0])
        self.mask = self.mask[:, start:]
        _each_layer(self.cache, lambda t: t[index, :, start:])
