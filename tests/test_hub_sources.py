"""Hub datasets read for real through a local stand-in for the Hugging Face Hub (tests/hub_server.py), reached at
HF_ENDPOINT by huggingface_hub's own HfFileSystem: training sources (in Ray Data workers), revision pinning, the
hub's parquet conversion, AIF prompts (and an AIF run) and MT-Bench questions, in the repos' real layouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import StandInHub, commit_sha

from ray_zephyr.aif.prompts import read_prompts
from ray_zephyr.config import SourceConfig, load_recipe
from ray_zephyr.data.sources import read_rows, resolve_source
from ray_zephyr.embedded import chat_row, preference_row
from ray_zephyr.errors import UserError
from ray_zephyr.evaluation.mt_bench import load_questions

ULTRACHAT, ULTRAFEEDBACK, MT_BENCH = ("HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized",
                                      "HuggingFaceH4/mt_bench_prompts")
SFT_FILE = "data/train_sft-00000-of-00001.parquet"  # `datasets`' push_to_hub layout, as the real repo's
PREFS_FILE = "data/train_prefs-00000-of-00001.parquet"
MT_BENCH_FILE = "data/train-00000-of-00001-4ec8a9c7e5fd5ed9.parquet"
# HuggingFaceH4/mt_bench_prompts' columns: FastChat's `turns` renamed `prompt`, a hashed `prompt_id`, an empty
# `reference` where FastChat has none.
QUESTIONS = [
    {"prompt": ["Write a haiku about the sea.", "Now make it rhyme."], "prompt_id": 58210331, "category": "writing",
     "reference": []},
    {"prompt": ["What is 3 plus 4?", "And times 2?"], "prompt_id": 9170042, "category": "math",
     "reference": ["7", "14"]},
]


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    stand_in = StandInHub(tmp_path_factory.mktemp("hub"))
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def local(hub, tmp_path_factory) -> Path:
    """Writes every repo these tests read to the stand-in, once (a hub's files at a commit don't change), and
    returns a folder with local copies of some of them."""
    local = tmp_path_factory.mktemp("local")
    for root in (hub.folder(ULTRACHAT), local / "ultrachat"):
        write_parquet(root / SFT_FILE, [chat_row(5, "train", i) for i in range(24)], row_group_size=8)
        write_parquet(root / "data/test_sft-00000-of-00001.parquet", [chat_row(5, "test", i) for i in range(4)])
    for root in (hub.folder(ULTRAFEEDBACK), local / "ultrafeedback"):
        write_parquet(root / PREFS_FILE, [preference_row(7, "train", i) for i in range(12)])
    for revision, seed in (("main", 1), ("v1.0", 2)):
        write_parquet(hub.folder("someone/prefs", revision) / "data/train-00000-of-00001.parquet",
                      [preference_row(seed, "train", i) for i in range(5)])
    (hub.folder("someone/raw-only") / "raw.jsonl").write_text(json.dumps(preference_row(3, "train", 0)) + "\n")
    write_parquet(hub.folder("someone/raw-only", "refs/convert/parquet") / "default/train/0000.parquet",
                  [preference_row(3, "train", i) for i in range(3)])
    write_parquet(hub.folder(MT_BENCH) / MT_BENCH_FILE, QUESTIONS)
    (hub.folder(MT_BENCH) / "raw/question.jsonl").parent.mkdir(exist_ok=True)
    (hub.folder(MT_BENCH) / "raw/question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    write_parquet(hub.folder(MT_BENCH, "v0") / MT_BENCH_FILE, QUESTIONS[:1])
    write_parquet(hub.folder("someone/not_mt_bench") / "data/train-00000-of-00001.parquet",
                  [{"question": "Why?", "category": "writing"}])
    return local


@pytest.fixture
def at_hub(hub, local, monkeypatch):
    """This process reaches the stand-in through HF_ENDPOINT, read when a source is resolved. The session's Ray
    workers started before it was set: they read the hub the driver listed because hub chunks carry it."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


def rows_of(source: SourceConfig, stage: str = "dpo") -> list:
    return [value for _, _, value in read_rows(resolve_source(source, stage, 0))]


def test_sft_source_from_the_hub_tokenizes_like_the_same_parquet_read_locally(ray_session, at_hub, local):
    """One pipeline over both sources: the hub file is read by the Ray Data workers, over HTTP."""
    from ray_zephyr.data.pipeline import build_datasets
    from ray_zephyr.models import load_tokenizer

    recipe = load_recipe("tiny-sft", ["model.name_or_path=embedded", "data.eval=[]", "data.train=["
                                      f"{{path: {ULTRACHAT}, split: train_sft}}, "
                                      f"{{path: '{local / 'ultrachat'}', split: train_sft}}]"])
    reads_before = sum("/resolve/" in path for _, path in at_hub.requests)
    prepared = build_datasets(recipe, load_tokenizer(recipe))
    by_source: dict[str, dict] = {}
    for r in prepared.train.take_all():
        by_source.setdefault(r["source"], {})[r["row"]] = (list(r["input_ids"]), list(r["labels"]))
    from_hub = by_source.pop(f"hf://datasets/{ULTRACHAT}/{SFT_FILE}")
    from_local = by_source.pop(str(local / "ultrachat" / SFT_FILE))
    assert not by_source and sorted(from_hub) == list(range(24)) and from_hub == from_local
    assert prepared.report().kept("train") == 48
    assert sum("/resolve/" in path for _, path in at_hub.requests) > reads_before, "the rows came over HTTP"


