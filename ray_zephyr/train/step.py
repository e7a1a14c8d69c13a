"""One optimizer step over a worker's micro-batches, and one evaluation pass, shared by SFT and DPO.

The objective (`objectives.py`: SFT or DPO) says how to collate rows, what the loss is a mean over and the loss
itself. `train_step` does the rest: one all-reduce
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

from ray_zephyr.train.objectives import MetricSums, all_reduce_sum


def collated(objective, micro_batches: Iterable[dict], pin_memory: bool) -> Iterator[tuple[list[int], dict]]:
    """(sample ids, collated batch) of each micro-batch of rows; pinned for a fast asynchronous copy to a GPU.
    The loop runs this in a background thread that keeps up to `prefetch.QUEUE_DEPTH` micro-batches ready, so the
    host-side work of the next micro-batches overlaps the device work of this one."""
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
    denominator = all_reduce_sum(torch.stack([objective.loss_denominator(b) for b in batches]).sum(0).double())
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
def eval_metrics(engine, objective, micro_batches: Iterable[dict]) -> dict[str, float]:
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
