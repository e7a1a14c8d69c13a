"""The Ray Data pipeline: sources -> mixture selection -> validation -> tokenization -> seeded shuffle.

One dataset per side (train, eval). Mixture weights and the train/eval hold-out are decided per row by a
hash of (seed, source, row), so selection is deterministic and needs no global pass; the shuffle sorts by
another such hash, so the order depends only on the seed and the data, not on how blocks were read.
Every row's fate (kept or the drop reason) is recorded in a small actor, so a run can report
rows read = rows kept + rows dropped by reason.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import ray

from ray_zephyr.config import Recipe, SourceConfig
from ray_zephyr.data.sources import read_chunk, source_chunks
from ray_zephyr.data.tokenize import TOKENIZERS
from ray_zephyr.data.validate import EXAMPLE_BUILDERS, Invalid, parse
from ray_zephyr.errors import DataError, DataStallError

KEPT = "kept"
COLUMNS = {
    "sft": {"input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32())},
    "dpo": {"prompt_ids": pa.list_(pa.int32()), "chosen_ids": pa.list_(pa.int32()), "rejected_ids": pa.list_(pa.int32())},
}


def row_hash(seed: int, salt: str, sources: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A uniform float in [0, 1) per (source, row), stable across runs and machines."""
    out = np.empty(len(rows), dtype=np.float64)
    for i, (source, row) in enumerate(zip(sources, rows)):
        digest = hashlib.blake2b(f"{seed}/{salt}/{source}/{row}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2**64
    return out


@ray.remote(num_cpus=0)
class DataStats:
    """The fate of every row, one byte per (dataset, source, row): re-reading a row (next epoch) overwrites it
    instead of counting it twice, and 10M rows cost 10 MB."""

    def __init__(self) -> None:
        self.fates: dict[tuple[str, str], np.ndarray] = {}
        self.codes: dict[str, int] = {}  # fate name -> code (0 means the row was not seen)

    def record(self, dataset: str, fates: list[tuple[str, int, str]]) -> None:
        for source, row, fate in fates:
            code = self.codes.setdefault(fate, len(self.codes) + 1)
            seen = self.fates.setdefault((dataset, source), np.zeros(1024, dtype=np.uint8))
            if row >= len(seen):
                grown = np.zeros(max(row + 1, 2 * len(seen)), dtype=np.uint8)
                grown[: len(seen)] = seen
                seen = self.fates[(dataset, source)] = grown
            seen[row] = code

    def counts(self) -> dict[str, dict[str, Counter]]:
        names = {code: name for name, code in self.codes.items()}
        out: dict[str, dict[str, Counter]] = defaultdict(dict)
        for (dataset, source), seen in self.fates.items():
            codes, n = np.unique(seen[seen > 0], return_counts=True)
            out[dataset][source] = Counter({names[int(c)]: int(k) for c, k in zip(codes, n)})
        return dict(out)


@dataclass
class DataReport:
    """rows read = rows kept + rows dropped by reason, per dataset (and per source)."""

    counts: dict[str, dict[str, Counter]] = field(default_factory=dict)

    def totals(self, dataset: str) -> Counter:
        return sum(self.counts.get(dataset, {}).values(), Counter())

    def read(self, dataset: str) -> int:
        return sum(self.totals(dataset).values())

    def kept(self, dataset: str) -> int:
        return self.totals(dataset)[KEPT]

    def dropped(self, dataset: str) -> dict[str, int]:
        return {k: v for k, v in sorted(self.totals(dataset).items()) if k != KEPT}

    def lines(self) -> list[str]:
        out = []
        for dataset in self.counts:
            dropped = self.dropped(dataset)
            reasons = ", ".join(f"{k} {v}" for k, v in dropped.items())
            out.append(
                f"{dataset}: read {self.read(dataset)} rows = kept {self.kept(dataset)} + dropped {sum(dropped.values())}"
                + (f" ({reasons})" if reasons else "")
            )
        return out


class Prepare:
    """Ray Data UDF: select (mixture weight, hold-out), validate, tokenize; record each row's fate."""

    def __init__(self, recipe: Recipe, tokenizer, dataset: str, weights: dict[str, float], holdout: str | None, stats):
        self.stage, self.data, self.seed = recipe.stage, recipe.data, recipe.seed
        self.tokenizer, self.dataset, self.weights, self.holdout, self.stats = tokenizer, dataset, weights, holdout, stats
        self.build_example, self.tokenize = EXAMPLE_BUILDERS[self.stage], TOKENIZERS[self.stage]

    def _selected(self, sources: np.ndarray, rows: np.ndarray) -> np.ndarray:
        weight = np.array([self.weights[s] for s in sources])
        keep = row_hash(self.seed, "mixture", sources, rows) < weight
        if self.holdout:
            in_eval = row_hash(self.seed, "holdout", sources, rows) < self.data.eval_fraction
            keep &= in_eval if self.holdout == "eval" else ~in_eval
        return keep

    def _reject(self, fates: list, source: str, row: int, invalid: Invalid) -> None:
        if self.data.on_bad_row == "fail":
            raise DataError(f"{source} row {row}: {invalid.reason}: {invalid} (data.on_bad_row=skip drops such rows)")
        fates.append((source, row, invalid.reason))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        keep = self._selected(batch["source"], batch["row"])
        fates: list[tuple[str, int, str]] = []
        candidates = []
        for source, row, raw in zip(batch["source"][keep], batch["row"][keep], batch["raw"][keep]):
            try:
                candidates.append((str(source), int(row), self.build_example(parse(raw))))
            except Invalid as invalid:
                self._reject(fates, str(source), int(row), invalid)
        results = self.tokenize(
            self.tokenizer, [c[2] for c in candidates], self.data.max_length, self.data.truncation_mode,
            self.data.add_empty_system,
        ) if candidates else []
        columns: dict[str, list] = {name: [] for name in (*COLUMNS[self.stage], "source", "row")}
        for (source, row, _), result in zip(candidates, results, strict=True):
            if isinstance(result, Invalid):
                self._reject(fates, source, row, result)
                continue
            fates.append((source, row, KEPT))
            for name, value in result.items():
                columns[name].append(value)
            columns["source"].append(source)
            columns["row"].append(row)
        ray.get(self.stats.record.remote(self.dataset, fates))
        schema = {**COLUMNS[self.stage], "source": pa.string(), "row": pa.int64()}
        return pa.table({name: pa.array(values, type=schema[name]) for name, values in columns.items()})


def add_shuffle_key(batch: pa.Table, seed: int) -> pa.Table:
    keys = row_hash(seed, "shuffle", np.asarray(batch["source"]), np.asarray(batch["row"]))
    return batch.append_column("shuffle_key", pa.array(keys))


@dataclass
class PreparedData:
    """Tokenized train (and eval) datasets, streamed into Ray Train with `get_dataset_shard`."""

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    stats: ray.actor.ActorHandle

    def report(self) -> DataReport:
        """Counts of what has been read so far: call after the data was consumed."""
        return DataReport(ray.get(self.stats.counts.remote()))

    def as_dict(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train} | ({"eval": self.eval} if self.eval is not None else {})


def resolve_sources(recipe: Recipe, sources: list[SourceConfig]) -> tuple[list, dict[str, float]]:
    """Read chunks of all sources, and each chunk label's mixture weight."""
    chunks, weights = [], {}
    for source in sources:
        for chunk in source_chunks(source, recipe.stage, recipe.seed):
            chunks.append(chunk)
            weights[chunk.label] = source.weight
    return chunks, weights


def _build(recipe: Recipe, tokenizer, resolved: tuple[list, dict[str, float]], dataset: str, holdout: str | None,
           stats, shuffle: bool) -> ray.data.Dataset:
    chunks, weights = resolved
    ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks))
    # Reading is I/O-bound: a fractional CPU keeps it a separate operator from Prepare (no fusion), so one
    # large file is read by one task while its blocks are validated and tokenized in parallel.
    ds = ds.map_batches(read_chunk, batch_size=1, num_cpus=0.25)
    ds = ds.map_batches(
        Prepare,
        fn_constructor_kwargs=dict(recipe=recipe, tokenizer=tokenizer, dataset=dataset, weights=weights,
                                   holdout=holdout, stats=stats),
        batch_size=256,
        batch_format="numpy",
    )
    if shuffle:
        ds = ds.map_batches(add_shuffle_key, fn_kwargs={"seed": recipe.seed}, batch_format="pyarrow", batch_size=None)
        ds = ds.sort("shuffle_key").drop_columns(["shuffle_key"])
    return ds


