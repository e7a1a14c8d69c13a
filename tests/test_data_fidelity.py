"""Zephyr fidelity: BOS as the original runs had it, the paper's max_prompt_length, the handbook's exact mixture,
hub revisions, and a seeded order that does not depend on where the files sit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from ray_zephyr.chat_template import ZEPHYR_TEMPLATE
from ray_zephyr.config import load_recipe
from ray_zephyr.data import sources
from ray_zephyr.data.pipeline import build_datasets
from ray_zephyr.data.sources import hub_root, resolve_source
from ray_zephyr.data.tokenize import tokenize_preference, tokenize_sft
from ray_zephyr.data.validate import preference_example, sft_example
from ray_zephyr.embedded import chat_row
from ray_zephyr.errors import UserError
from ray_zephyr.models import load_tokenizer


def zephyr_recipe(name: str, sample: Path, *overrides: str):
    """A shipped zephyr-7b-beta recipe, data section as shipped, on the tiny model (its tokenizer has BOS <s>)."""
    return load_recipe(name, ["model.name_or_path=embedded", f"data.train=[{{path: {sample}}}]", "data.eval=[]",
                              "data.shuffle=false", *overrides])


def test_zephyr_sft_recipe_starts_every_sequence_with_bos(ray_session, shared_data):
    sample = shared_data / "ultrachat_200k" / "sample_16.jsonl"
    recipe = zephyr_recipe("zephyr-7b-beta-sft", sample)
    assert recipe.data.add_bos == "true"
    tokenizer = load_tokenizer(recipe)
    bos = tokenizer.bos_token_id
    assert bos is not None
    rows = build_datasets(recipe, tokenizer).train.take_all()
    examples = [sft_example(json.loads(line)) for line in sample.read_text().splitlines()]
    trl_like = tokenize_sft(tokenizer, examples, 10**6, "keep_start", True)  # add_bos=auto: as TRL 1.16, uncut
    assert len(rows) >= 12  # max_length 2048 leaves a few long conversations no assistant token: dropped
    for row in rows:
        plain = trl_like[row["row"]]
        assert plain["input_ids"][0] != bos
        assert list(row["input_ids"]) == ([bos] + plain["input_ids"])[:2048]
        assert list(row["labels"]) == ([-100] + plain["labels"])[:2048]


def test_zephyr_dpo_recipe_bos_and_max_prompt_length(ray_session, shared_data):
    sample = shared_data / "ultrafeedback_binarized" / "sample_16.jsonl"
    recipe = zephyr_recipe("zephyr-7b-beta-dpo", sample)
    assert (recipe.data.add_bos, recipe.data.max_prompt_length, recipe.data.max_length) == ("true", 512, 1024)
    tokenizer = load_tokenizer(recipe)
    bos = tokenizer.bos_token_id
    rows = build_datasets(recipe, tokenizer).train.take_all()
    examples = [preference_example(json.loads(line)) for line in sample.read_text().splitlines()]
    full = tokenize_preference(tokenizer, examples, 10**6, "keep_start", True)  # no limits, no BOS
    assert len(rows) == 16, "max_prompt_length keeps rows whose prompt alone is longer than max_length"
    cut = 0
    for row, plain in zip(rows, full, strict=True):
        prompt = list(row["prompt_ids"])
        assert prompt[0] == bos and len(prompt) <= 512
        assert prompt[1:] == plain["prompt_ids"][-(len(prompt) - 1):], "keep_end: the prompt's last tokens stay"
        assert list(row["chosen_ids"]) == plain["chosen_ids"]
        cut += len(plain["prompt_ids"]) + 1 > 512
    assert cut, "some of the real prompts are longer than 512 tokens and were cut"


def test_add_bos_auto_false_true_on_a_template_that_renders_bos(embedded_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.chat_template = "{{ bos_token }}" + ZEPHYR_TEMPLATE
    example = sft_example(chat_row(0, "train", 0))
    bos = tokenizer.bos_token_id
    [auto], [never], [always] = (tokenize_sft(tokenizer, [example], 512, "keep_start", False, add_bos=choice)
                                 for choice in (None, False, True))
    assert auto["input_ids"][0] == bos and auto["input_ids"][1] != bos  # TRL's: the template's BOS, once
    assert always == auto
    assert never["input_ids"] == auto["input_ids"][1:] and never["labels"] == auto["labels"][1:]


def write_source(folder: Path) -> None:
    """Two files in one source: 101 jsonl rows (and a blank line) and 41 parquet rows in row groups of 10."""
    folder.mkdir(parents=True)
    lines = [json.dumps(chat_row(1, "a", i)) for i in range(101)]
    (folder / "train-a.jsonl").write_text("\n".join(lines[:50] + [""] + lines[50:]) + "\n")
    pq.write_table(pa.Table.from_pylist([chat_row(1, "b", i) for i in range(41)]), folder / "train-b.parquet",
                   row_group_size=10)


def test_exact_mixture_and_an_order_independent_of_where_files_sit(ray_session, tmp_path, monkeypatch):
    first = tmp_path / "one" / "mix"
    write_source(first)

    def order(path: str) -> list[tuple[str, int]]:
        recipe = load_recipe("tiny-sft", ["model.name_or_path=embedded", "data.eval=[]", "data.max_length=100000",
                                          f"data.train=[{{path: {path}, weight: 0.3}}, {{path: embedded, rows: 50, weight: 0.5}}]"])
        data = build_datasets(recipe, load_tokenizer(recipe))
        return [(Path(r["source"]).name, r["row"]) for r in data.train.take_all()]

    got = order(str(first))
    files = [name for name, _ in got]
    assert len(got) == round(0.3 * 142) + round(0.5 * 50) == 68
    assert files.count("embedded:train") == 25
    assert files.count("train-a.jsonl") + files.count("train-b.parquet") == 43
    assert len(set(got)) == len(got)
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    monkeypatch.chdir(moved.parent)
    assert order("renamed") == got, "a moved folder given by a relative path: same rows, same order"


def test_parquet_row_counts_come_from_metadata_and_jsonl_from_one_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LINES_PER_CHUNK", 20)
    write_source(tmp_path / "mix")
    recipe = load_recipe("tiny-sft", ["model.name_or_path=embedded", f"data.train.0.path={tmp_path / 'mix'}",
                                      "data.train.0.rows=null"])
    resolved = resolve_source(recipe.data.train[0], "sft", 0)
    assert resolved.count == 142
    jsonl = resolved.rows["0:train-a.jsonl"]
    assert list(jsonl[:50]) == list(range(50)) and list(jsonl[50:]) == list(range(51, 102)), "row = line index"
    parquet = [c for c in resolved.chunks if c.kind == "parquet"]
    assert [(c.start, c.stop, c.row_offset) for c in parquet] == [(0, 4, 0), (4, 5, 40)], "row groups, 4 per chunk"
    lines = [c for c in resolved.chunks if c.kind == "jsonl"]
    assert len(lines) == 6, "101 non-empty lines in byte ranges of 20 lines"
    read = [(int(i), v) for c in resolved.chunks for ids, values in sources.read_chunk(c, lambda x: x >= 0)
            for i, v in zip(ids, values) if c.kind == "jsonl"]
    assert [i for i, _ in read] == list(jsonl)
    assert [v for _, v in read] == [chat_row(1, "a", i) for i in range(101)]


def test_hub_sources_are_pinned_to_a_revision(monkeypatch, tmp_path):
    assert hub_root("HuggingFaceH4/ultrachat_200k", "refs/convert/parquet") == \
        "datasets/HuggingFaceH4/ultrachat_200k@refs%2Fconvert%2Fparquet"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe("tiny-sft", ["data.train=[{path: HuggingFaceH4/ultrachat_200k, split: train_sft, revision: 3ba5a1e}]"])
    with pytest.raises(UserError, match="hub dataset 'HuggingFaceH4/ultrachat_200k' at revision '3ba5a1e': cannot list"):
        resolve_source(recipe.data.train[0], "sft", 0)
    local = load_recipe("tiny-sft", [f"data.train=[{{path: {tmp_path}, revision: main}}]"])
    with pytest.raises(UserError, match="revision is only for hub datasets"):
        resolve_source(local.data.train[0], "sft", 0)
