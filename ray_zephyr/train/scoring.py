"""Scoring tokens: log-probabilities (and token statistics) of chosen positions under a causal LM.

`TokenScorer` wraps a causal LM so that one forward returns statistics only at the scored positions
(assistant tokens for SFT, completion tokens for DPO): the LM head runs on those hidden states alone, so
no `(batch, seq, vocab)` logits are built and padding and prompt tokens cost nothing in the head; and it runs
on them in chunks (`ChunkedLogps`), so not even the scored tokens' fp32 logits exist whole, forward or
backward. The whole computation happens inside the wrapper's forward, so DeepSpeed ZeRO-3's module hooks
gather the backbone as for a plain HF forward; the head's weight, read directly, is gathered explicitly:
in the forward and again in the backward (`_gathered`), and an untied trained head (Mistral's) from the
backward's start at the scorer until its gradient is accumulated (`HeadGather`). It takes padded
batches (`attention_mask`) or padding-free ones (`train.padding_free`: every row in one sequence, `position_ids`
restarting per row, `row_index` saying which row a token is in; see `padding_free.py`). The token statistics
(entropy, top-1, mean logit: full-vocabulary work) are computed only when asked (logging steps, evaluation),
from the same chunks, without gradients; the reference pass asks only for log-probs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenStats:
    """Per scored token (flattened over the batch): which row it belongs to, and its statistics."""

    row: torch.Tensor  # [n] index of the sequence in the batch
    logps: torch.Tensor  # [n] log-probability of the token (with grad)
    entropy: torch.Tensor | None = None  # [n] entropy of the next-token distribution (no grad)
    is_top1: torch.Tensor | None = None  # [n] the token is the argmax
    mean_logits: torch.Tensor | None = None  # [n] mean logit over the vocabulary (no grad)

    def per_row(self, values: torch.Tensor, rows: int) -> torch.Tensor:
        """Sum `values` (one per token) per sequence."""
        return values.new_zeros(rows).index_add(0, self.row, values)

    def select(self, keep: torch.Tensor) -> TokenStats:
        """The statistics of the tokens where `keep` (one bool per token) is true."""
        return TokenStats(*(None if v is None else v[keep] for v in (self.row, self.logps, self.entropy, self.is_top1,
                                                                      self.mean_logits)))


SCORE_CHUNK = 1024  # scored tokens whose fp32 logits ([chunk, vocab]) exist at once


class TokenScorer(nn.Module):
    """A causal LM whose forward scores the tokens where `score_mask` is 1 (each predicted from the one before)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        self.head_gather = HeadGather()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, score_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
                token_stats: bool = True) -> TokenStats:
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        mask = score_mask[:, 1:].bool()
        states = hidden.last_hidden_state[:, :-1][mask]
        targets = input_ids[:, 1:][mask]
        head = self.lm.get_output_embeddings()
        logps, entropy, is_top1, mean_logits = ChunkedLogps.apply(states, head.weight, head.bias, targets,
                                                                  self.softcap, token_stats)
        if logps.requires_grad and head.weight is not self.lm.get_input_embeddings().weight:
            params = [p for p in (head.weight, head.bias) if p is not None]
            logps.register_hook(lambda _: self.head_gather.open(params))  # as the backward reaches the head
        row = row_index[:, 1:][mask] if row_index is not None else mask.nonzero()[:, 0]
        return TokenStats(row=row, logps=logps, entropy=entropy, is_top1=is_top1, mean_logits=mean_logits)


class HeadGather:
    """Under DeepSpeed ZeRO-3, keeps an untied, trained LM head (Mistral's, so zephyr-7b's) gathered from the
    moment the backward reaches the scorer until autograd has accumulated the head's gradient. The scorer reads
    the weight directly, so the head module's own gather hooks never run, and autograd accumulating a full-shape
    gradient into a partitioned (empty) parameter fails: gathering only inside `ChunkedLogps.backward` ends too
    early. A gradient hook on the log-probs opens DeepSpeed's `GatheredParameters`; a post-accumulate-grad hook
    on each gathered parameter closes it once all have their gradient, after DeepSpeed's own reduction hook
    (registered earlier, so run first) has taken it. A no-op without ZeRO-3, or for a frozen head (LoRA), whose
    backward needs the weight only inside `ChunkedLogps` (`_gathered`). A tied head is accumulated with the
    embeddings, whose module hooks gather it (tested on several workers)."""

    def __init__(self) -> None:
        self.context = None
        self.pending: set[int] = set()  # ids of gathered parameters whose gradient is still to come
        self.hooked: set[int] = set()

    def open(self, params: list[nn.Parameter]) -> None:
        if self.context is not None:
            return
        partitioned = _partitioned([p for p in params if p.requires_grad])
        if not partitioned:
            return
        import deepspeed

        self.context = deepspeed.zero.GatheredParameters(partitioned)
        self.context.__enter__()
        self.pending = {id(p) for p in partitioned}
        for p in partitioned:
            if id(p) not in self.hooked:
                p.register_post_accumulate_grad_hook(self._accumulated)
                self.hooked.add(id(p))

    def _accumulated(self, param: nn.Parameter) -> None:
        self.pending.discard(id(param))
        if self.context is not None and not self.pending:
            context, self.context = self.context, None
            context.__exit__(None, None, None)


