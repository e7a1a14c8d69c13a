"""One optimizer step over a worker's micro-batches, shared by SFT and DPO, independent of Ray.

The objective (SFT or DPO) says how to collate rows, what the loss is normalised by, and the loss itself.
`Stepper` does the rest: one all-reduce of the normaliser so the loss is a mean over the *global* batch
(every worker, every micro-batch: uneven token counts weigh right), backward and step through the
DeepSpeed engine, and metrics reduced across workers. It needs torch.distributed and a DeepSpeed engine,
nothing else, so a benchmark drives it in one process with world size 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ray_zephyr.config import Recipe
from ray_zephyr.data.collate import collate_preference, collate_sft
from ray_zephyr.train.losses import MetricSums, dpo_loss, dpo_metrics, sequence_logps, sft_loss, sft_score_mask


class SFTObjective:
    """Next-token loss on the supervised (assistant) tokens, a mean over the global batch's tokens."""

    def __init__(self, recipe: Recipe, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def collate(self, rows: dict) -> dict[str, torch.Tensor]:
        batch = collate_sft(rows, self.pad_token_id)
        batch["score_mask"] = sft_score_mask(batch.pop("labels"))
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: scored tokens (each predicted from the previous one)."""
        return int(batch["score_mask"][:, 1:].sum())

    def samples(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def loss(self, model, batch: dict[str, torch.Tensor], total_units: int, metrics: MetricSums) -> torch.Tensor:
        stats = model(batch["input_ids"], batch["attention_mask"], batch["score_mask"])
        return sft_loss(stats, total_units, metrics)


class DPOObjective:
    """DPO over [chosen; rejected] batches, a mean over the global batch's pairs. The reference log-probs come
    from the rows (precomputed) or from a resident frozen engine."""

    def __init__(self, recipe: Recipe, pad_token_id: int, reference=None):
        self.pad_token_id, self.data, self.dpo, self.reference = pad_token_id, recipe.data, recipe.dpo, reference

    def collate(self, rows: dict) -> dict[str, torch.Tensor]:
        return collate_preference(rows, self.pad_token_id, self.data.max_length, self.data.truncation_mode)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    samples = units

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad():
            stats = self.reference(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            return sequence_logps(stats, batch["input_ids"].shape[0])

    def loss(self, model, batch: dict[str, torch.Tensor], total_units: int, metrics: MetricSums) -> torch.Tensor:
        stats = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        chosen, rejected = sequence_logps(stats, batch["input_ids"].shape[0])
        ref_chosen, ref_rejected = self.reference_logps(batch)
        beta = self.dpo.beta
        per_pair = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, batch["completion_mask"], beta,
                            self.dpo.loss_type, self.dpo.label_smoothing)
        dpo_metrics(metrics, stats, per_pair, chosen, rejected, ref_chosen, ref_rejected, beta)
        return per_pair.sum() / total_units


def make_objective(recipe: Recipe, pad_token_id: int, reference=None):
    if recipe.stage == "sft":
        return SFTObjective(recipe, pad_token_id)
    return DPOObjective(recipe, pad_token_id, reference)


def _all_reduce_sum(value: float) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()
    return value


class Stepper:
    """Runs optimizer steps and evaluations of an objective on a DeepSpeed engine."""

    def __init__(self, engine, objective):
        self.engine, self.objective = engine, objective
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over this worker's share (A micro-batches of rows) of a global batch."""
        start = time.perf_counter()
        self.engine.train()
        batches = [self._to_device(self.objective.collate(rows)) for rows in micro_batches]
        total = _all_reduce_sum(sum(self.objective.units(b) for b in batches))
        lr = self.engine.get_lr()[0]
        metrics = MetricSums()
        for batch in batches:
            loss = self.objective.loss(self.engine, batch, total, metrics)
            # The loss is already this worker's share of the global mean; DeepSpeed averages gradients over
            # workers, so scale by the world size and skip its own division by the accumulation steps.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
        return self._finish(metrics, batches, start) | {"lr": lr, "grad_norm": float(self.engine.get_global_grad_norm())}

    @torch.no_grad()
    def evaluate(self, micro_batches: Iterable[dict]) -> dict[str, float]:
        """Metrics over the given micro-batches (every worker must pass the same number), prefixed `eval_`."""
        start = time.perf_counter()
        self.engine.eval()
        metrics, batches = MetricSums(), []
        for rows in micro_batches:
            batch = self._to_device(self.objective.collate(rows))
            self.objective.loss(self.engine, batch, self.objective.units(batch), metrics)
            batches.append(batch)
        return {f"eval_{k}": v for k, v in self._finish(metrics, batches, start).items()}

    def _finish(self, metrics: MetricSums, batches: list[dict], start: float) -> dict[str, float]:
        """Reduce the metrics over workers and add the token and sample counts and rates."""
        metrics.count("step_tokens", sum(int(b["attention_mask"].sum()) for b in batches))
        metrics.count("step_samples", sum(self.objective.samples(b) for b in batches))
        out = metrics.reduce().means()
        elapsed = max(time.perf_counter() - start, 1e-9)
        return out | {"tokens/s": out["step_tokens"] / elapsed, "samples/s": out["step_samples"] / elapsed}
