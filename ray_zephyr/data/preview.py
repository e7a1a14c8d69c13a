"""What the model will be trained on: counts, drops by reason, token lengths, one rendered example."""

from __future__ import annotations

import numpy as np

from ray_zephyr.config import Recipe
from ray_zephyr.data.pipeline import build_datasets
from ray_zephyr.data.tokenize import truncate
from ray_zephyr.prefetch import iter_with_stall_timeout

PERCENTILES = (50, 90, 99, 100)


def _lengths(rows: dict, recipe: Recipe) -> tuple[list[int], list[int]]:
    """(tokens, supervised tokens) per row as the model gets them, after truncation to data.max_length (DPO keeps
    prompt and completions apart until it collates, so a pair counts both of its sequences, each cut there)."""
    if recipe.stage == "sft":
        return [len(x) for x in rows["input_ids"]], [int(np.sum(np.asarray(x) != -100)) for x in rows["labels"]]
    sides = ("completion_ids",) if recipe.data_kind == "kto" else ("chosen_ids", "rejected_ids")
    seq, sup = [], []
    for prompt, *completions in zip(rows["prompt_ids"], *(rows[side] for side in sides)):
        masks = [truncate([0] * len(prompt) + [1] * len(c), recipe.data.max_length, recipe.data.truncation_mode)
                 for c in completions]
        seq.append(sum(len(m) for m in masks))
        sup.append(sum(sum(m) for m in masks))
    return seq, sup


def mark_supervised(tokenizer, ids: list[int], supervised: list[bool]) -> str:
    """Decode `ids`, wrapping supervised spans in [[ ]] so a user sees what the loss is computed on."""
    out, span, current = [], [], False
    for token, flag in zip(ids, supervised):
        if flag != current and span:
            text = tokenizer.decode(span)
            out.append(f"[[{text}]]" if current else text)
            span = []
        span.append(int(token))
        current = flag
    if span:
        text = tokenizer.decode(span)
        out.append(f"[[{text}]]" if current else text)
    return "".join(out)


def render_example(tokenizer, row: dict, kind: str) -> str:
    if kind == "sft":
        labels = list(row["labels"])
        return mark_supervised(tokenizer, list(row["input_ids"]), [label != -100 for label in labels])
    prompt = list(row["prompt_ids"])
    if kind == "kto":
        completion = list(row["completion_ids"])
        text = mark_supervised(tokenizer, prompt + completion, [False] * len(prompt) + [True] * len(completion))
        return f"{text}\n--- label: {'desirable' if row['label'] else 'undesirable'}"
    chosen = mark_supervised(tokenizer, prompt + list(row["chosen_ids"]), [False] * len(prompt) + [True] * len(row["chosen_ids"]))
    rejected = tokenizer.decode(list(row["rejected_ids"]))
    return f"{chosen}\n--- rejected completion:\n[[{rejected}]]"


def preview(recipe: Recipe, tokenizer, max_rows: int | None = None) -> str:
    data = build_datasets(recipe, tokenizer)
    lines = [f"recipe stage={recipe.stage} model={recipe.model.name_or_path} max_length={recipe.data.max_length}"]
    example, stats = None, {}
    for name, ds in data.as_dict().items():
        if max_rows:
            ds = ds.limit(max_rows)
        seq, sup = [], []
        batches = ds.iter_batches(batch_size=256, batch_format="numpy")
        for batch in iter_with_stall_timeout(batches, recipe.data.stall_timeout_s, f"preview {name}",
                                             recipe.data.start_timeout_s):
            s, p = _lengths(batch, recipe)
            seq += s
            sup += p
            if example is None and len(batch["source"]):
                example = {k: v[0] for k, v in batch.items()}
        stats[name] = (seq, sup)
    lines += data.report().lines()
    def pct(xs: list[int]) -> str:
        return ", ".join(f"p{q} {int(np.percentile(xs, q))}" for q in PERCENTILES).replace("p100", "max")

    for name, (seq, sup) in stats.items():
        if seq:
            both = " (a pair: prompt + chosen and prompt + rejected)" if recipe.data_kind == "dpo" else ""
            lines.append(f"{name} tokens per row after truncation{both}: {pct(seq)}; supervised tokens: {pct(sup)}")
    if example is not None:
        lines.append(f"example ({example['source']} row {example['row']}; supervised tokens in [[ ]]):")
        lines.append(render_example(tokenizer, example, recipe.data_kind))
    return "\n".join(lines)
