"""The objectives, numerically TRL 1.16's: dSFT; dDPO (sigmoid, IPO, hinge, APO-zero/down, mixtures, cDPO label
smoothing, RPO) as its DPOTrainer; SimPO as its CPOTrainer; ORPO as its ORPOTrainer (the last two reference-free);
KTO and unpaired APO-zero as its KTOTrainer (unpaired rows).

An objective says how to collate rows, what its loss is a mean over (`loss_denominator`: supervised tokens
for SFT, pairs for DPO, pairs and chosen tokens for ORPO) and the loss itself; `step.train_step` does the rest. Metric names follow TRL
(`rewards/chosen`, `logps/chosen`, `mean_token_accuracy`, ...). Metrics are kept as sums plus counts
(`MetricSums`) so they can be all-reduced across workers and accumulated over micro-batches, then divided
once: the mean over the global batch, whatever the shard sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_zephyr.config import Recipe
from ray_zephyr.data.collate import collate_preference, collate_sft, collate_unpaired
from ray_zephyr.train.padding_free import model_inputs, pack
from ray_zephyr.train.scoring import TokenStats, sequence_logps

IGNORE_INDEX = -100


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the workers, in place (a no-op without torch.distributed or with one worker)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class MetricSums:
    """Named means kept as (sum, count) and plain totals, as tensors on `device` (no host sync per micro-batch);
    `means` sums all of them across workers in one collective on one tensor, then reads them once."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.totals: dict[str, torch.Tensor] = {}
        self.differences: dict[str, tuple[str, str]] = {}

    def _tensor(self, value: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(value, device=self.device).detach().to(torch.float64)

    def add(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float) -> None:
        s = self.sums.setdefault(name, [self._tensor(0.0), self._tensor(0.0)])
        s[0] = s[0] + self._tensor(total)
        s[1] = s[1] + self._tensor(count)

    def count(self, name: str, value: torch.Tensor | float) -> None:
        self.totals[name] = self.totals.get(name, self._tensor(0.0)) + self._tensor(value)

    def difference(self, name: str, first: str, second: str) -> None:
        """`name` = mean `first` - mean `second`, where both have a count (TRL's KTO `rewards/margins`)."""
        self.differences[name] = (first, second)

    def means(self, all_reduce_sum=None) -> dict[str, float]:
        """The means and totals; summed over workers first by `all_reduce_sum` (in place, on a tensor on
        `device`) when given. One collective and one read to the host, however many metrics."""
        means, totals = sorted(self.sums), sorted(self.totals)
        parts = [t for n in means for t in self.sums[n]] + [self.totals[n] for n in totals]
        if not parts:
            return {}
        stacked = torch.stack(parts)
        flat = (all_reduce_sum(stacked) if all_reduce_sum else stacked).tolist()
        counts = {n: flat[2 * i + 1] for i, n in enumerate(means)}
        out = {n: flat[2 * i] / counts[n] if counts[n] else 0.0 for i, n in enumerate(means)}
        out |= {name: out[a] - out[b] for name, (a, b) in self.differences.items() if counts.get(a) and counts.get(b)}
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
    if loss_type == "apo_zero":  # APO (D'Oosterlinck et al., 2024), eq. 7: chosen up, rejected down
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":  # eq. 8: both down, the rejected more (chosen answers worse than the model's own)
        return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss (Meng et al., 2024) as TRL's CPOTrainer computes it: the margin of the length-normalised
    log-probs over gamma/beta, no reference model."""
    logits = chosen_avg_logps - rejected_avg_logps - gamma / beta
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branching at -ln 2, as TRL does)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's (Hong et al., 2024) log odds ratio of chosen over rejected, from length-normalised log-probs."""
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


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


class SFTObjective:
    """Next-token loss on the supervised (assistant) tokens, a mean over the global batch's tokens."""

    def __init__(self, recipe: Recipe, pad_token_id: int):
        self.pad_token_id, self.padding_free = pad_token_id, recipe.train.padding_free

    def collate(self, rows: dict) -> dict[str, torch.Tensor]:
        batch = collate_sft(rows, self.pad_token_id)
        batch["score_mask"] = sft_score_mask(batch.pop("labels"))
        batch["lengths"] = batch["attention_mask"].sum(1)
        return pack(batch, "score_mask") if self.padding_free else batch

    def loss_denominator(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scored tokens (each predicted from the previous one)."""
        return batch["score_mask"][:, 1:].sum()

    def samples(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["lengths"])

    def loss(self, model, batch: dict[str, torch.Tensor], denominator: torch.Tensor, metrics: MetricSums,
             token_stats: bool = True) -> torch.Tensor:
        stats = model(**model_inputs(batch, "score_mask"), token_stats=token_stats)
        return sft_loss(stats, denominator, metrics)


def orpo_score_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A [chosen; rejected] batch whose `completion_mask` becomes ORPO's `score_mask`: 2 on completion tokens, 1 on
    the chosen rows' prompt tokens (scored by its NLL term only)."""
    batch = dict(batch)
    completion = batch.pop("completion_mask")
    prompt = batch["attention_mask"] - completion
    prompt[len(prompt) // 2 :] = 0
    return batch | {"score_mask": 2 * completion + prompt}


class DPOObjective:
    """A preference objective over [chosen; rejected] batches, a mean over the global batch's pairs: DPO's losses
    (mixed by weight), whose reference log-probs come from the rows (precomputed) or from a resident frozen engine;
    or SimPO, or ORPO (whose NLL term is a mean over the global batch's chosen tokens), which use no reference."""

    def __init__(self, recipe: Recipe, pad_token_id: int, reference=None):
        self.pad_token_id, self.data, self.dpo, self.reference = pad_token_id, recipe.data, recipe.dpo, reference
        self.padding_free = recipe.train.padding_free
        self.kind = "dpo" if self.dpo.uses_reference else self.dpo.losses[0][0]
        # ORPO's NLL term also scores the chosen rows' prompts (TRL's ORPOTrainer, after the ORPO paper's code)
        self.scored = "score_mask" if self.kind == "orpo" else "completion_mask"

    def collate(self, rows: dict) -> dict[str, torch.Tensor]:
        batch = collate_preference(rows, self.pad_token_id, self.data.max_length, self.data.truncation_mode)
        batch["lengths"] = batch["attention_mask"].sum(1)
        batch["completion_lengths"] = batch["completion_mask"].sum(1)
        if self.kind == "orpo":
            batch = orpo_score_mask(batch)
        return pack(batch, self.scored) if self.padding_free else batch

    def samples(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["lengths"]) // 2

    def loss_denominator(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pairs; for ORPO, [pairs, the chosen rows' scored tokens]."""
        pairs = torch.tensor(self.samples(batch), device=batch["input_ids"].device)
        if self.kind != "orpo":
            return pairs
        return torch.stack([pairs, (batch["lengths"][: self.samples(batch)] - 1).sum()])

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            stats = self.reference(**model_inputs(batch, "completion_mask"), token_stats=False)
            return sequence_logps(stats, len(batch["lengths"]))

    def loss(self, model, batch: dict[str, torch.Tensor], denominator: torch.Tensor, metrics: MetricSums,
             token_stats: bool = True) -> torch.Tensor:
        stats = model(**model_inputs(batch, self.scored), token_stats=token_stats)
        rows, beta = len(batch["lengths"]), self.dpo.beta
        if self.kind == "orpo":
            return self._orpo_loss(stats, batch, rows, denominator, metrics)
        chosen, rejected = sequence_logps(stats, rows)
        if self.kind == "simpo":
            return self._simpo_loss(stats, chosen, rejected, rows, denominator, metrics)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        per_pair = sum(weight * dpo_loss(chosen, rejected, ref_chosen, ref_rejected, batch["completion_lengths"],
                                         beta, loss_type, self.dpo.label_smoothing)
                       for loss_type, weight in self.dpo.losses)
        if self.dpo.rpo_alpha:
            # RPO (Pang et al., 2024): DPO alone can lower the likelihood of the chosen answers too; a mean token
            # NLL on each chosen answer keeps them likely (TRL: loss_type [sigmoid, sft] with loss weights).
            chosen_tokens, _ = stats.per_row(torch.ones_like(stats.logps), rows).chunk(2)
            nll = -chosen / chosen_tokens.clamp(min=1)
            metrics.add("nll_loss", nll.detach().sum(), len(nll))
            per_pair = per_pair + self.dpo.rpo_alpha * nll
        dpo_metrics(metrics, stats, per_pair, chosen, rejected, ref_chosen, ref_rejected, beta)
        return per_pair.sum() / denominator

    # SimPO and ORPO score the length-normalised log-probs (TRL's `average_log_prob`) and log them as `logps/*`, and
    # beta times them as `rewards/*`, as TRL's CPO and ORPO trainers do.

    def _simpo_loss(self, stats: TokenStats, chosen: torch.Tensor, rejected: torch.Tensor, rows: int,
                    denominator: torch.Tensor, metrics: MetricSums) -> torch.Tensor:
        chosen_tokens, rejected_tokens = stats.per_row(torch.ones_like(stats.logps), rows).clamp(min=1).chunk(2)
        chosen_avg, rejected_avg = chosen / chosen_tokens, rejected / rejected_tokens
        per_pair = simpo_loss(chosen_avg, rejected_avg, self.dpo.beta, self.dpo.simpo_gamma, self.dpo.label_smoothing)
        if self.dpo.rpo_alpha:  # CPO's NLL term (TRL's cpo_alpha), here a mean over each chosen answer's tokens
            metrics.add("nll_loss", -chosen_avg.detach().sum(), rows // 2)
            per_pair = per_pair - self.dpo.rpo_alpha * chosen_avg
        zero = torch.zeros_like(chosen_avg)
        dpo_metrics(metrics, stats, per_pair, chosen_avg, rejected_avg, zero, zero, self.dpo.beta)
        return per_pair.sum() / denominator

    def _orpo_loss(self, stats: TokenStats, batch: dict[str, torch.Tensor], rows: int, denominator: torch.Tensor,
                   metrics: MetricSums) -> torch.Tensor:
        """The chosen rows' token NLL (a mean over the global batch's chosen tokens, as SFT's) minus beta times the
        mean log-sigmoid of the log odds ratio (a mean over its pairs)."""
        pairs, pair_total, token_total = rows // 2, denominator[0], denominator[1].clamp(min=1)
        scored = batch["score_mask"][:, 1:]
        completion = stats.select(scored[scored.bool()] == 2)
        chosen_nll = -stats.logps[stats.row < pairs].sum()
        chosen, rejected = sequence_logps(completion, rows)
        chosen_tokens, rejected_tokens = completion.per_row(torch.ones_like(completion.logps), rows).clamp(min=1).chunk(2)
        chosen_avg, rejected_avg = chosen / chosen_tokens, rejected / rejected_tokens
        log_odds = orpo_log_odds(chosen_avg, rejected_avg)
        ratio = F.logsigmoid(log_odds)
        loss = chosen_nll / token_total - self.dpo.beta * ratio.sum() / pair_total
        metrics.add("nll_loss", chosen_nll.detach(), (stats.row < pairs).sum())
        metrics.add("log_odds_ratio", ratio.detach().sum(), pairs)
        metrics.add("log_odds_chosen", log_odds.detach().sum(), pairs)
        # as `loss`, this micro-batch's share of the global loss, weighted so that the mean over workers is the loss
        share = (loss.detach() * pair_total / pairs).expand(pairs)
        zero = torch.zeros_like(chosen_avg)
        dpo_metrics(metrics, completion, share, chosen_avg, rejected_avg, zero, zero, self.dpo.beta)
        return loss


def kto_losses(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float, loss_type: str,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-row KTO loss (Ethayarajh et al., 2024, eq. 7) as TRL 1.16's KTOTrainer computes it, from each row's
    log-ratio to the reference and the (detached) KL estimate; or unpaired APO-zero (no KL term)."""
    if loss_type == "kto":
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * (logratios - kl)),
                             1 - torch.sigmoid(beta * (kl - logratios)))
    elif loss_type == "apo_zero_unpaired":
        losses = torch.where(desirable, 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios))
    else:
        raise ValueError(f"unknown unpaired loss type {loss_type!r}")
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(losses.dtype)
    return weights * losses


def kto_balance(desirable: int, undesirable: int, dpo) -> str:
    """The report line on KTO's two labels, with TRL's advice when the weights do not make up for an imbalance (the
    KTO paper's eq. 8: desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3])."""
    line = (f"kto: {desirable} desirable + {undesirable} undesirable training rows (weights {dpo.desirable_weight:g} "
            f"/ {dpo.undesirable_weight:g})")
    d, u = max(desirable, 1), max(undesirable, 1)
    if d == u:
        return line
    low, high = round(u * dpo.undesirable_weight / d, 2), round(u * dpo.undesirable_weight / d * 1.33, 2)
    u_low, u_high = round(d * dpo.desirable_weight / u / 1.33, 2), round(d * dpo.desirable_weight / u, 2)
    if low <= dpo.desirable_weight <= high or u_low <= dpo.undesirable_weight <= u_high:
        return line
    return (f"{line}; the weights do not balance the labels (KTO paper, eq. 8): set EITHER dpo.desirable_weight in "
            f"[{low}, {high}] OR dpo.undesirable_weight in [{u_low}, {u_high}]")


class KTOObjective:
    """KTO on unpaired rows, a mean over the global batch's rows. Its KL term, TRL's estimate: the policy's and the
    (resident) reference's log-ratio on each prompt paired with another row's completion of the same micro-batch
    (`collate_unpaired`), averaged over the micro-batch and over the workers, clamped at 0, without gradient."""

    def __init__(self, recipe: Recipe, pad_token_id: int, reference):
        if reference is None:
            raise ValueError("KTO needs a resident reference (dpo.reference=resident)")
        self.pad_token_id, self.data, self.dpo, self.reference = pad_token_id, recipe.data, recipe.dpo, reference
        self.padding_free, self.loss_type = recipe.train.padding_free, recipe.dpo.losses[0][0]
        self.kl = self.loss_type == "kto"

    def _finish(self, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        part["lengths"] = part["attention_mask"].sum(1)
        return pack(part, "completion_mask") if self.padding_free else part

    def collate(self, rows: dict) -> dict[str, torch.Tensor]:
        batch = collate_unpaired(rows, self.pad_token_id, self.data.max_length, self.data.truncation_mode, self.kl)
        main = self._finish({k: v for k, v in batch.items() if not k.startswith("KL_")})
        mismatched = self._finish({k[3:]: v for k, v in batch.items() if k.startswith("KL_")}) if self.kl else {}
        return main | {f"KL_{k}": v for k, v in mismatched.items()}

    def samples(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["label"])

    def loss_denominator(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(self.samples(batch), device=batch["input_ids"].device)

    def _logps(self, model, batch: dict[str, torch.Tensor], token_stats: bool) -> tuple[TokenStats, torch.Tensor]:
        stats = model(**model_inputs(batch, "completion_mask"), token_stats=token_stats)
        return stats, stats.per_row(stats.logps, len(batch["lengths"]))

    def _kl(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.kl:
            return torch.zeros((), device=batch["input_ids"].device)
        mismatched = {k[3:]: v for k, v in batch.items() if k.startswith("KL_")}
        with torch.no_grad():
            _, policy = self._logps(model, mismatched, token_stats=False)
            _, reference = self._logps(self.reference, mismatched, token_stats=False)
            kl = all_reduce_sum((policy - reference).mean().double())
            world_size = dist.get_world_size() if dist.is_initialized() else 1
            return (kl / world_size).clamp(min=0).to(policy.dtype)

    def loss(self, model, batch: dict[str, torch.Tensor], denominator: torch.Tensor, metrics: MetricSums,
             token_stats: bool = True) -> torch.Tensor:
        kl = self._kl(model, batch)
        stats, logps = self._logps(model, batch, token_stats)
        with torch.no_grad():
            _, ref_logps = self._logps(self.reference, batch, token_stats=False)
        desirable, beta = batch["label"].bool(), self.dpo.beta
        logratios = logps - ref_logps
        per_row = kto_losses(logratios, desirable, kl, beta, self.loss_type, self.dpo.desirable_weight,
                             self.dpo.undesirable_weight)
        metrics.add("loss", per_row.detach().sum(), len(per_row))
        metrics.add("kl", kl, 1)
        rewards = beta * logratios.detach()
        for name, side in (("chosen", desirable), ("rejected", ~desirable)):
            metrics.add(f"rewards/{name}", rewards[side].sum(), side.sum())
            metrics.add(f"logps/{name}", logps.detach()[side].sum(), side.sum())
            if stats.entropy is not None:
                tokens = side[stats.row]
                metrics.add(f"logits/{name}", stats.mean_logits[tokens].sum(), tokens.sum())
        metrics.difference("rewards/margins", "rewards/chosen", "rewards/rejected")
        if stats.entropy is not None:
            metrics.add("entropy", stats.entropy.sum(), stats.row.numel())
        return per_row.sum() / denominator


def make_objective(recipe: Recipe, pad_token_id: int, reference=None):
    if recipe.stage == "sft":
        return SFTObjective(recipe, pad_token_id)
    if recipe.data_kind == "kto":
        return KTOObjective(recipe, pad_token_id, reference)
    return DPOObjective(recipe, pad_token_id, reference)
