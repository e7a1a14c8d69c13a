"""The Ray Data pipeline: sources -> exact mixture selection -> validation -> tokenization -> seeded shuffle.

One dataset per side (train, eval). Each source contributes exactly round(weight x rows) rows, those with the
smallest hash of (seed, row key); the threshold is found once from the row indices the counting pass gave, so
each task decides alone, with no global pass over the data. The train/eval hold-out and the shuffle use other
such hashes. A row's key is where it sits inside its source (source index, path inside it, row index), never
where the files are, so a moved folder or a relative path gives the same rows in the same order.
Each task reads one chunk, validates the Python values (no JSON round trip), tokenizes, and sends the fate of
every row of the chunk (kept or the drop reason) to a small actor in one call, so a run can report
rows read = rows kept + rows dropped by reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from ray_zephyr.config import Recipe, SourceConfig
from ray_zephyr.data.formats import to_examples
from ray_zephyr.data.sources import Chunk, ResolvedSource, read_chunk, resolve_source
from ray_zephyr.data.tokenize import TOKENIZERS, bos_choice
from ray_zephyr.data.validate import Invalid
from ray_zephyr.errors import DataError
from ray_zephyr.runtime import local_cores

KEPT = "kept"
COLUMNS = {
    "sft": {"input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32())},
    "dpo": {"prompt_ids": pa.list_(pa.int32()), "chosen_ids": pa.list_(pa.int32()), "rejected_ids": pa.list_(pa.int32())},
    "kto": {"prompt_ids": pa.list_(pa.int32()), "completion_ids": pa.list_(pa.int32()), "label": pa.bool_()},
}


def row_hash(seed: int, salt: str, key: str, rows: np.ndarray) -> np.ndarray:
    """A uniform float in [0, 1) per row index of the chunk/file `key`, stable across runs and machines.

    splitmix64 over (a blake2b of seed/salt/key) + row: vectorized, so a million rows hash in milliseconds."""
    base = np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}/{salt}/{key}".encode(), digest_size=8).digest(), "little"))
    with np.errstate(over="ignore"):
        x = np.asarray(rows, dtype=np.uint64) + base
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def mixture_threshold(source: ResolvedSource, weight: float, seed: int) -> float:
    """The hash at or below which exactly round(weight x rows) of the source's rows fall."""
    n = source.count
    k = round(weight * n)
    if k >= n:
        return 1.0
    if k == 0:
        return -1.0
    hashes = np.concatenate([row_hash(seed, "mixture", key, rows) for key, rows in source.rows.items()])
    return float(np.partition(hashes, k - 1)[k - 1])


@ray.remote(num_cpus=0)
class DataStats:
    """The fate of every row, one byte per (dataset, source, row): re-reading a row (next epoch) overwrites it
    instead of counting it twice, and 10M rows cost 10 MB. Tasks send one call per chunk read."""

    def __init__(self) -> None:
        self.fates: dict[tuple[str, str], np.ndarray] = {}
        self.codes: dict[str, int] = {}  # fate name -> code (0 means the row was not seen)

    def record(self, dataset: str, source: str, rows: np.ndarray, fates: list[str]) -> None:
        if not len(rows):
            return
        codes = np.array([self.codes.setdefault(f, len(self.codes) + 1) for f in fates], dtype=np.uint8)
        seen = self.fates.setdefault((dataset, source), np.zeros(1024, dtype=np.uint8))
        top = int(rows.max())
        if top >= len(seen):
            grown = np.zeros(max(top + 1, 2 * len(seen)), dtype=np.uint8)
            grown[: len(seen)] = seen
            seen = self.fates[(dataset, source)] = grown
        seen[rows] = codes

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


