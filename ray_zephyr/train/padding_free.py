"""Padding-free micro-batches (`train.padding_free: true`): all rows of a micro-batch as one sequence.

A padded batch (as `data.collate` builds it, truncated exactly as TRL's collators do) becomes one row of its
real tokens. `position_ids` restart at 0 for each row, which makes transformers attend within each row only
(its packed-sequence detection turns them into a block-diagonal causal mask for SDPA and eager attention, and
into `cu_seqlens` for FlashAttention-2's varlen kernel on GPU); `row_index` tells the scorer which row each
token is in. The first token of a row is never scored: it would be predicted from the previous row.
No compute goes to padding, which matters most for DPO, where chosen and rejected completions of very
different lengths share a batch (TRL's DPO padding-free is disabled). Tests check that the loss and the
gradients equal the padded batch's, for SFT and every DPO loss.
"""

from __future__ import annotations

import torch


def pack(batch: dict[str, torch.Tensor], scored: str) -> dict[str, torch.Tensor]:
    """The padded `batch` (right-padded, `attention_mask`) as one packed sequence; `scored` names its score mask."""
    keep = batch["attention_mask"].bool()
    lengths = batch["lengths"]
    starts = torch.cumsum(lengths, 0) - lengths
    row_index = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    score = batch[scored][keep]
    score[starts] = 0
    packed = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", scored)}
    return packed | {
        "input_ids": batch["input_ids"][keep][None],
        "position_ids": (torch.arange(len(row_index)) - starts[row_index])[None],
        "row_index": row_index[None],
        scored: score[None],
    }


def model_inputs(batch: dict[str, torch.Tensor], scored: str) -> dict[str, torch.Tensor | None]:
    """The `TokenScorer` arguments of a padded or a packed batch."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
            "score_mask": batch[scored], "position_ids": batch.get("position_ids"), "row_index": batch.get("row_index")}
