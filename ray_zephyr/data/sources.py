"""Where rows come from: hub datasets, local jsonl/json/parquet files or folders, and the embedded default.

Every source becomes a list of read chunks (a file, a few parquet row groups, or a range of embedded rows);
Ray Data reads the chunks in parallel tasks, each streaming its rows as `{source, row, raw}` where `row` is the
row's index within its file and `raw` its JSON text. Keeping the raw text lets validation name the exact row
and survive rows of any shape; nothing loads a whole dataset into one process.
Files are opened and their first row checked before any Ray work, so an empty, unreadable or wrong-schema
file is a one-line error up front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_zephyr.config import SourceConfig
from ray_zephyr.errors import DataError, UserError

EXTENSIONS = (".jsonl", ".json", ".parquet")
ROWS_PER_BATCH = 512
ROW_GROUPS_PER_CHUNK = 4
EMBEDDED_ROWS_PER_CHUNK = 500
EMBEDDED_DEFAULT_ROWS = {"train": 2000, "test": 200}


@dataclass(frozen=True)
class Chunk:
    """One unit of parallel reading."""

    kind: str  # "jsonl" | "json" | "parquet" | "embedded"
    path: str  # file path / hf:// path / embedded split
    label: str  # how errors name the source
    start: int = 0  # parquet: first row group; embedded: first row
    stop: int = 0  # parquet: row group after the last; embedded: row after the last
    row_offset: int = 0  # parquet: index of the chunk's first row in its file
    stage: str = ""  # embedded: "sft" or "dpo"
    seed: int = 0  # embedded


def _hub_fs():
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def _open(path: str):
    return _hub_fs().open(path, "rb") if path.startswith("hf://") else open(path, "rb")


def source_chunks(source: SourceConfig, stage: str, seed: int) -> list[Chunk]:
    """Resolve a recipe source into read chunks, checking each file's readability and schema first."""
    if source.path == "embedded":
        return _embedded_chunks(source, stage, seed)
    local = Path(source.path).expanduser()
    if local.exists():
        files = _local_files(local, source)
    elif "/" in source.path and not source.path.startswith((".", "/", "~")):
        files = _hub_files(source.path, source.split)
    else:
        raise UserError(f"data source {source.path!r}: no such file or folder (and not a hub dataset id 'owner/name')")
    chunks: list[Chunk] = []
    for path in files:
        check_file(path, stage)
        chunks += _file_chunks(path)
    return chunks


def _embedded_chunks(source: SourceConfig, stage: str, seed: int) -> list[Chunk]:
    if source.split not in EMBEDDED_DEFAULT_ROWS:
        raise UserError(f"embedded data has splits train and test, not {source.split!r}")
    rows = source.rows if source.rows is not None else EMBEDDED_DEFAULT_ROWS[source.split]
    return [
        Chunk("embedded", source.split, f"embedded:{source.split}", start, min(start + EMBEDDED_ROWS_PER_CHUNK, rows),
              stage=stage, seed=seed)
        for start in range(0, rows, EMBEDDED_ROWS_PER_CHUNK)
    ]


def _local_files(path: Path, source: SourceConfig) -> list[str]:
    if path.is_file():
        if not path.name.endswith(EXTENSIONS):
            raise UserError(f"data file {path}: unsupported type; use {', '.join(EXTENSIONS)}")
        return [str(path)]
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(EXTENSIONS))
    if not files:
        raise UserError(f"data folder {path}: no {', '.join(EXTENSIONS)} files in it")
    matching = [f for f in files if Path(f).name.startswith(source.split)]
    if matching:
        return matching
    if "split" in source.model_fields_set:
        names = ", ".join(Path(f).name for f in files[:5])
        raise UserError(f"data folder {path}: no file for split {source.split!r} (file names start with it); found {names}")
    return files


def _hub_files(name: str, split: str) -> list[str]:
    """The split's parquet files on the hub (the layout `datasets` writes: data/<split>-*.parquet)."""
    try:
        fs = _hub_fs()
        files = sorted(fs.glob(f"datasets/{name}/**/{split}-*.parquet"))
        if not files:
            files = sorted(fs.glob(f"datasets/{name}@refs%2Fconvert%2Fparquet/*/{split}/*.parquet"))
    except Exception as exc:  # noqa: BLE001 - offline, auth, not found: all one readable line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"hub dataset {name!r}: cannot list its files ({first})") from None
    if not files:
        raise UserError(f"hub dataset {name!r}: no parquet files for split {split!r}")
    return [f"hf://{f}" for f in files]


