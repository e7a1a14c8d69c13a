"""Losses and metrics for dSFT and dDPO, numerically the same as TRL 1.16's trainers.

`TokenScorer` wraps a causal LM so that one forward returns statistics only at the scored positions
(assistant tokens for SFT, completion tokens for DPO): the LM head runs on those hidden states alone, so
no `(batch, seq, vocab)` logits are built and padding and prompt tokens cost nothing in the head. The
whole computation happens inside the wrapper's forward, so DeepSpeed ZeRO-3's module hooks gather and
release the LM head (tied to the embeddings or not) as they do for a plain HF forward. It takes padded
batches (`attention_mask`) or padding-free ones (`train.packing`: every row in one sequence, `position_ids`
restarting per row, `row_index` saying which row a token is in; see `packing.py`). The token statistics
(entropy, top-1, mean logit: full-vocabulary work) are computed only when asked (logging steps, evaluation),
in chunks, without gradients; the reference pass asks only for log-probs.

Metric names follow TRL (`rewards/chosen`, `logps/chosen`, `mean_token_accuracy`, ...). Metrics are
kept as sums plus counts (`MetricSums`) so they can be all-reduced across workers and accumulated
over micro-batches, then divided once: the mean over the global batch, whatever the shard sizes.
"""

from __future__ import annotations

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


STATS_CHUNK = 1024  # tokens per chunk of full-vocabulary statistics


class TokenScorer(nn.Module):
    """A causal LM whose forward scores the tokens where `score_mask` is 1 (each predicted from the one before)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, score_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
                token_stats: bool = True) -> TokenStats:
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        mask = score_mask[:, 1:].bool()
        states = hidden.last_hidden_state[:, :-1][mask]
        targets = input_ids[:, 1:][mask]
        logits = self.lm.get_output_embeddings()(states).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logps = -F.cross_entropy(logits, targets, reduction="none")
        row = row_index[:, 1:][mask] if row_index is not None else mask.nonzero()[:, 0]
        stats = TokenStats(row=row, logps=logps)
        if token_stats:
            with torch.no_grad():
                parts = [_token_stats(logits[i : i + STATS_CHUNK], targets[i : i + STATS_CHUNK])
                         for i in range(0, len(targets), STATS_CHUNK)] or [_token_stats(logits, targets)]
                stats.entropy, stats.is_top1, stats.mean_logits = (torch.cat(p) for p in zip(*parts, strict=True))
        return stats


def _token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_dist = logits.log_softmax(-1)
    return -(log_dist.exp() * log_dist).sum(-1), logits.argmax(-1) == targets, logits.mean(-1)


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