def test_a_pinned_revision_reads_its_own_files_and_the_parquet_conversion_is_found(at_hub):
    main, pinned = ([preference_row(seed, "train", i) for i in range(5)] for seed in (1, 2))
    assert rows_of(SourceConfig(path="someone/prefs")) == main
    assert rows_of(SourceConfig(path="someone/prefs", revision="v1.0")) == pinned
    assert rows_of(SourceConfig(path="someone/prefs", revision=commit_sha("someone/prefs", "v1.0"))) == pinned
    converted = resolve_source(SourceConfig(path="someone/raw-only"), "dpo", 0)
    assert [c.label for c in converted.chunks] == \
        ["hf://datasets/someone/raw-only@refs%2Fconvert%2Fparquet/default/train/0000.parquet"]
    assert [v for _, _, v in read_rows(converted)] == [preference_row(3, "train", i) for i in range(3)]


@pytest.mark.parametrize("source, message", [
    ({"path": "someone/prefs", "split": "test_prefs"},
     "hub dataset 'someone/prefs': no parquet files for split 'test_prefs' (its splits: train)"),
    ({"path": "someone/prefs", "revision": "v9"},
     "hub dataset 'someone/prefs' at revision 'v9': cannot list its files (datasets/someone/prefs@v9/"),
    ({"path": "someone/nothing"}, "hub dataset 'someone/nothing': cannot list its files (datasets/someone/nothing/"),
])
def test_hub_source_errors_are_one_line(at_hub, source, message):
    with pytest.raises(UserError) as info:
        resolve_source(SourceConfig(**source), "dpo", 0)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_aif_prompts_from_the_hub_equal_the_same_file_read_locally(at_hub, local):
    from_hub = read_prompts([SourceConfig(path=ULTRAFEEDBACK, split="train_prefs")], 42)
    from_local = read_prompts([SourceConfig(path=str(local / "ultrafeedback"), split="train_prefs")], 42)
    assert from_hub == from_local and len(from_hub) == 12
    assert [p["messages"] for p in from_hub] == [preference_row(7, "train", i)["chosen"][:-1] for i in range(12)]
    half = read_prompts([SourceConfig(path=ULTRAFEEDBACK, split="train_prefs", weight=0.5)], 42)
    assert len(half) == 6 and all(p in from_hub for p in half), "weight: the training mixture's exact selection"


def test_aif_job_takes_its_prompts_from_the_hub(ray_session, at_hub, tmp_path):
    from ray_zephyr.aif.config import AIFRecipe
    from ray_zephyr.aif.run import run_aif

    recipe = AIFRecipe.model_validate({
        "prompts": [{"path": ULTRAFEEDBACK, "split": "train_prefs"}],
        "generators": [{"name": "teacher", "kind": "function", "function": "ray_zephyr.embedded:teacher", "n": 2}],
        "judge": {"kind": "function", "function": "ray_zephyr.embedded:verify"},
        "output_dir": str(tmp_path / "aif"),
    })
    summary = run_aif(recipe)
    assert summary.prompts == 12 and summary.completions == {"teacher": 24} and summary.rated == 24
    assert summary.pairs + sum(summary.dropped_prompts.values()) == 12 and summary.pairs > 0
    pairs = pq.read_table(tmp_path / "aif" / "pairs.parquet").to_pylist()
    questions = {preference_row(7, "train", i)["prompt"] for i in range(12)}
    assert {row["prompt"] for row in pairs} <= questions


def test_mt_bench_questions_from_the_hub_without_datasets(at_hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails: the path must not need it
    expected = [{"question_id": str(q["prompt_id"]), "category": q["category"], "turns": q["prompt"],
                 "reference": q["reference"]} for q in QUESTIONS]
    assert load_questions(MT_BENCH) == expected
    assert load_questions(MT_BENCH, revision="v0") == expected[:1]
    with pytest.raises(UserError, match=r"^MT-Bench questions: hub dataset 'nobody/mt_bench': cannot list its files"):
        load_questions("nobody/mt_bench")
    with pytest.raises(UserError) as info:
        load_questions("someone/not_mt_bench")
    assert str(info.value) == (
        "MT-Bench questions hf://datasets/someone/not_mt_bench/data/train-00000-of-00001.parquet, row 0: "
        "`turns` (or `prompt`) must be a list of two strings (fields: category, question)")
