"""Where rows come from: hub datasets, local jsonl/json/parquet files or folders, and the embedded default.

Every source becomes a list of read chunks (a byte range of a jsonl file, a few parquet row groups, a json file,
or a range of embedded rows). Resolving a source is its one counting pass: parquet row counts come from the
metadata; a jsonl file is scanned once for its line offsets, which also cut it into chunks so that one large file
is read and tokenized in parallel. Each chunk's rows reach validation as the Python values the reader produced,
with their provenance: the source label (the file as given) and the row's index in its file.

Why not `ray.data.read_parquet` / `read_json`: they give no row index within a file (needed to name a bad row,
and for a seeded selection and order that do not depend on how blocks were read), `read_json` fails a whole file
on one malformed line instead of counting it, and Arrow's schema inference rejects rows whose fields change type
(a content that is a string in one row and a list of text parts in the next). The hub is read through
`HfFileSystem` (fsspec), pinned to the source's `revision`, at the `HF_ENDPOINT` set when the source is resolved
(huggingface_hub itself reads it once, at import); hub chunks carry that endpoint, so Ray workers read the hub
the driver listed whatever their own environment.
Stage `prompts` reads rows as they are, with no training format (AIF prompts, benchmark questions).
Files are opened and their format detected before any Ray work, so an empty, unreadable or unrecognized file
is a one-line error up front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ray_zephyr.config import SourceConfig
from ray_zephyr.data.formats import FORMATS, check_format, detect_format
from ray_zephyr.data.validate import Invalid
from ray_zephyr.errors import DataError, UserError

EXTENSIONS = (".jsonl", ".json", ".parquet")
ROWS_PER_BATCH = 256
LINES_PER_CHUNK = 2000
ROW_GROUPS_PER_CHUNK = 4
EMBEDDED_ROWS_PER_CHUNK = 500
EMBEDDED_DEFAULT_ROWS = {"train": 2000, "test": 200}
DETECT_ROWS = 10  # rows looked at to detect a file's format (a bad first line is a row-level problem)


@dataclass(frozen=True)
class Chunk:
    """One unit of parallel reading."""

    kind: str  # "jsonl" | "json" | "parquet" | "embedded"
    path: str  # file path / hf:// path / embedded split
    label: str  # how the `source` column and errors name it: the file's absolute path or hf:// URL
    key: str  # where it sits inside its source ("<source index>:<path within the source>"): seeds selection, order
    format: str  # a name in ray_zephyr.data.formats.FORMATS[stage]
    columns: tuple[tuple[str, str], ...] = ()
    start: int = 0  # jsonl: first byte; parquet: first row group; embedded: first row
    stop: int = 0  # jsonl: byte after the last; parquet: row group after the last; embedded: row after the last
    row_offset: int = 0  # jsonl, parquet: index of the chunk's first row in its file
    stage: str = ""
    seed: int = 0  # embedded
    endpoint: str = ""  # hub files: the hub they were listed from


@dataclass
class ResolvedSource:
    """A source's chunks, and the index of every row of each file (keyed by Chunk.key) for the exact mixture."""

    chunks: list[Chunk]
    rows: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.rows.values())


def _hub_endpoint() -> str:
    """The hub to read: `HF_ENDPOINT` as set now (huggingface_hub reads it once, at import), else its default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT


def _hub_fs(endpoint: str):
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=endpoint)


def _open(path: str, endpoint: str):
    return _hub_fs(endpoint).open(path, "rb") if path.startswith("hf://") else open(path, "rb")


def source_chunks(source: SourceConfig, stage: str, seed: int) -> list[Chunk]:
    """Resolve a recipe source into read chunks (see `resolve_source`)."""
    return resolve_source(source, stage, seed).chunks


def resolve_source(source: SourceConfig, stage: str, seed: int, position: int = 0) -> ResolvedSource:
    """Resolve a recipe source (the `position`-th of its list): files, formats, row counts and chunks.

    `stage`: the recipe's data kind, sft, dpo or kto (rows in one of its formats: `Recipe.data_kind`), or prompts
    (rows as they are)."""
    if source.format != "auto" and stage in FORMATS:
        check_format(source.format, stage, f"data source {source.path!r}")
    if source.path == "embedded":
        return _embedded(source, stage, seed, position)
    files, endpoint = source_files(source)
    resolved = ResolvedSource([], {})
    for path, inner in files:
        key = f"{position}:{inner}"
        chunks, rows = _file_chunks(path, key, source, stage, endpoint)
        resolved.chunks += chunks
        resolved.rows[key] = rows
    return resolved


def source_files(source: SourceConfig) -> tuple[list[tuple[str, str]], str]:
    """The (file, name inside the source) pairs of a file, folder or hub source, and the hub endpoint ('' for local
    files); a source that does not exist, or holds no readable file, is a one-line error. Cheap (nothing is read),
    so jobs call it before Ray starts."""
    local = Path(source.path).expanduser().absolute()  # Ray workers do not share the driver's working directory
    if local.exists():
        if source.revision is not None:
            raise UserError(f"data source {source.path!r}: revision is only for hub datasets, this is a local path")
        root = local if local.is_dir() else local.parent
        return [(f, Path(f).relative_to(root).as_posix()) for f in _local_files(local, source)], ""
    if "/" in source.path and not source.path.startswith((".", "/", "~")):
        endpoint = _hub_endpoint()
        return _hub_files(source.path, source.split, source.revision, endpoint), endpoint
    raise UserError(f"data source {source.path!r}: no such file or folder (and not a hub dataset id 'owner/name')")


def _embedded(source: SourceConfig, stage: str, seed: int, position: int) -> ResolvedSource:
    if source.split not in EMBEDDED_DEFAULT_ROWS:
        raise UserError(f"embedded data has splits train and test, not {source.split!r}")
    rows = source.rows if source.rows is not None else EMBEDDED_DEFAULT_ROWS[source.split]
    key, fmt = f"{position}:embedded:{source.split}", "messages" if stage == "sft" else "preference"
    chunks = [Chunk("embedded", source.split, f"embedded:{source.split}", key, fmt, (), start,
                    min(start + EMBEDDED_ROWS_PER_CHUNK, rows), stage=stage, seed=seed)
              for start in range(0, rows, EMBEDDED_ROWS_PER_CHUNK)]
    return ResolvedSource(chunks, {key: np.arange(rows)})


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


def hub_root(name: str, revision: str | None) -> str:
    """The dataset's root in HfFileSystem, at `revision` if given (a branch name may hold slashes)."""
    return f"datasets/{name}" + (f"@{quote(revision, safe='')}" if revision else "")


