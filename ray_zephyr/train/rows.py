"""The numbered training rows, written once per run, and each worker's rows of each step.

Before training, the driver streams the prepared dataset (tokens; reference log-probs for DPO) in the
pipeline's seeded order into one Arrow IPC file per split, `<output_dir>/data/<split>/rows.arrow`, numbering
the rows 0..N-1 (`sample_id`). A worker copies that folder to its node once (nothing to copy on local or
shared storage), memory-maps it and reads only its own rows, by number: data delivery costs each worker
O(its own rows) per epoch, where a scan of the whole dataset by every worker costs O(N) each
(`bench/bench_data_order.py` measures both).

The order, derived by every worker with no coordination:
- epoch e trains on the samples in the order of a permutation of 0..N-1 seeded by (seed, e) (with
  data.shuffle off, the pipeline's order);
- only the first `usable` positions are trained on, a whole number of global batches of G = B x W x A rows
  (the tail that cannot fill a global batch is left out of that epoch; a different tail each epoch when
  shuffling);
- global step s takes positions [s*G, (s+1)*G); with `train.group_by_length` these G rows are ordered longest
  first (by `num_tokens`), so each micro-batch holds rows of similar length (less padding; with packing, the
  W micro-batches of each round carry similar token counts); micro-batch m = p // B goes to worker m % W.

What a global step trains on depends on (seed, N, G) only, not on how G is split into workers and
accumulation steps; a checkpoint after step s records (epoch, step), and a resumed worker continues at
position (s+1)*G of that epoch, seeing exactly the micro-batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_zephyr import storage

ROWS_FILE = "rows.arrow"


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

    def order(self, epoch: int) -> np.ndarray:
        """order[p] = the sample trained at position p of `epoch`."""
        if not self.shuffle:
            return np.arange(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def rank_sample_ids(self, epoch: int, rank: int, start_step: int = 0, lengths: np.ndarray | None = None) -> np.ndarray:
        """Worker `rank`'s samples of `epoch` from global step `start_step` on, in training order; given the rows'
        `lengths`, each global batch is ordered longest first (its set of rows stays the same)."""
        usable = self.steps_per_epoch * self.global_batch
        order = self.order(epoch)[:usable]
        if lengths is not None:
            steps = order.reshape(-1, self.global_batch)
            longest_first = np.argsort(-lengths[steps], axis=1, kind="stable")
            order = np.take_along_axis(steps, longest_first, axis=1).ravel()
        positions = np.arange(start_step * self.global_batch, usable)
        return order[positions[(positions // self.micro_batch) % self.world_size == rank]]


def eval_layout(rows: int, micro_batch: int, world_size: int) -> Layout:
    """Evaluation: the pipeline's order, as many whole rounds of W micro-batches as fit (every worker must run
    the same number of forwards under ZeRO-3)."""
    return Layout(rows, micro_batch, world_size, accumulation=1, seed=0, shuffle=False)


def _plain_columns(batch: pa.Table) -> pa.Table:
    """Ray Data's tensor extension columns (what a numpy batch of token arrays becomes) as plain Arrow lists, so
    the file reads back anywhere without Ray's extension types and `take` stays a cheap list gather."""
    for i, field in enumerate(batch.schema):
        if isinstance(field.type, pa.ExtensionType):
            values = batch.column(i).combine_chunks().to_numpy()
            batch = batch.set_column(i, field.name, pa.array([np.asarray(v).ravel() for v in values]))
    return batch


def _num_tokens(batch: pa.Table) -> pa.Array:
    """Tokens of a row: the sum of its token-id lists (`input_ids`; or `prompt_ids`, `chosen_ids`, `rejected_ids`)."""
    counts = [pc.list_value_length(batch.column(name)) for name in batch.column_names if name.endswith("_ids")]
    total = counts[0]
    for count in counts[1:]:
        total = pc.add(total, count)
    return total


def write_rows(batches: Iterator[pa.Table | pa.RecordBatch], folder: str) -> int:
    """Write the (ordered) batches as `folder/rows.arrow` with `sample_id` and `num_tokens` columns; returns the
    row count."""
    fs, where = storage.filesystem(folder)
    fs.create_dir(where, recursive=True)
    rows, writer, schema = 0, None, None
    with fs.open_output_stream(f"{where}/{ROWS_FILE}") as sink:
        for batch in batches:
            batch = _plain_columns(batch)
            batch = batch.append_column("sample_id", pa.array(np.arange(rows, rows + batch.num_rows)))
            batch = batch.append_column("num_tokens", _num_tokens(batch))
            if writer is None:
                schema = batch.schema
                writer = pa.ipc.new_file(sink, schema)
            writer.write(batch.cast(schema))
            rows += batch.num_rows
        if writer is not None:
            writer.close()
    return rows


class RowFile:
    """A worker's random access to the numbered rows: memory-mapped, so reading a row touches only its pages."""

    def __init__(self, folder: str):
        local = Path(storage.local_copy(folder)) / ROWS_FILE
        self.table = pa.ipc.open_file(pa.memory_map(str(local))).read_all()
        self.lengths = self.table.column("num_tokens").to_numpy()

    def micro_batches(self, sample_ids: np.ndarray, micro_batch: int) -> Iterator[dict[str, np.ndarray]]:
        """The rows `sample_ids`, B at a time, as numpy columns (lists of tokens as arrays)."""
        for start in range(0, len(sample_ids), micro_batch):
            chunk = self.table.take(pa.array(sample_ids[start : start + micro_batch]))
            yield {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