def _file_kind(path: str) -> str:
    return "jsonl" if path.endswith(".jsonl") else "json" if path.endswith(".json") else "parquet"


def _file_chunks(path: str) -> list[Chunk]:
    kind = _file_kind(path)
    if kind != "parquet":
        return [Chunk(kind, path, path)]
    import pyarrow.parquet as pq

    with _open(path) as f:
        meta = pq.ParquetFile(f).metadata
    chunks, offset = [], 0
    for start in range(0, meta.num_row_groups, ROW_GROUPS_PER_CHUNK):
        stop = min(start + ROW_GROUPS_PER_CHUNK, meta.num_row_groups)
        chunks.append(Chunk(kind, path, path, start, stop, row_offset=offset))
        offset += sum(meta.row_group(i).num_rows for i in range(start, stop))
    return chunks


REQUIRED_FIELDS = {"sft": ("messages",), "dpo": ("chosen", "rejected")}
SCHEMA_NAMES = {"sft": "UltraChat (messages=[{role, content}, ...])", "dpo": "UltraFeedback (chosen/rejected=[{role, content}, ...])"}


def check_file(path: str, stage: str) -> None:
    """Fail early on an empty, unreadable or wrong-schema file (judged by its first row)."""
    try:
        if not path.startswith("hf://") and os.path.getsize(path) == 0:
            raise UserError(f"data file {path} is empty")
        first = next(_iter_file_rows(Chunk(_file_kind(path), path, path, 0, 1)), None)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - permissions, corrupt parquet, bad encoding
        raise UserError(f"data file {path} cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if first is None:
        raise UserError(f"data file {path} has no rows")
    try:
        row = json.loads(first[1])
    except json.JSONDecodeError:
        return  # a bad first line is a row-level problem, reported by validation
    if not isinstance(row, dict):
        return
    missing = [f for f in REQUIRED_FIELDS[stage] if f not in row]
    if missing:
        hint = " (this looks like ShareGPT: conversations with from/value)" if "conversations" in row else ""
        raise UserError(
            f"data file {path}: wrong schema{hint}; rows need {', '.join(missing)} for the {SCHEMA_NAMES[stage]} "
            f"schema, found fields {', '.join(sorted(row)) or 'none'}"
        )


def _iter_file_rows(chunk: Chunk) -> Iterator[tuple[int, str]]:
    """(row index in file, raw JSON text) for each row of a chunk."""
    if chunk.kind == "jsonl":
        with _open(chunk.path) as f:
            for i, line in enumerate(f):
                text = line.decode("utf-8", errors="replace").strip()
                if text:
                    yield i, text
    elif chunk.kind == "json":
        with _open(chunk.path) as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"data file {chunk.path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise DataError(f"data file {chunk.path}: expected a JSON array of rows, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield i, json.dumps(row)
    elif chunk.kind == "parquet":
        import pyarrow.parquet as pq

        with _open(chunk.path) as f:
            index = chunk.row_offset
            for batch in pq.ParquetFile(f).iter_batches(row_groups=range(chunk.start, chunk.stop)):
                for row in batch.to_pylist():
                    yield index, json.dumps(row, default=str)
                    index += 1
    else:
        from ray_zephyr.embedded import chat_row, preference_row

        make = chat_row if chunk.stage == "sft" else preference_row
        for i in range(chunk.start, chunk.stop):
            yield i, json.dumps(make(chunk.seed, chunk.path, i))


def read_chunk(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: each input row holds one Chunk's fields; yields batches of `{source, row, raw}`."""
    for values in zip(*(batch[name] for name in Chunk.__dataclass_fields__)):
        chunk = Chunk(*(v.item() if hasattr(v, "item") else v for v in values))
        rows, texts = [], []
        for index, text in _iter_file_rows(chunk):
            rows.append(index)
            texts.append(text)
            if len(rows) == ROWS_PER_BATCH:
                yield _raw_batch(chunk.label, rows, texts)
                rows, texts = [], []
        if rows:
            yield _raw_batch(chunk.label, rows, texts)


def _raw_batch(label: str, rows: list[int], texts: list[str]) -> dict[str, np.ndarray]:
    return {"source": np.array([label] * len(rows)), "row": np.array(rows, dtype=np.int64), "raw": np.array(texts, dtype=object)}
