"""One optimizer step over a worker's micro-batches, and one evaluation pass, shared by SFT and DPO.

The objective (SFT or DPO) says how to collate rows, what the loss is a mean over (its `loss_denominator`:
supervised tokens for SFT, pairs for DPO) and the loss itself. `train_step` does the rest: one all-reduce
of the denominator so the loss is a mean over the *global* batch (every worker, every micro-batch: uneven
token counts weigh right), backward and step through the DeepSpeed engine, and the metrics reduced across
workers once per step.

Every tensor handed to a collective lives on the engine's device: NCCL (Ray Train's process group on GPU)
refuses CPU tensors, gloo (on CPU) takes them. Nothing here needs Ray, so a benchmark drives it in one
process with world size 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from ray_zephyr.config import Recipe
from ray_zephyr.data.collate import collate_preference, collate_sft
from ray_zephyr.train.losses import (
    MetricSums,
    dpo_loss,
    dpo_metrics,
    sequence_logps,
    sft_loss,
    sft_score_mask,
)
from ray_zephyr.train.padding_free import model_inputs, pack


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


class DPOObjective:
    """DPO over [chosen; rejected] batches, a mean over the global batch's pairs. The reference log-probs come
    from the rows (precomputed) or from a resident frozen engine."""

    def __init__(self, recipe: Recipe, pad_token_id: int, reference=None):
        self.pad_token_id, self.data, self.dpo, self.reference = pad_token_id, recipe.data, recipe.dpo, reference
        self.padding_free = recipe.train.padding_free

    def collate(self, rows: dict) -> dict[str, torch.Tensor]:
        batch = collate_preference(rows, self.pad_token_id, self.data.max_length, self.data.truncation_mode)
        batch["lengths"] = batch["attention_mask"].sum(1)
        batch["completion_lengths"] = batch["completion_mask"].sum(1)
        return pack(batch, "completion_mask") if self.padding_free else batch

    def samples(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["lengths"]) // 2

    def loss_denominator(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pairs."""
        return torch.tensor(self.samples(batch), device=batch["input_ids"].device)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            stats = self.reference(**model_inputs(batch, "completion_mask"), token_stats=False)
            return sequence_logps(stats, len(batch["lengths"]))

    def loss(self, model, batch: dict[str, torch.Tensor], denominator: torch.Tensor, metrics: MetricSums,
             token_stats: bool = True) -> torch.Tensor:
        stats = model(**model_inputs(batch, "completion_mask"), token_stats=token_stats)
        chosen, rejected = sequence_logps(stats, len(batch["lengths"]))
        ref_chosen, ref_rejected = self.reference_logps(batch)
        beta = self.dpo.beta
        per_pair = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, batch["completion_lengths"], beta,
                            self.dpo.loss_type, self.dpo.label_smoothing)
        if self.dpo.rpo_alpha:
            # RPO (Pang et al., 2024): DPO alone can lower the likelihood of the chosen answers too; a mean token
            # NLL on each chosen answer keeps them likely (TRL: loss_type [sigmoid, sft] with loss weights).
            chosen_tokens, _ = stats.per_row(torch.ones_like(stats.logps), len(batch["lengths"])).chunk(2)
            nll = -chosen / chosen_tokens.clamp(min=1)
            metrics.add("nll_loss", nll.detach().sum(), len(nll))
            per_pair = per_pair + self.dpo.rpo_alpha * nll
        dpo_metrics(metrics, stats, per_pair, chosen, rejected, ref_chosen, ref_rejected, beta)
        return per_pair.sum() / denominator


def make_objective(recipe: Recipe, pad_token_id: int, reference=None):
    if recipe.stage == "sft":
        return SFTObjective(recipe, pad_token_id)
    return DPOObjective(recipe, pad_token_id, reference)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the workers, in place (a no-op without torch.distributed or with one worker)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def collated(objective, micro_batches: Iterable[dict], pin_memory: bool) -> Iterator[tuple[list[int], dict]]:
    """(sample ids, collated batch) of each micro-batch of rows; pinned for a fast asynchronous copy to a GPU.
    The loop runs this one step ahead in a background thread, so the host-side work of the next step overlaps
    the device work of this one."""
    for rows in micro_batches:
        batch = objective.collate(rows)
        if pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        yield [int(i) for i in rows["sample_id"]], batch


def _on_device(engine, batch: dict) -> dict[str, torch.Tensor]:
    return {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}


def train_step(engine, objective, micro_batches: list[dict], token_stats: bool = True) -> dict[str, float]:
    """One optimizer step over this worker's share (its collated micro-batches, `objective.collate`) of a global
    batch; `token_stats` adds entropy, token accuracy and mean logits (full-vocabulary work: only on the steps
    that are logged)."""
    start = time.perf_counter()
    engine.train()
    batches = [_on_device(engine, batch) for batch in micro_batches]
    denominator = all_reduce_sum(torch.stack([objective.loss_denominator(b) for b in batches]).sum().double())
    denominator = denominator.clamp(min=1)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    lr = engine.get_lr()[0]
    metrics = MetricSums(engine.device)
    for i, batch in enumerate(batches):
        # The number of micro-batches may vary from step to step (`train.micro_batch_tokens`): say where the
        # optimizer step is rather than let DeepSpeed count to its configured accumulation.
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        loss = objective.loss(engine, batch, denominator, metrics, token_stats)
        # The loss is already this worker's share of the global mean; DeepSpeed averages gradients over
        # workers, so scale by the world size and skip its own division by the accumulation steps.
        engine.backward(loss * world_size, scale_wrt_gas=False)
        engine.step()
    return _finish(objective, metrics, batches, start) | {"lr": lr, "grad_norm": float(engine.get_global_grad_norm()),
                                                          "micro_batches": len(batches)}


@torch.no_grad()
def evaluate(engine, objective, micro_batches: Iterable[dict]) -> dict[str, float]:
    """Metrics over the given collated micro-batches (every worker must pass the same number), prefixed `eval_`."""
    start = time.perf_counter()
    engine.eval()
    metrics, batches = MetricSums(engine.device), []
    for batch in micro_batches:
        batch = _on_device(engine, batch)
        objective.loss(engine, batch, objective.loss_denominator(batch), metrics)
        batches.append(batch)
    return {f"eval_{k}": v for k, v in _finish(objective, metrics, batches, start).items()}


def _finish(objective, metrics: MetricSums, batches: list[dict], start: float) -> dict[str, float]:
    """Reduce the metrics over workers (one collective) and add the token and sample counts and rates."""
    metrics.count("step_tokens", sum(b["lengths"].sum() for b in batches))
    metrics.count("step_samples", sum(objective.samples(b) for b in batches))
    out = metrics.means(all_reduce_sum)
    elapsed = max(time.perf_counter() - start, 1e-9)
    return out | {"tokens/s": out["step_tokens"] / elapsed, "samples/s": out["step_samples"] / elapsed}
