"""Losses and metrics for dSFT and dDPO, numerically the same as TRL 1.16's trainers.

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

Metric names follow TRL (`rewards/chosen`, `logps/chosen`, `mean_token_accuracy`, ...). Metrics are
kept as sums plus counts (`MetricSums`) so they can be all-reduced across workers and accumulated
over micro-batches, then divided once: the mean over the global batch, whatever the shard sizes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


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
        trained = [p for p in params if p.requires_grad and hasattr(p, "ds_status")]
        if self.context is not None or not trained:
            return
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        partitioned = [p for p in trained if p.ds_status != ZeroParamStatus.AVAILABLE]
        if not partitioned:
            return
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
    partitioned = {id(p): p for p in params if p is not None and hasattr(p, "ds_status")}
    if not partitioned:
        return nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = [p for p in partitioned.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
    return deepspeed.zero.GatheredParameters(partitioned) if partitioned else nullcontext()


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


class MetricSums:
    """Named means kept as (sum, count) and plain totals, as tensors on `device` (no host sync per micro-batch);
    `means` sums all of them across workers in one collective on one tensor, then reads them once."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.totals: dict[str, torch.Tensor] = {}

    def _tensor(self, value: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(value, device=self.device).detach().to(torch.float64)

    def add(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float) -> None:
        s = self.sums.setdefault(name, [self._tensor(0.0), self._tensor(0.0)])
        s[0] = s[0] + self._tensor(total)
        s[1] = s[1] + self._tensor(count)

    def count(self, name: str, value: torch.Tensor | float) -> None:
        self.totals[name] = self.totals.get(name, self._tensor(0.0)) + self._tensor(value)

    def means(self, all_reduce_sum=None) -> dict[str, float]:
        """The means and totals; summed over workers first by `all_reduce_sum` (in place, on a tensor on
        `device`) when given. One collective and one read to the host, however many metrics."""
        means, totals = sorted(self.sums), sorted(self.totals)
        parts = [t for n in means for t in self.sums[n]] + [self.totals[n] for n in totals]
        if not parts:
            return {}
        stacked = torch.stack(parts)
        flat = (all_reduce_sum(stacked) if all_reduce_sum else stacked).tolist()
        out = {n: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else 0.0 for i, n in enumerate(means)}
        return out | dict(zip(totals, flat[2 * len(means) :], strict=True))


def sft_loss(stats: TokenStats, token_total: torch.Tensor | float, metrics: MetricSums) -> torch.Tensor:
    """Summed token NLL divided by the supervised-token count of the whole global batch (all workers, all
    micro-batches), so every supervised token weighs the same however tokens fall across shards."""
    loss = -stats.logps.sum() / torch.as_tensor(token_total, device=stats.logps.device).clamp(min=1)
    n = stats.logps.numel()
    metrics.add("loss", -stats.logps.detach().sum(), n)
    if stats.entropy is not None:
        metrics.add("entropy", stats.entropy.sum(), n)
        metrics.add("mean_token_accuracy", stats.is_top1.sum(), n)
    return loss


def sft_score_mask(labels: torch.Tensor) -> torch.Tensor:
    """Supervised positions of a labels tensor (-100 elsewhere), as a score mask for `TokenScorer`."""
    return (labels != IGNORE_INDEX).long()


def sequence_logps(stats: TokenStats, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of a [chosen; rejected] batch, split into (chosen, rejected)."""
    return stats.per_row(stats.logps, rows).chunk(2)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    completion_lengths: torch.Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss as TRL 1.16 computes it; `completion_lengths` are the [chosen; rejected] rows' completion
    token counts (TRL's `completion_mask.sum(dim=1)`; used by IPO).

    label_smoothing applies to sigmoid as conservative DPO (cDPO, as TRL < 1.0 did); 0 gives TRL 1.16's sigmoid.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        # TRL normalises IPO's log-ratios by the completion length (confirmed with the IPO authors).
        chosen_len, rejected_len = completion_lengths.clamp(min=1.0).chunk(2)
        ipo_delta = chosen_logratios / chosen_len - rejected_logratios / rejected_len
        return (ipo_delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def dpo_metrics(
    metrics: MetricSums,
    stats: TokenStats,
    per_pair_loss: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> None:
    """Add TRL's DPO metrics for one micro-batch (pair metrics per pair, token metrics per token)."""
    pairs = chosen_logps.numel()
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    metrics.add("loss", per_pair_loss.detach().sum(), pairs)
    metrics.add("rewards/chosen", chosen_rewards.sum(), pairs)
    metrics.add("rewards/rejected", rejected_rewards.sum(), pairs)
    metrics.add("rewards/accuracies", (chosen_rewards > rejected_rewards).float().sum(), pairs)
    metrics.add("rewards/margins", (chosen_rewards - rejected_rewards).sum(), pairs)
    metrics.add("logps/chosen", chosen_logps.detach().sum(), pairs)
    metrics.add("logps/rejected", rejected_logps.detach().sum(), pairs)
    if stats.entropy is None:
        return
    is_chosen = stats.row < pairs
    metrics.add("entropy", stats.entropy.sum(), stats.row.numel())
    metrics.add("logits/chosen", stats.mean_logits[is_chosen].sum(), is_chosen.sum())
    metrics.add("logits/rejected", stats.mean_logits[~is_chosen].sum(), (~is_chosen).sum())
    metrics.add("mean_token_accuracy", (stats.is_top1 & is_chosen).sum(), is_chosen.sum())
