"""Batches from tokenized rows, truncated and padded exactly as TRL 1.16's collators do.

Preference batches are `[chosen; rejected]` stacked on the batch axis with `input_ids`, `attention_mask`
and `completion_mask` (1 on completion tokens), so one forward pass scores both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ray_zephyr.data.tokenize import truncate


def _pad(rows: list[Sequence[int]], value: int) -> torch.Tensor:
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    return out


def collate_preference(
    rows: dict[str, Sequence],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> dict[str, torch.Tensor]:
    """Columns `prompt_ids`, `chosen_ids`, `rejected_ids` (+ optional ref log-probs) -> a [chosen; rejected] batch."""
    sequences, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for prompt, completion in zip(rows["prompt_ids"], rows[side], strict=True):
            prompt, completion = list(prompt), list(completion)
            sequences.append(truncate(prompt + completion, max_length, truncation_mode))
            masks.append(truncate([0] * len(prompt) + [1] * len(completion), max_length, truncation_mode))
    batch = {
        "input_ids": _pad(sequences, pad_token_id),
        "attention_mask": _pad([[1] * len(s) for s in sequences], 0),
        "completion_mask": _pad(masks, 0),
    }
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in rows:
            batch[key] = torch.as_tensor(np.asarray(rows[key], dtype=np.float32))
    return batch


def collate_sft(rows: dict[str, Sequence], pad_token_id: int) -> dict:
    """Columns `input_ids`, `labels` (already truncated, -100 off the assistant turns) -> a padded batch."""
    input_ids = [list(r) for r in rows["input_ids"]]
    return {
        "input_ids": _pad(input_ids, pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in input_ids], 0),
        "labels": _pad([list(r) for r in rows["labels"]], -100),
    }
