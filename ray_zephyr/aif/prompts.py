"""Prompts for AI feedback from any source the data layer reads: hub datasets, local jsonl/json/parquet files or
folders, the embedded task. Sources are resolved and read by ray_zephyr.data.sources (so `split`, `revision`,
`columns` and `weight` mean what they mean for training data), in this process: prompts are few.

A row gives its prompt as UltraFeedback does (`prompt`, or the turns before the last of `chosen`), as
UltraChat does (`messages`, up to the last user turn), or as AlpacaEval does (`instruction`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

from ray_zephyr.config import SourceConfig
from ray_zephyr.data.formats import rename
from ray_zephyr.data.pipeline import mixture_threshold, row_hash
from ray_zephyr.data.sources import Chunk, read_rows, resolve_source
from ray_zephyr.data.validate import Invalid
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


def _source_rows(source: SourceConfig, seed: int, position: int) -> Iterator[tuple[str, dict]]:
    """Rows of one source as the data layer reads them, `weight` selecting the same rows as in training."""
    resolved = resolve_source(source, "prompts", seed, position)
    threshold = mixture_threshold(resolved, source.weight, seed)

    def mixture(chunk: Chunk):
        return lambda rows: row_hash(seed, "mixture", chunk.key, rows) <= threshold

    for chunk, row, value in read_rows(resolved, mixture):
        where = f"{chunk.label}, row {row}"
        try:
            if isinstance(value, Invalid):
                raise value
            if not isinstance(value, dict):
                raise Invalid("wrong_type", f"a row must be an object, got {type(value).__name__}")
            value = rename(value, dict(chunk.columns))
        except Invalid as exc:
            raise DataError(f"prompt source {where}: {exc}") from None
        yield where, value


def read_prompts(sources: list[SourceConfig], seed: int) -> list[dict]:
    """`{id, messages}` per distinct prompt (the id, used as `prompt_id`, is the sha256 of the prompt turns)."""
    prompts: dict[str, dict] = {}
    for position, source in enumerate(sources):
        for where, row in _source_rows(source, seed, position):
            try:
                turns = prompt_turns(row)
            except (ValueError, AttributeError, TypeError) as exc:
                raise DataError(f"prompt source {where}: {exc}") from None
            key = hashlib.sha256(json.dumps(turns, sort_keys=True).encode()).hexdigest()
            prompts.setdefault(key, {"id": key, "messages": turns})
    if not prompts:
        raise UserError("the prompt sources gave no prompts")
    return list(prompts.values())