def build_datasets(recipe: Recipe, tokenizer) -> PreparedData:
    """Train and eval datasets for the recipe (eval from data.eval sources, else a data.eval_fraction hold-out).

    All files are resolved and checked here, before any Ray work, so bad inputs fail fast.
    """
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.raise_original_map_exception = True  # a bad row's DataError reaches the user as itself
    data = recipe.data
    train_sources = resolve_sources(recipe, data.train)
    eval_sources = resolve_sources(recipe, data.eval) if data.eval else None
    stats = DataStats.remote()
    holdout = "train" if data.eval_fraction > 0 and not data.eval else None
    train = _build(recipe, tokenizer, train_sources, "train", holdout, stats, shuffle=data.shuffle)
    if eval_sources:
        evaluation = _build(recipe, tokenizer, eval_sources, "eval", None, stats, shuffle=False)
    elif holdout:
        evaluation = _build(recipe, tokenizer, train_sources, "eval", "eval", stats, shuffle=False)
    else:
        evaluation = None
    return PreparedData(train, evaluation, stats)


_DONE = object()


def iter_with_stall_timeout(iterable: Iterable, timeout_s: float, what: str) -> Iterator:
    """Yield from `iterable`, but raise DataStallError if no item arrives for `timeout_s` seconds.

    A Ray Data pipeline whose tasks cannot be scheduled waits forever without a word; this turns that into
    an error that says what to change.
    """
    items: queue.Queue = queue.Queue(maxsize=4)

    def produce() -> None:
        try:
            for item in iterable:
                items.put(item)
            items.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            items.put(exc)

    threading.Thread(target=produce, daemon=True, name=f"stall-watch:{what}").start()
    while True:
        try:
            item = items.get(timeout=timeout_s)
        except queue.Empty:
            free = ray.available_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0
            total = ray.cluster_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0
            raise DataStallError(
                f"{what}: no data for {timeout_s:.0f}s, the pipeline is stalled ({free:g} of {total:g} logical CPUs "
                "free for Ray Data tasks); give Ray more CPUs (ray start --num-cpus) or use fewer train workers"
            ) from None
        if item is _DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
