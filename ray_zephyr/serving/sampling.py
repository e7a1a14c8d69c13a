"""One token for every row of the decoding batch, sampled with a few tensor ops on the whole batch.

Each row (one choice of one request) keeps its request's settings: logit_bias, OpenAI's frequency and
presence penalties, temperature (0 = greedy) and top_p. They are applied to the [rows, vocab] logits at
once, whatever the number of requests; only the random draw is per request, from the request's own
seeded generator, so an answer does not depend on what else is in the batch.

The draw is the exponential race `torch.multinomial` runs for one sample per row (the argmax of
probs / q, q exponential noise); vLLM's sampler batches per-request generators the same way. Each
request fills its own rows of q, so a seeded request gets exactly the tokens `torch.multinomial(probs,
1, generator)` gives it alone: tests/test_serve_sampling.py checks this against the per-request sampler
the engine used before, and top_p against transformers' `TopPLogitsWarper`.
"""

from __future__ import annotations

import torch

from ray_zephyr.serving.engine import Sampling


class RowSampling:
    """The rows' settings and generators (fixed), and how often each row sampled each token (for the
    penalties; None while no row is penalized). Joining and dropping rows makes a new `RowSampling`,
    which precomputes the per-step tensors once."""

    def __init__(self, settings: list[Sampling], generators: list[torch.Generator], counts: torch.Tensor | None):
        self.settings, self.generators = settings, generators
        penalized = [s.frequency_penalty != 0 or s.presence_penalty != 0 for s in settings]
        self.counts = counts if any(penalized) else None
        self.frequency = torch.tensor([[s.frequency_penalty] for s in settings])
        self.presence = torch.tensor([[s.presence_penalty] for s in settings])
        temperature = [s.temperature for s in settings]
        self.greedy = torch.tensor([t == 0 for t in temperature])
        self.all_greedy, self.any_greedy = all(t == 0 for t in temperature), any(t == 0 for t in temperature)
        self.divisor = torch.tensor([[t if t else 1.0] for t in temperature])  # greedy rows: any positive value
        nucleus = [i for i, s in enumerate(settings) if s.top_p < 1 and s.temperature]
        self.nucleus = torch.tensor(nucleus, dtype=torch.long) if nucleus else None
        self.top_p = torch.tensor([[settings[i].top_p] for i in nucleus])
        self.spans = _spans([g if t else None for g, t in zip(generators, temperature)])
        biased = [(i, token, bias) for i, s in enumerate(settings) for token, bias in s.logit_bias]
        self.bias = None
        if biased:
            rows, tokens, biases = zip(*biased)
            self.bias = (torch.tensor(rows), torch.tensor(tokens)), torch.tensor(biases)

    @classmethod
    def for_request(cls, sampling: Sampling, generator: torch.Generator, vocab: int) -> RowSampling:
        """The rows of a new request's `n` choices, none sampled yet."""
        penalized = sampling.frequency_penalty != 0 or sampling.presence_penalty != 0
        return cls([sampling] * sampling.n, [generator] * sampling.n,
                   torch.zeros(sampling.n, vocab) if penalized else None)

    @classmethod
    def empty(cls) -> RowSampling:
        return cls([], [], None)

    def __len__(self) -> int:
        return len(self.settings)

    def join(self, other: RowSampling, vocab: int) -> RowSampling:
        """These rows, then `other`'s."""
        counts = None
        if self.counts is not None or other.counts is not None:
            counts = torch.cat([rows.counts if rows.counts is not None else torch.zeros(len(rows), vocab)
                                for rows in (self, other)])
        return RowSampling(self.settings + other.settings, self.generators + other.generators, counts)

    def take(self, index: list[int]) -> RowSampling:
        counts = self.counts[index] if self.counts is not None else None
        return RowSampling([self.settings[i] for i in index], [self.generators[i] for i in index], counts)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] logits -> [rows] token ids (counted for the penalties)."""
        logits = logits.float()
        if self.bias is not None:
            logits = logits.index_put(*self.bias, accumulate=True)
        if self.counts is not None:
            logits = logits - self.counts * self.frequency - (self.counts > 0) * self.presence
        if self.all_greedy:
            tokens = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / self.divisor, dim=-1)
            if self.nucleus is not None:
                probs[self.nucleus] = nucleus(probs[self.nucleus], self.top_p)
            race = torch.ones_like(probs)
            for generator, start, end in self.spans:
                race[start:end].exponential_(generator=generator)
            tokens = probs.div_(race).argmax(-1)
            if self.any_greedy:
                tokens = torch.where(self.greedy, logits.argmax(-1), tokens)
        if self.counts is not None:
            self.counts[torch.arange(len(tokens)), tokens] += 1
        return tokens


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set of most likely tokens whose mass reaches the row's
    `top_p` ([rows, 1]); the most likely token always stays."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))


def _spans(generators: list[torch.Generator | None]) -> list[tuple[torch.Generator, int, int]]:
    """(generator, first row, end row) of each run of consecutive rows drawing from one generator."""
    spans: list[tuple[torch.Generator, int, int]] = []
    for i, generator in enumerate(generators):
        if generator is None:
            continue
        if spans and spans[-1][0] is generator and spans[-1][2] == i:
            spans[-1] = (generator, spans[-1][1], i + 1)
        else:
            spans.append((generator, i, i + 1))
    return spans