class TokenizeChunks:
    """Ray Data UDF over chunk indices: read, select (mixture, hold-out), validate, tokenize; record row fates.

    An instance, so Ray Data runs it as tasks: they run in worker processes that stay warm from one dataset and
    run to the next, where an actor pool starts processes of its own each time (~4 s per dataset on 2 cores,
    for any size). Its state is cheap to carry: the tokenizer and the chunk list."""

    def __init__(self, recipe: Recipe, tokenizer, dataset: str, chunks: list[Chunk], thresholds: dict[str, float],
                 holdout: str | None, shuffle: bool, stats):
        self.kind, self.data, self.seed = recipe.data_kind, recipe.data, recipe.seed
        self.tokenizer, self.dataset, self.chunks, self.thresholds = tokenizer, dataset, chunks, thresholds
        self.holdout, self.shuffle, self.stats = holdout, shuffle, stats
        self.tokenize = TOKENIZERS[self.kind]
        self.options = {"add_bos": bos_choice(tokenizer, self.data.add_bos)}
        if self.kind != "sft":
            self.options["max_prompt_length"] = self.data.max_prompt_length
        self.schema = pa.schema({**COLUMNS[self.kind], "source": pa.string(), "row": pa.int64()}
                                | ({"shuffle_key": pa.float64()} if shuffle else {}))

    def _selector(self, chunk: Chunk):
        def select(rows: np.ndarray) -> np.ndarray:
            keep = row_hash(self.seed, "mixture", chunk.key, rows) <= self.thresholds[chunk.key]
            if self.holdout:
                in_eval = row_hash(self.seed, "holdout", chunk.key, rows) < self.data.eval_fraction
                keep &= in_eval if self.holdout == "eval" else ~in_eval
            return keep

        return select

    def _reason(self, chunk: Chunk, row: int, invalid: Invalid) -> str:
        if self.data.on_bad_row == "fail":
            raise DataError(f"{chunk.label} row {row}: {invalid.reason}: {invalid} (data.on_bad_row=skip drops such rows)")
        return invalid.reason

    def _tokenize_rows(self, chunk: Chunk, rows: np.ndarray, values: list, fates: list[str]) -> pa.Table:
        """Tokenized rows of one read batch as a table; appends each row's fate to `fates`, in row order. A row
        given to KTO as a pair is two examples (sharing its prompt, so kept or dropped together)."""
        columns, rows = dict(chunk.columns), rows.tolist()
        fate: list[str] = [KEPT] * len(rows)
        candidates, examples = [], []
        for i, value in enumerate(values):
            try:
                if isinstance(value, Invalid):
                    raise value
                converted = to_examples(value, self.kind, chunk.format, columns)
                examples += converted
                candidates += [i] * len(converted)
            except Invalid as invalid:
                fate[i] = self._reason(chunk, rows[i], invalid)
        if self.kind == "kto" and chunk.format == "preference":
            # the desirable halves, then the undesirable ones (as TRL's unpair_preference_dataset orders them): KTO's
            # KL term pairs a prompt with its neighbour's completion, which must not answer the same prompt
            examples, candidates = examples[0::2] + examples[1::2], candidates[0::2] + candidates[1::2]
        results = self.tokenize(self.tokenizer, examples, self.data.max_length, self.data.truncation_mode,
                                self.data.add_empty_system, **self.options) if examples else []
        out: dict[str, list] = {name: [] for name in self.schema.names}
        for i, result in zip(candidates, results, strict=True):
            if isinstance(result, Invalid):
                fate[i] = self._reason(chunk, rows[i], result)
                continue
            for name, value in result.items():
                out[name].append(value)
            out["row"].append(rows[i])
        fates += fate
        out["source"] = [chunk.label] * len(out["row"])
        if self.shuffle:
            out["shuffle_key"] = row_hash(self.seed, "shuffle", chunk.key, np.asarray(out["row"], dtype=np.int64))
        return pa.table({name: pa.array(out[name], type=self.schema.field(name).type) for name in self.schema.names})

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for index in batch["chunk"]:
            chunk = self.chunks[int(index)]
            fate_rows, fates = [], []
            for rows, values in read_chunk(chunk, self._selector(chunk)):
                yield self._tokenize_rows(chunk, rows, values, fates)
                fate_rows.append(rows)
            ray.get(self.stats.record.remote(self.dataset, chunk.label, np.concatenate(fate_rows or [[]]), fates))


@dataclass
class TokenizedData:
    """Tokenized train (and eval) datasets; the training driver writes each to a row file (`train.rows`)."""

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    stats: ray.actor.ActorHandle

    def report(self) -> DataReport:
        """Counts of what has been read so far: call after the data was consumed."""
        return DataReport(ray.get(self.stats.counts.remote()))

    def as_dict(self) -> dict[str, ray.data.Dataset]:
        return {"train": self.train} | ({"eval": self.eval} if self.eval is not None else {})


def resolve_sources(recipe: Recipe, sources: list[SourceConfig]) -> tuple[list[Chunk], dict[str, float]]:
    """Read chunks of all sources, and the mixture threshold of each file (by chunk key)."""
    chunks, thresholds = [], {}
    for position, source in enumerate(sources):
        resolved = resolve_source(source, recipe.data_kind, recipe.seed, position)
        chunks += resolved.chunks
        threshold = mixture_threshold(resolved, source.weight, recipe.seed)
        thresholds |= {key: threshold for key in resolved.rows}
    return chunks, thresholds


def _build(recipe: Recipe, tokenizer, resolved: tuple[list[Chunk], dict[str, float]], dataset: str,
           holdout: str | None, stats, shuffle: bool) -> ray.data.Dataset:
    chunks, thresholds = resolved
    cores = local_cores()
    ds = ray.data.from_items([{"chunk": i} for i in range(len(chunks))], override_num_blocks=len(chunks))
    ds = ds.map_batches(
        TokenizeChunks(recipe, tokenizer, dataset, chunks, thresholds, holdout, shuffle, stats),
        batch_size=1,
        batch_format="numpy",
        # on a cluster: as many tasks as Ray schedules
        compute=ray.data.TaskPoolStrategy(size=max(1, min(cores, len(chunks)))) if cores else None,
    )
    if shuffle:
        ds = ds.sort("shuffle_key").drop_columns(["shuffle_key"])
    return ds


def build_datasets(recipe: Recipe, tokenizer) -> TokenizedData:
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
    return TokenizedData(train, evaluation, stats)
