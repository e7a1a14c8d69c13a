"""Batched sampling (ray_zephyr/serving/sampling.py) on fixed logits: the same tokens as the engine's
per-request sampler before it batched (`torch.multinomial` with each request's own generator), whatever
the batch around a request; top_p keeps the tokens transformers' `TopPLogitsWarper` keeps."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from ray_zephyr.serving.engine import Sampling
from ray_zephyr.serving.sampling import RowSampling, nucleus

REQUESTS = [  # every setting, alone and mixed; n > 1 with choices leaving at different steps
    Sampling(max_tokens=8, temperature=1.0),
    Sampling(max_tokens=8, temperature=0.7, top_p=0.9, n=3),
    Sampling(max_tokens=8, temperature=0.0, logit_bias=((5, 2.0),)),
    Sampling(max_tokens=8, temperature=1.3, n=2, frequency_penalty=0.5, presence_penalty=0.3),
    Sampling(max_tokens=8, temperature=1.0, top_p=0.5, logit_bias=((5, 5.0), (9, -100.0))),
    Sampling(max_tokens=8, temperature=0.0, n=2, frequency_penalty=1.0),
    Sampling(max_tokens=8, temperature=2.0, top_p=0.3, n=2, presence_penalty=-2.0, logit_bias=((3, 1.5),)),
]


def reference_sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator, counts: torch.Tensor):
    """The engine's sampler before batching: one request's rows at a time, with its own generator."""
    logits = logits.float()
    if s.logit_bias:
        ids, biases = zip(*s.logit_bias)
        logits = logits + torch.zeros(logits.shape[-1]).index_put((torch.tensor(ids),), torch.tensor(biases))
    if s.frequency_penalty or s.presence_penalty:
        logits = logits - counts * s.frequency_penalty - (counts > 0) * s.presence_penalty
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def fixed_logits(request: int, choice: int, step: int, vocab: int) -> torch.Tensor:
    """The logits choice `choice` of request `request` sees at its `step`, wherever it sits in a batch."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(10_000 * request + 100 * choice + step)) * 3


def length(request: int, choice: int) -> int:
    return 2 + (request + 3 * choice) % 5


def batched(order: list[int], vocab: int) -> dict[tuple[int, int], list[int]]:
    """Requests join one per step in `order`; each choice leaves after `length` tokens."""
    rows, live, tokens, waiting = RowSampling.empty(), [], {}, list(order)
    while waiting or live:
        if waiting:
            r = waiting.pop(0)
            rows = rows.join(RowSampling.for_request(REQUESTS[r], torch.Generator().manual_seed(r), vocab), vocab)
            live += [(r, c) for c in range(REQUESTS[r].n)]
            tokens.update({(r, c): [] for c in range(REQUESTS[r].n)})
        logits = torch.stack([fixed_logits(r, c, len(tokens[r, c]), vocab) for r, c in live])
        for row, token in zip(live, rows.sample(logits).tolist()):
            tokens[row].append(token)
        keep = [i for i, (r, c) in enumerate(live) if len(tokens[r, c]) < length(r, c)]
        rows, live = rows.take(keep), [live[i] for i in keep]
    return tokens


def alone(r: int, vocab: int) -> dict[tuple[int, int], list[int]]:
    s, generator = REQUESTS[r], torch.Generator().manual_seed(r)
    counts, tokens = torch.zeros(s.n, vocab), {(r, c): [] for c in range(s.n)}
    while live := [c for c in range(s.n) if len(tokens[r, c]) < length(r, c)]:
        logits = torch.stack([fixed_logits(r, c, len(tokens[r, c]), vocab) for c in live])
        for c, token in zip(live, reference_sample(logits, s, generator, counts[live]).tolist()):
            tokens[r, c].append(token)
            counts[c, token] += 1
    return tokens


@pytest.mark.parametrize("vocab", [515, 32_000])
def test_batched_sampling_equals_the_per_request_sampler(vocab):
    expected = {row: t for r in range(len(REQUESTS)) for row, t in alone(r, vocab).items()}
    assert batched(list(range(len(REQUESTS))), vocab) == expected
    assert batched(list(range(len(REQUESTS)))[::-1], vocab) == expected  # other neighbours, other rows
    assert batched([1, 3], vocab) == {row: t for row, t in expected.items() if row[0] in (1, 3)}


def test_nucleus_keeps_what_transformers_keeps():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 4
    top_p = torch.linspace(0.05, 0.99, 64)[:, None]
    kept = nucleus(torch.softmax(logits, -1), top_p) > 0
    expected = torch.stack([TopPLogitsWarper(float(p))(None, row[None])[0] > -float("inf")
                            for p, row in zip(top_p, logits)])
    assert torch.equal(kept, expected)


def test_sampling_settings():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])

    def draws(**settings) -> list[int]:
        s = Sampling(max_tokens=1, **settings)
        return [RowSampling.for_request(s, torch.Generator().manual_seed(i), 4).sample(logits).item()
                for i in range(100)]

    assert set(draws(temperature=0.0)) == {1}  # greedy
    assert set(draws(temperature=1.0, top_p=0.01)) == {1}  # the nucleus holds only the top token
    assert set(draws(temperature=1.0, top_p=0.9)) == {1, 2}  # the top two hold > 90% of the mass
    assert set(draws(temperature=5.0)) == {0, 1, 2, 3}  # hot: every token
    assert draws(temperature=1.0, top_p=0.9) == draws(temperature=1.0, top_p=0.9)  # seeded
    assert set(draws(temperature=0.0, logit_bias=((3, 100.0),))) == {3}