def _gathered(*params: torch.Tensor | None):
    """Under DeepSpeed ZeRO-3, gather the partitioned `params` for the duration of the block (a no-op otherwise,
    or when they are already gathered, as a head tied to the embeddings can be). The scorer reads the LM head's
    weight directly instead of calling the head module, so ZeRO-3's module hooks do not gather it. (TRL's
    `maybe_gather_lm_head_ctx` does the same for its chunked kernel; TRL is not a runtime dependency here.)"""
    partitioned = _partitioned(list({id(p): p for p in params if p is not None}.values()))
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def _partitioned(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ZeRO-3 parameters among `params` that are partitioned now (not gathered); none without ZeRO-3."""
    zero3 = [p for p in params if hasattr(p, "ds_status")]
    if not zero3:
        return []
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in zero3 if p.ds_status != ZeroParamStatus.AVAILABLE]


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of a chunk of hidden states, and tanh(raw / softcap) when the model soft-caps (for the backward)."""
    logits = F.linear(hidden, weight, bias).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


class ChunkedLogps(torch.autograd.Function):
    """log p(target) of each hidden state under the LM head, `SCORE_CHUNK` tokens at a time, so the fp32
    `[tokens, vocab]` logits never exist whole: the forward keeps one log-sum-exp per token, the backward
    recomputes each chunk's logits and turns them into the gradient (softmax - one-hot, times the incoming
    gradient). The token statistics (entropy, top-1, mean logit; no gradient) come from the same chunks when
    asked. The algorithm of TRL's `trl.kernels.ChunkedLogProbFunction`, written out here because TRL (with
    `datasets` and `accelerate` behind it) is not a runtime dependency; tests check equality with that kernel
    and with full-vocabulary cross-entropy, values and gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, with_stats):
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        stats = [hidden.new_empty(n if with_stats else 0, dtype=dtype)
                 for dtype in (torch.float32, torch.bool, torch.float32)]  # entropy, is_top1, mean_logits
        with _gathered(weight, bias):
            for i in range(0, n, SCORE_CHUNK):
                logits, _ = _chunk_logits(hidden[i : i + SCORE_CHUNK], weight, bias, softcap)
                target = targets[i : i + SCORE_CHUNK, None]
                lse[i : i + SCORE_CHUNK] = logits.logsumexp(-1)
                logps[i : i + SCORE_CHUNK] = logits.gather(1, target)[:, 0] - lse[i : i + SCORE_CHUNK]
                if with_stats:
                    log_dist = logits - lse[i : i + SCORE_CHUNK, None]
                    stats[0][i : i + SCORE_CHUNK] = -(log_dist.exp() * log_dist).sum(-1)
                    stats[1][i : i + SCORE_CHUNK] = logits.argmax(-1) == target[:, 0]
                    stats[2][i : i + SCORE_CHUNK] = logits.mean(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap = softcap
        if not with_stats:
            return logps, None, None, None
        ctx.mark_non_differentiable(*stats)
        return logps, *stats

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        with _gathered(weight, bias):
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
            for i in range(0, hidden.shape[0], SCORE_CHUNK):
                h = hidden[i : i + SCORE_CHUNK]
                logits, capped = _chunk_logits(h, weight, bias, ctx.softcap)
                grad = (logits - lse[i : i + SCORE_CHUNK, None]).exp_().neg_()  # d log p(target) / d logits ...
                grad.scatter_add_(1, targets[i : i + SCORE_CHUNK, None], grad.new_ones(len(h), 1))  # ... + one-hot
                grad.mul_(grad_logps[i : i + SCORE_CHUNK, None].float())
                if capped is not None:
                    grad.mul_(1 - capped * capped)
                grad = grad.to(h.dtype)
                if needs_hidden:
                    grad_hidden[i : i + SCORE_CHUNK] = grad @ weight
                if needs_weight:
                    grad_weight += (grad.t() @ h).float()
                if needs_bias:
                    grad_bias += grad.float().sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def sequence_logps(stats: TokenStats, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of a [chosen; rejected] batch, split into (chosen, rejected)."""
    return stats.per_row(stats.logps, rows).chunk(2)