def _hub_files(name: str, split: str, revision: str | None, endpoint: str) -> list[tuple[str, str]]:
    """(hf:// path, path within the dataset) of the split's parquet files: the layout `datasets` writes
    (`<dir>/<split>-00000-of-00001.parquet`), else the hub's own parquet conversion (`refs/convert/parquet`:
    `<config>/<split>/0000.parquet`) when no revision is pinned."""
    root = hub_root(name, revision)
    at = f" at revision {revision!r}" if revision else ""
    try:
        fs = _hub_fs(endpoint)
        files = sorted(fs.glob(f"{root}/**/{split}-*.parquet"))
        if not files and not revision:
            converted = hub_root(name, "refs/convert/parquet")
            try:
                files = sorted(fs.glob(f"{converted}/*/{split}/*.parquet"))
            except FileNotFoundError:  # never converted (a new or private dataset)
                pass
            root = converted if files else root
        splits = [] if files else sorted({Path(f).name.removesuffix(".parquet").split("-")[0]
                                          for f in fs.glob(f"{root}/**/*.parquet")})
    except Exception as exc:  # noqa: BLE001 - offline, auth, not found: all one readable line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"hub dataset {name!r}{at}: cannot list its files ({first})") from None
    if not files:
        found = f"its splits: {', '.join(splits)}" if splits else "it has no parquet files"
        raise UserError(f"hub dataset {name!r}{at}: no parquet files for split {split!r} ({found})")
    return [(f"hf://{f}", f.removeprefix(root + "/")) for f in files]


def _file_kind(path: str) -> str:
    return "jsonl" if path.endswith(".jsonl") else "json" if path.endswith(".json") else "parquet"


