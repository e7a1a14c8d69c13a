"""Tokenization on real UltraChat / UltraFeedback rows: assistant-only labels, and token-level parity with TRL 1.16.

TRL's own preparation (DPOTrainer/SFTTrainer `_prepare_dataset`) and collator are run on the same rows and
tokenizer; our token ids, labels and completion masks must be identical, including which rows are dropped.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from ray_zephyr.chat_template import set_chat_template
from ray_zephyr.data.collate import collate_preference
from ray_zephyr.data.formats import to_examples
from ray_zephyr.data.tokenize import tokenize_preference, tokenize_sft
from ray_zephyr.data.validate import Invalid, preference_example, sft_example
from ray_zephyr.embedded import build_model


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def zephyr_tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture(scope="module")
def chatml_tokenizer(smollm2_tokenizer_dir):
    return set_chat_template(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir))


def test_sft_labels_cover_every_assistant_turn_and_nothing_else(shared_data, zephyr_tokenizer):
    rows = read_jsonl(shared_data / "ultrachat_200k" / "sample_16.jsonl")
    examples = [sft_example(r) for r in rows]
    out = tokenize_sft(zephyr_tokenizer, examples, max_length=100_000, truncation_mode="keep_start", add_empty_system=False)
    eos = zephyr_tokenizer.eos_token
    for example, tokens in zip(examples, out, strict=True):
        supervised = [t for t in tokens["labels"] if t != -100]
        expected = "".join(m["content"] + eos for m in example["messages"] if m["role"] == "assistant")
        assert zephyr_tokenizer.decode(supervised) == expected
        assert len(tokens["input_ids"]) == len(tokens["labels"])
        assistant_turns = sum(m["role"] == "assistant" for m in example["messages"])
        assert assistant_turns >= 2  # the samples are multi-turn: every turn, not just the last, is supervised


def test_sft_truncation_and_empty_system_turn(shared_data, zephyr_tokenizer):
    example = sft_example(read_jsonl(shared_data / "ultrachat_200k" / "sample_16.jsonl")[0])
    [full] = tokenize_sft(zephyr_tokenizer, [example], 100_000, "keep_start", add_empty_system=True)
    assert zephyr_tokenizer.decode(full["input_ids"]).startswith("<|system|>\n</s>\n<|user|>\n")
    first_label = next(i for i, label in enumerate(full["labels"]) if label != -100)
    n = first_label + 5
    [cut] = tokenize_sft(zephyr_tokenizer, [example], n, "keep_start", add_empty_system=True)
    assert cut["input_ids"] == full["input_ids"][:n] and cut["labels"] == full["labels"][:n]
    [tail] = tokenize_sft(zephyr_tokenizer, [example], 64, "keep_end", add_empty_system=True)
    assert tail["input_ids"] == full["input_ids"][-64:]
    [dropped] = tokenize_sft(zephyr_tokenizer, [example], first_label, "keep_start", add_empty_system=True)
    assert isinstance(dropped, Invalid) and dropped.reason == "no_supervised_tokens"


def trl_sft_rows(tokenizer, rows, max_length, tmp_path):
    """TRL 1.16's SFTTrainer preparation of rows in any of its formats (assistant-only loss on conversations)."""
    from trl import SFTConfig, SFTTrainer

    conversational = not isinstance(rows[0].get("messages", rows[0].get("prompt", rows[0].get("text"))), str)
    args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, assistant_only_loss=conversational, report_to=[],
                     use_cpu=True, bf16=False, dataset_num_proc=None)
    trainer = SFTTrainer(model=build_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    return list(trainer.train_dataset)


def test_sft_matches_trl_sfttrainer_assistant_only_loss(shared_data, zephyr_tokenizer, tmp_path):
    rows = read_jsonl(shared_data / "ultrachat_200k" / "sample_16.jsonl")
    max_length = 512
    ours = [r for r in tokenize_sft(zephyr_tokenizer, [sft_example(r) for r in rows], max_length, "keep_start", False)
            if not isinstance(r, Invalid)]
    theirs = trl_sft_rows(zephyr_tokenizer, [{"messages": r["messages"]} for r in rows], max_length, tmp_path)
    assert len(ours) == len(theirs) < 16  # max_length drops rows left with no assistant token, in both
    for a, b in zip(ours, theirs, strict=True):
        assert a["input_ids"] == b["input_ids"]
        assert a["labels"] == b["labels"]


def trl_preference_batches(tokenizer, rows, max_length, tmp_path):
    """TRL 1.16's DPOTrainer preparation + collator on rows in any of its preference formats."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model = build_model(tokenizer)
    args = DPOConfig(output_dir=str(tmp_path), max_length=max_length, report_to=[], use_cpu=True, bf16=False)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected") if k in r} for r in rows])
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    prepared = list(trainer.train_dataset)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    return prepared, collator


@pytest.mark.parametrize("tokenizer_name", ["zephyr_tokenizer", "chatml_tokenizer"])
@pytest.mark.parametrize("sample", ["sample_16.jsonl", "train_prefs_1000.jsonl"])
def test_dpo_token_ids_and_masks_match_trl(request, shared_data, tmp_path, tokenizer_name, sample):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows, examples = [], []
    for row in read_jsonl(shared_data / "ultrafeedback_binarized" / sample):
        try:
            examples.append(preference_example(row))
            rows.append(row)
        except Invalid:  # the real data has a few (e.g. an empty rejected answer): validation's job, not TRL's
            pass
    max_length = 256  # short enough that some prompts are dropped and many completions truncated
    ours = tokenize_preference(tokenizer, examples, max_length, "keep_start", False)
    kept = [r for r in ours if not isinstance(r, Invalid)]
    dropped = [r for r in ours if isinstance(r, Invalid)]
    assert all(d.reason == "prompt_too_long" for d in dropped)
    pairs = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]  # TRL: implicit prompt
    prepared, collator = trl_preference_batches(tokenizer, pairs, max_length, tmp_path)
    assert len(kept) == len(prepared)
    if sample == "train_prefs_1000.jsonl":
        assert dropped, "max_length should drop some long prompts, to test dropping like TRL"
    for start in range(0, len(kept), 64):
        mine = kept[start : start + 64]
        batch_ours = collate_preference({k: [r[k] for r in mine] for k in mine[0]}, tokenizer.pad_token_id, max_length)
        batch_trl = collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in prepared[start : start + 64]])
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(batch_ours[key], batch_trl[key]), key
    truncated = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) > max_length for r in kept)
    assert truncated > 0 or sample == "sample_16.jsonl"


def sft_rows_in(fmt: str, rows: list[dict]) -> list[dict]:
    """UltraChat conversations rewritten into one of TRL's other SFT formats."""
    out = []
    for r in rows:
        first_user, first_answer = r["messages"][0]["content"], r["messages"][1]["content"]
        out.append({
            "text": {"text": "\n".join(m["content"] for m in r["messages"])},
            "prompt_completion_standard": {"prompt": first_user + "\n", "completion": first_answer},
            "prompt_completion_conversational": {"prompt": r["messages"][:1], "completion": r["messages"][1:4]},
        }[fmt])
    return out


@pytest.mark.parametrize("fmt", ["text", "prompt_completion_standard", "prompt_completion_conversational"])
def test_every_trl_sft_format_matches_trl(shared_data, zephyr_tokenizer, tmp_path, fmt):
    rows = sft_rows_in(fmt, read_jsonl(shared_data / "ultrachat_200k" / "sample_16.jsonl"))
    name = "text" if fmt == "text" else "prompt_completion"
    examples = [to_examples(r, "sft", name, {})[0] for r in rows]
    max_length = 384
    ours = [r for r in tokenize_sft(zephyr_tokenizer, examples, max_length, "keep_start", False) if not isinstance(r, Invalid)]
    theirs = trl_sft_rows(zephyr_tokenizer, rows, max_length, tmp_path)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a["input_ids"] == b["input_ids"]
        assert a["labels"] == b["labels"]
    assert any(label == -100 for r in ours for label in r["labels"]) == (fmt != "text")


def preference_rows_in(fmt: str, rows: list[dict]) -> list[dict]:
    """UltraFeedback pairs rewritten into one of TRL's other preference formats."""
    out = []
    for r in rows:
        try:
            pair = preference_example(r)
        except Invalid:
            continue
        question, good, bad = pair["prompt"][-1]["content"], pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        out.append({
            "conversational_explicit": pair,
            "standard_explicit": {"prompt": question, "chosen": " " + good, "rejected": " " + bad},
            "standard_implicit": {"chosen": question + " " + good, "rejected": question + " " + bad},
        }[fmt])
    return out


@pytest.mark.parametrize("fmt", ["conversational_explicit", "standard_explicit", "standard_implicit"])
def test_every_trl_preference_format_matches_trl(shared_data, zephyr_tokenizer, tmp_path, fmt):
    rows = preference_rows_in(fmt, read_jsonl(shared_data / "ultrafeedback_binarized" / "sample_16.jsonl"))
    examples = [to_examples(r, "dpo", "preference", {})[0] for r in rows]
    max_length = 256
    ours = [r for r in tokenize_preference(zephyr_tokenizer, examples, max_length, "keep_start", False)
            if not isinstance(r, Invalid)]
    prepared, _ = trl_preference_batches(zephyr_tokenizer, rows, max_length, tmp_path)
    assert len(ours) == len(prepared) > 0
    for a, b in zip(ours, prepared, strict=True):
        assert {k: a[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} == \
            {k: b[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
