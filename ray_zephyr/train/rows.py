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
  first (by `num_tokens`), so each micro-batch holds rows of similar length (less padding; padding-free, the
  W micro-batches of each round carry similar token counts); micro-batch m = p // B goes to worker m % W;
- with a token budget (`train.micro_batch_tokens`), each worker's B x A rows of a step are cut into runs of at
  most that many tokens instead of A micro-batches of B rows (`split_by_tokens`), as many on every worker
  (ZeRO-3 needs every worker to run the same number of forwards): the fewest that fit the budget on the
  fullest worker; the others halve their largest micro-batches until they have as many.

What a global step trains on depends on (seed, N, G) only, not on how G is split into workers and
accumulation steps; a checkpoint after step s records (epoch, step), and a resumed worker continues at
position (s+1)*G of that epoch, seeing exactly the micro-batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
    micro_batch_tokens: int | None = None  # a token budget per micro-batch instead of B rows

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

    def rank_micro_batches(self, epoch: int, rank: int, start_step: int, lengths: np.ndarray,
                           group_by_length: bool) -> list[list[np.ndarray]]:
        """Worker `rank`'s micro-batches (arrays of sample ids) of each global step of `epoch` from `start_step` on,
        given every row's token count `lengths`."""
        order_by = lengths if group_by_length else None
        if self.micro_batch_tokens is None:
            ids = self.rank_sample_ids(epoch, rank, start_step, order_by)
            return [list(step) for step in ids.reshape(-1, self.accumulation, self.micro_batch)]
        per_rank = [self.rank_sample_ids(epoch, r, start_step, order_by).reshape(-1, self.micro_batch * self.accumulation)
                    for r in range(self.world_size)]
        steps = []
        for step in range(len(per_rank[rank])):
            splits = [split_by_tokens(ids[step], lengths, self.micro_batch_tokens) for ids in per_rank]
            steps.append(split_further(splits[rank], lengths, max(len(s) for s in splits)))
        return steps


def split_by_tokens(ids: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """`ids` cut, in order, into the fewest runs of at most `budget` tokens (a longer row is a run of its own)."""
    runs, start, total = [], 0, 0
    for i, n in enumerate(lengths[ids]):
        if i > start and total + n > budget:
            runs.append(ids[start:i])
            start, total = i, 0
        total += n
    return [*runs, ids[start:]]


def split_further(runs: list[np.ndarray], lengths: np.ndarray, count: int) -> list[np.ndarray]:
    """`runs` with the one holding the most tokens halved until there are `count` (every worker has as many rows
    as the fullest, so there are enough rows)."""
    runs = list(runs)
    while len(runs) < count:
        i = max((i for i, r in enumerate(runs) if len(r) > 1), key=lambda i: lengths[runs[i]].sum())
        half = (len(runs[i]) + 1) // 2
        runs[i : i + 1] = [runs[i][:half], runs[i][half:]]
    return runs


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
    """Tokens the model reads for a row, before truncation: `input_ids` (SFT); a pair's two sequences,
    prompt + chosen and prompt + rejected (DPO); prompt + completion (KTO, whose KL pass reads about as many again)."""
    if "input_ids" in batch.column_names:
        return pc.list_value_length(batch.column("input_ids"))
    if "completion_ids" in batch.column_names:
        return pc.add(*(pc.list_value_length(batch.column(n)) for n in ("prompt_ids", "completion_ids")))
    prompt, chosen, rejected = (pc.list_value_length(batch.column(f"{n}_ids")) for n in ("prompt", "chosen", "rejected"))
    return pc.add(pc.multiply(prompt, 2), pc.add(chosen, rejected))


class RowWriter:
    """Numbered rows into `folder/rows.arrow`, batch by batch, with `sample_id` and `num_tokens` columns (several
    writers can fill the splits of one stream); `close` returns the row count. No batch: an empty file."""

    def __init__(self, folder: str):
        fs, where = storage.filesystem(folder)
        fs.create_dir(where, recursive=True)
        self.sink = fs.open_output_stream(f"{where}/{ROWS_FILE}")
        self.rows, self.writer, self.schema = 0, None, None

    def write(self, batch: pa.Table | pa.RecordBatch) -> None:
        batch = _plain_columns(batch)
        batch = batch.append_column("sample_id", pa.array(np.arange(self.rows, self.rows + batch.num_rows)))
        batch = batch.append_column("num_tokens", _num_tokens(batch))
        if self.writer is None:
            self.schema = batch.schema
            self.writer = pa.ipc.new_file(self.sink, self.schema)
        self.writer.write(batch.cast(self.schema))
        self.rows += batch.num_rows

    def close(self) -> int:
        if self.writer is not None:
            self.writer.close()
        self.sink.close()
        return self.rows


def write_rows(batches: Iterator[pa.Table | pa.RecordBatch], folder: str) -> int:
    """Write the (ordered) batches as `folder/rows.arrow` (see `RowWriter`); returns the row count."""
    writer = RowWriter(folder)
    try:
        for batch in batches:
            writer.write(batch)
    finally:
        rows = writer.close()
    return rows


class RowFile:
    """A worker's random access to the numbered rows: memory-mapped, so reading a row touches only its pages."""

    def __init__(self, folder: str):
        local = Path(storage.local_copy(folder)) / ROWS_FILE
        reader = pa.ipc.open_file(pa.memory_map(str(local)))
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])  # sample id of each batch's first row
        self.lengths = np.concatenate([b.column("num_tokens").to_numpy() for b in self.batches] or [np.zeros(0, int)])

    def take(self, sample_ids: np.ndarray) -> pa.Table:
        """The rows `sample_ids`, in that order, each taken from the record batch that holds it: a `take` on the
        whole file's table would concatenate its chunks first, O(N) per micro-batch (42 ms at 200k rows)."""
        batch_of = np.searchsorted(self.starts, sample_ids, side="right") - 1
        parts, positions = [], []
        for b in np.unique(batch_of):
            picked = np.flatnonzero(batch_of == b)
            parts.append(self.batches[b].take(pa.array(sample_ids[picked] - self.starts[b])))
            positions.append(picked)
        table = pa.Table.from_batches(parts)
        return table.take(pa.array(np.argsort(np.concatenate(positions)))) if len(parts) > 1 else table

    def micro_batches(self, micro_batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The rows of each micro-batch (an array of sample ids), as numpy columns (lists of tokens as arrays)."""
        for sample_ids in micro_batches:
            chunk = self.take(np.asarray(sample_ids))
            yield {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
