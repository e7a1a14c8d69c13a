"""Prompts for AI feedback from the sources the data layer knows: the embedded task, or local jsonl/json/parquet.

A row gives its prompt as UltraFeedback does (`prompt`, or the turns before the last of `chosen`), as
UltraChat does (`messages`, up to the last user turn), or as AlpacaEval does (`instruction`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from ray_zephyr.config import SourceConfig
from ray_zephyr.data.sources import EMBEDDED_DEFAULT_ROWS, EXTENSIONS
from ray_zephyr.errors import DataError, UserError


def prompt_turns(row: dict) -> list[dict]:
    """The conversation to be answered, ending with a user turn; ValueError naming the field if there is none."""
    if isinstance(row.get("chosen"), list) and row["chosen"]:
        turns = row["chosen"][:-1]
    elif isinstance(row.get("messages"), list):
        turns = row["messages"]
        while turns and turns[-1].get("role") != "user":
            turns = turns[:-1]
    elif isinstance(row.get("prompt"), str):
        turns = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("instruction"), str):
        turns = [{"role": "user", "content": row["instruction"]}]
    else:
        raise ValueError("needs prompt, instruction, messages or chosen")
    if not turns or turns[-1].get("role") != "user" or not isinstance(turns[-1].get("content"), str):
        raise ValueError("the prompt turns do not end with a user message")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _file_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        with path.open() as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"prompt file {path}, row {i}: not valid JSON ({exc.msg})") from None
    else:
        yield from json.loads(path.read_text())


def _source_rows(source: SourceConfig, seed: int) -> Iterator[tuple[str, dict]]:
    if source.path == "embedded":
        from ray_zephyr.embedded import preference_row

        rows = source.rows if source.rows is not None else EMBEDDED_DEFAULT_ROWS[source.split]
        for i in range(rows):
            yield f"embedded:{source.split}[{i}]", preference_row(seed, source.split, i)
        return
    path = Path(source.path).expanduser()
    if not path.exists():
        raise UserError(f"prompt source {source.path!r}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.name.endswith(EXTENSIONS))
    for file in files:
        for i, row in enumerate(_file_rows(file)):
            yield f"{file}, row {i}", row


def read_prompts(sources: list[SourceConfig], seed: int) -> list[dict]:
    """`{id, messages}` per distinct prompt (the id, used as `prompt_id`, is the sha256 of the prompt turns)."""
    prompts: dict[str, dict] = {}
    for source in sources:
        for where, row in _source_rows(source, seed):
            try:
                turns = prompt_turns(row)
            except (ValueError, AttributeError, TypeError) as exc:
                raise DataError(f"prompt source {where}: {exc}") from None
            key = hashlib.sha256(json.dumps(turns, sort_keys=True).encode()).hexdigest()
            prompts.setdefault(key, {"id": key, "messages": turns})
    if not prompts:
        raise UserError("the prompt sources gave no prompts")
    return list(prompts.values())
