"""Batches from tokenized rows, truncated and padded exactly as TRL 1.16's collators do.

Preference batches are `[chosen; rejected]` stacked on the batch axis with `input_ids`, `attention_mask`
and `completion_mask` (1 on completion tokens), so one forward pass scores both sides. Unpaired (KTO) batches
are one row per example, and the same again for KTO's mismatched pairs (`KL_` keys).
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


def _prompt_completion_batch(prompts: Sequence, completions: Sequence, pad_token_id: int, max_length: int | None,
                             truncation_mode: str) -> dict[str, torch.Tensor]:
    """prompt + completion per row, truncated, with a mask of the completion tokens."""
    sequences, masks = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt, completion = list(prompt), list(completion)
        sequences.append(truncate(prompt + completion, max_length, truncation_mode))
        masks.append(truncate([0] * len(prompt) + [1] * len(completion), max_length, truncation_mode))
    return {
        "input_ids": _pad(sequences, pad_token_id),
        "attention_mask": _pad([[1] * len(s) for s in sequences], 0),
        "completion_mask": _pad(masks, 0),
    }


def collate_preference(
    rows: dict[str, Sequence],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> dict[str, torch.Tensor]:
    """Columns `prompt_ids`, `chosen_ids`, `rejected_ids` (+ optional ref log-probs) -> a [chosen; rejected] batch."""
    prompts = list(rows["prompt_ids"])
    batch = _prompt_completion_batch(prompts * 2, [*rows["chosen_ids"], *rows["rejected_ids"]], pad_token_id,
                                     max_length, truncation_mode)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in rows:
            batch[key] = torch.as_tensor(np.asarray(rows[key], dtype=np.float32))
    return batch


def collate_unpaired(
    rows: dict[str, Sequence],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    kl: bool = True,
) -> dict[str, torch.Tensor]:
    """Columns `prompt_ids`, `completion_ids`, `label` -> KTO's batch (TRL's DataCollatorForUnpairedPreference) with
    `label`; with `kl`, the same three tensors, prefixed `KL_`, for each prompt followed by the completion of the row
    before it (the first row takes the last row's): KTO's mismatched pairs, the completions cycled within the batch."""
    completions = list(rows["completion_ids"])
    batch = _prompt_completion_batch(rows["prompt_ids"], completions, pad_token_id, max_length, truncation_mode)
    batch["label"] = torch.as_tensor(np.asarray(rows["label"], dtype=bool))
    if kl:
        cycled = _prompt_completion_batch(rows["prompt_ids"], completions[-1:] + completions[:-1], pad_token_id,
                                          max_length, truncation_mode)
        batch |= {f"KL_{k}": v for k, v in cycled.items()}
    return batch


def collate_sft(rows: dict[str, Sequence], pad_token_id: int) -> dict:
    """Columns `input_ids`, `labels` (already truncated, -100 off the assistant turns) -> a padded batch."""
    input_ids = [list(r) for r in rows["input_ids"]]
    return {
        "input_ids": _pad(input_ids, pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in input_ids], 0),
        "labels": _pad([list(r) for r in rows["labels"]], -100),
    }
