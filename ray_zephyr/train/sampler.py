"""Deterministic data order per worker, so a resumed run neither repeats nor skips a sample.

Before training, the driver materializes the prepared dataset once (tokens, plus reference log-probs for
DPO) and numbers its rows `sample_id` 0..N-1 in the pipeline's (seeded) order. From there every worker
derives its own rows with no coordination:

- epoch e orders the samples by a permutation of 0..N-1 seeded by (seed, e): sample i sits at position
  p = perm_e[i] (with data.shuffle off, p = i, the pipeline's order);
- only the first `usable` positions are trained on, a whole number of global batches (the tail that
  cannot fill a global batch is left out of that epoch; a different tail each epoch when shuffling);
- global step s consumes positions [s*G, (s+1)*G); micro-batch m = p // B goes to worker m % W, so each
  worker gets B-row micro-batches, A of them per step, in position order.

A checkpoint after step s records (epoch, step): on resume each worker keeps positions >= s*G of that
epoch and sees exactly the micro-batches it would have seen, with the same model state. The order
depends only on (seed, N, W, B), all fixed for a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray


def number_rows(ds: ray.data.Dataset) -> tuple[ray.data.Dataset, int]:
    """Materialize `ds` with a `sample_id` column (its row number); returns it and the row count."""
    ds = ds.materialize()
    n = ds.count()
    ids = ray.data.range(n).rename_columns({"id": "sample_id"})
    return ds.zip(ids).materialize(), n


@dataclass(frozen=True)
class Layout:
    """How one epoch of N samples is cut into global batches of G = B x W x A rows."""

    rows: int  # N
    micro_batch: int  # B
    world_size: int  # W
    accumulation: int  # A
    seed: int
    shuffle: bool

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def positions(self, sample_ids: np.ndarray, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return sample_ids
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)[sample_ids]

    def rank_rows(self, ds: ray.data.Dataset, epoch: int, rank: int, start_step: int = 0) -> ray.data.Dataset:
        """Worker `rank`'s rows of `epoch` from global step `start_step` on, in training order."""
        usable, start = self.steps_per_epoch * self.global_batch, start_step * self.global_batch

        def select(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            pos = self.positions(batch["sample_id"], epoch)
            keep = (pos >= start) & (pos < usable) & ((pos // self.micro_batch) % self.world_size == rank)
            out = {k: v[keep] for k, v in batch.items()}
            out["position"] = pos[keep]
            return out

        return ds.map_batches(select, batch_format="numpy").sort("position")


def eval_layout(rows: int, micro_batch: int, world_size: int) -> Layout:
    """Evaluation: the pipeline's order, as many whole rounds of W micro-batches as fit (every worker must run
    the same number of forwards under ZeRO-3)."""
    return Layout(rows, micro_batch, world_size, accumulation=1, seed=0, shuffle=False)