def _file_chunks(path: str, key: str, source: SourceConfig, stage: str,
                 endpoint: str) -> tuple[list[Chunk], np.ndarray]:
    """The counting pass over one file: its chunks, the index of each of its rows, its format."""
    kind = _file_kind(path)
    try:
        if not path.startswith("hf://") and os.path.getsize(path) == 0:
            raise UserError(f"data file {path} is empty")
        read_spans = {"jsonl": _jsonl_spans, "json": _json_spans, "parquet": _parquet_spans}[kind]
        spans, rows, first = read_spans(path, endpoint)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - permissions, corrupt parquet, bad encoding
        raise UserError(f"data file {path} cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not len(rows):
        raise UserError(f"data file {path} has no rows")
    columns = dict(source.columns)
    fmt = source.format
    if fmt == "auto" and stage in FORMATS:
        row = next((r for r in first if isinstance(r, dict)), first[0] if first else None)
        fmt = detect_format(row, stage, columns, f"data file {path}")
    return [Chunk(kind, path, path, key, fmt, tuple(columns.items()), start, stop, offset, stage, endpoint=endpoint)
            for start, stop, offset in spans], rows


def _jsonl_spans(path: str, endpoint: str) -> tuple[list[tuple[int, int, int]], np.ndarray, list]:
    """Byte ranges of LINES_PER_CHUNK non-empty lines each, the line index of every non-empty line, first rows."""
    spans, rows, first = [], [], []
    start = position = 0
    chunk_first_line = 0
    with _open(path, endpoint) as f:
        for i, line in enumerate(f):
            if line.strip():
                if len(first) < DETECT_ROWS:
                    first.append(_parse_line(line))
                if len(rows) % LINES_PER_CHUNK == 0 and rows:
                    spans.append((start, position, chunk_first_line))
                    start, chunk_first_line = position, i
                rows.append(i)
            position += len(line)
    if rows:
        spans.append((start, position, chunk_first_line))
    return spans, np.asarray(rows, dtype=np.int64), first


def _parse_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return Invalid("invalid_json", f"not valid JSON ({getattr(exc, 'msg', exc)})")


def _load_json(path: str, endpoint: str) -> list:
    with _open(path, endpoint) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"data file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"data file {path}: expected a JSON array of rows, got {type(rows).__name__}")
    return rows


def _json_spans(path: str, endpoint: str) -> tuple[list[tuple[int, int, int]], np.ndarray, list]:
    rows = _load_json(path, endpoint)
    return [(0, 0, 0)], np.arange(len(rows)), rows[:DETECT_ROWS]


def _parquet_spans(path: str, endpoint: str) -> tuple[list[tuple[int, int, int]], np.ndarray, list]:
    """Row counts from the metadata: no pass over the data."""
    import pyarrow.parquet as pq

    with _open(path, endpoint) as f:
        parquet = pq.ParquetFile(f)
        meta = parquet.metadata
        first = next(parquet.iter_batches(batch_size=DETECT_ROWS), None)
        first = first.to_pylist() if first is not None else []
    spans, offset = [], 0
    for start in range(0, meta.num_row_groups, ROW_GROUPS_PER_CHUNK):
        stop = min(start + ROW_GROUPS_PER_CHUNK, meta.num_row_groups)
        spans.append((start, stop, offset))
        offset += sum(meta.row_group(i).num_rows for i in range(start, stop))
    return spans, np.arange(meta.num_rows), first


Select = Callable[[np.ndarray], np.ndarray]


def read_chunk(chunk: Chunk, select: Select) -> Iterator[tuple[np.ndarray, list]]:
    """(row indices, row values) of the chunk's rows that `select(indices)` keeps, ROWS_PER_BATCH at a time.

    Rows left out by the selection are never parsed (jsonl) or converted to Python (parquet).
    A jsonl line that is not JSON comes back as an `Invalid` value, to be counted like any bad row.
    """
    if chunk.kind == "jsonl":
        yield from _read_jsonl(chunk, select)
    elif chunk.kind == "parquet":
        import pyarrow.parquet as pq

        with _open(chunk.path, chunk.endpoint) as f:
            index = chunk.row_offset
            batches = pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH, row_groups=range(chunk.start, chunk.stop))
            for batch in batches:
                ids = np.arange(index, index + batch.num_rows)
                index += batch.num_rows
                keep = select(ids)
                yield ids[keep], batch.filter(keep).to_pylist()
    elif chunk.kind == "json":
        rows = _load_json(chunk.path, chunk.endpoint)
        for start in range(0, len(rows), ROWS_PER_BATCH):
            ids = np.arange(start, min(start + ROWS_PER_BATCH, len(rows)))
            ids = ids[select(ids)]
            yield ids, [rows[i] for i in ids]
    else:
        from ray_zephyr.embedded import chat_row, preference_row

        make = chat_row if chunk.stage == "sft" else preference_row
        for start in range(chunk.start, chunk.stop, ROWS_PER_BATCH):
            ids = np.arange(start, min(start + ROWS_PER_BATCH, chunk.stop))
            ids = ids[select(ids)]
            yield ids, [make(chunk.seed, chunk.path, int(i)) for i in ids]


def read_rows(resolved: ResolvedSource,
              select: Callable[[Chunk], Select] | None = None) -> Iterator[tuple[Chunk, int, Any]]:
    """(chunk, row index in its file, value) of every row of a resolved source that `select(chunk)` keeps, read
    here in order: for inputs the driver holds whole (AIF prompts, benchmark questions), which need no Ray Data pass."""
    for chunk in resolved.chunks:
        keep = select(chunk) if select else (lambda ids: np.ones(len(ids), dtype=bool))
        for ids, values in read_chunk(chunk, keep):
            yield from ((chunk, int(i), value) for i, value in zip(ids, values))


def _read_jsonl(chunk: Chunk, select: Select) -> Iterator[tuple[np.ndarray, list]]:
    def flush(ids: list[int], lines: list[bytes]):
        ids = np.asarray(ids, dtype=np.int64)
        keep = select(ids)
        return ids[keep], [_parse_line(line) for line, k in zip(lines, keep) if k]

    ids, lines = [], []
    with _open(chunk.path, chunk.endpoint) as f:
        f.seek(chunk.start)
        position, index = chunk.start, chunk.row_offset
        while position < chunk.stop:
            line = f.readline()
            if not line:
                break
            position += len(line)
            if line.strip():
                ids.append(index)
                lines.append(line)
                if len(ids) == ROWS_PER_BATCH:
                    yield flush(ids, lines)
                    ids, lines = [], []
            index += 1
    if ids:
        yield flush(ids, lines)
