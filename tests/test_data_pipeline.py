"""The Ray Data pipeline end to end: sources, mixtures, splits, validation, determinism, shards, stalls."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.data.pipeline import build_datasets
from ray_zephyr.data.sources import source_chunks
from ray_zephyr.data.tokenize import tokenize_preference, tokenize_sft
from ray_zephyr.data.validate import preference_example, sft_example
from ray_zephyr.embedded import chat_row, preference_row
from ray_zephyr.errors import DataError, DataStallError, UserError
from ray_zephyr.models import load_tokenizer
from ray_zephyr.prefetch import iter_with_stall_timeout

ROOT = Path(__file__).resolve().parents[1]


def recipe(stage: str, *overrides: str):
    return load_recipe(f"tiny-{stage}", ["model.name_or_path=embedded", *overrides])


def rows_of(ds) -> list[dict]:
    return ds.take_all()


def keys(rows) -> list[tuple[str, int]]:
    return [(r["source"], r["row"]) for r in rows]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_embedded_pipeline_is_deterministic_given_the_seed(ray_session):
    r = recipe("dpo", "data.train.0.rows=300", "data.eval.0.rows=40")
    tok = load_tokenizer(r)
    first = build_datasets(r, tok)
    a = rows_of(first.train)
    b = rows_of(build_datasets(r, tok).train)
    c = rows_of(build_datasets(recipe("dpo", "data.train.0.rows=300", "data.eval.0.rows=40", "seed=7"), tok).train)
    assert keys(a) == keys(b) and [x["chosen_ids"] for x in a] == [x["chosen_ids"] for x in b]
    assert sorted(keys(a)) == sorted(("embedded:train", i) for i in range(300))
    assert keys(a) != sorted(keys(a)), "the seeded shuffle should reorder rows"
    assert keys(c) != keys(a), "another seed gives another order (and other generated rows)"
    rows_of(first.eval)
    report = first.report()
    assert (report.read("train"), report.kept("train"), report.dropped("train")) == (300, 300, {})
    assert (report.read("eval"), report.kept("eval")) == (40, 40)


def test_eval_fraction_holds_out_disjoint_rows(ray_session):
    r = recipe("sft", "data.train.0.rows=500", "data.eval=[]", "data.eval_fraction=0.2")
    data = build_datasets(r, load_tokenizer(r))
    train, evaluation = set(keys(rows_of(data.train))), set(keys(rows_of(data.eval)))
    assert not train & evaluation
    assert train | evaluation == {("embedded:train", i) for i in range(500)}
    assert 60 <= len(evaluation) <= 140


def test_mixture_weights_and_per_source_split_selection(ray_session, shared_data, tmp_path):
    folder = tmp_path / "ultrachat"
    folder.mkdir()
    real = [json.loads(line) for line in (shared_data / "ultrachat_200k" / "sample_16.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(real[:10]), folder / "train_sft-00000-of-00001.parquet", row_group_size=3)
    pq.write_table(pa.Table.from_pylist(real[10:]), folder / "test_sft-00000-of-00001.parquet")
    r = recipe("sft", "data.max_length=100000", "data.eval=[]",
               f"data.train=[{{path: embedded, rows: 400, weight: 0.5}}, {{path: {folder}, split: train_sft}}]")
    data = build_datasets(r, load_tokenizer(r))
    got = keys(rows_of(data.train))
    embedded = [k for k in got if k[0] == "embedded:train"]
    parquet = sorted(k for k in got if k[0] != "embedded:train")
    assert len(embedded) == 200, "weight 0.5 keeps exactly round(0.5 x 400) rows of the source"
    assert parquet == [(str(folder / "train_sft-00000-of-00001.parquet"), i) for i in range(10)]
    again = keys(rows_of(build_datasets(r, load_tokenizer(r)).train))
    assert again == got, "mixture selection is deterministic"


def test_real_samples_through_ray_match_direct_tokenization(ray_session, shared_data):
    for stage, path, example, tokenize, column in [
        ("sft", "ultrachat_200k/sample_16.jsonl", sft_example, tokenize_sft, "input_ids"),
        ("dpo", "ultrafeedback_binarized/sample_16.jsonl", preference_example, tokenize_preference, "chosen_ids"),
    ]:
        file = shared_data / path
        r = recipe(stage, f"data.train.0.path={file}", "data.train.0.rows=null", "data.eval=[]", "data.max_length=100000",
                   "data.add_empty_system=true")
        tok = load_tokenizer(r)
        data = build_datasets(r, tok)
        got = sorted(rows_of(data.train), key=lambda x: x["row"])
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        expected = tokenize(tok, [example(x) for x in rows], 100_000, "keep_start", True)
        assert [x["row"] for x in got] == list(range(16))
        assert [list(x[column]) for x in got] == [e[column] for e in expected]
        assert data.report().lines() == ["train: read 16 rows = kept 16 + dropped 0"]


def bad_preference_rows() -> tuple[list, dict[str, int]]:
    good = preference_row(0, "train", 0)
    user, answer = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    long_prompt = {"role": "user", "content": "word " * 400}
    rows = [
        good,
        "{not json",
        "[1, 2]",
        {"rejected": [user, answer]},
        {"chosen": [user, {"role": "assistant", "content": 5}], "rejected": [user, answer]},
        {"chosen": [user, {"role": "assistant", "content": "  "}], "rejected": [user, answer]},
        {"chosen": [{"role": "robot", "content": "x"}, answer], "rejected": [user, answer]},
        {"chosen": [user, user, answer], "rejected": [user, user, answer]},
        {"chosen": [user, answer, user], "rejected": [user, answer, user]},
        {"chosen": [user, answer], "rejected": [{"role": "user", "content": "Other?"}, answer]},
        {"chosen": [long_prompt, answer], "rejected": [long_prompt, {"role": "assistant", "content": "No."}]},
        good,
    ]
    expected = {"invalid_json": 1, "wrong_type": 2, "missing_field": 1, "empty_content": 1, "unknown_role": 1,
                "bad_turn_order": 2, "prompt_mismatch": 1, "prompt_too_long": 1}
    return rows, expected


def test_every_bad_row_class_is_skipped_and_counted_by_reason(ray_session, tmp_path):
    rows, expected = bad_preference_rows()
    file = write_jsonl(tmp_path / "prefs.jsonl", rows)
    r = recipe("dpo", f"data.train.0.path={file}", "data.train.0.rows=null", "data.eval=[]", "data.on_bad_row=skip")
    data = build_datasets(r, load_tokenizer(r))
    assert sorted(x["row"] for x in rows_of(data.train)) == [0, 11]
    report = data.report()
    assert report.dropped("train") == dict(sorted(expected.items()))
    assert report.read("train") == len(rows) == report.kept("train") + sum(expected.values())


@pytest.mark.parametrize("row, reason", [(1, "invalid_json"), (6, "unknown_role"), (10, "prompt_too_long")])
def test_fail_mode_names_file_row_and_reason(ray_session, tmp_path, row, reason):
    rows, _ = bad_preference_rows()
    file = write_jsonl(tmp_path / "prefs.jsonl", [rows[0], rows[row]])
    r = recipe("dpo", f"data.train.0.path={file}", "data.train.0.rows=null", "data.eval=[]", "data.on_bad_row=fail")
    with pytest.raises(Exception) as info:
        rows_of(build_datasets(r, load_tokenizer(r)).train)
    from ray_zephyr.errors import user_error_in

    err = user_error_in(info.value)
    assert isinstance(err, DataError)
    assert str(err).startswith(f"{file} row 1: {reason}: ")


def test_fail_mode_from_the_command_line_is_one_line(tmp_path, joined_env):
    rows, _ = bad_preference_rows()
    file = write_jsonl(tmp_path / "prefs.jsonl", [rows[0], rows[7]])
    result = subprocess.run(
        [sys.executable, "jobs/preview.py", "--config", "tiny-dpo", "model.name_or_path=embedded",
         f"data.train.0.path={file}", "data.train.0.rows=null", "data.eval=[]", "data.on_bad_row=fail"],
        cwd=ROOT, env=joined_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Starting execution of Dataset" not in result.stderr  # Ray's INFO lines are off by default
    problems = [line for line in result.stderr.splitlines() if "Traceback" in line or line.startswith("error")]
    assert problems == [
        f"error: {file} row 1: bad_turn_order: chosen[1] is user, expected assistant (turns must alternate) "
        "(data.on_bad_row=skip drops such rows)"
    ]


def test_file_level_problems_are_clear_errors_before_any_work(tmp_path, shared_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unknown = write_jsonl(tmp_path / "qa.jsonl", [{"question": "hi", "answer": "hello"}])
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train_sft.jsonl", [chat_row(0, "train", 0)])
    cases = [
        (empty, "sft", f"data file {empty} is empty"),
        (unknown, "sft", f"data file {unknown}: unrecognized sft data format (found fields answer, question); "
                         "accepted formats: messages: messages=[{role, content}]"),
        (shared_data / "ultrachat_200k/sample_16.jsonl", "dpo",
         "unrecognized dpo data format (found fields messages, prompt, prompt_id; these look like sft rows); accepted formats: sharegpt: "),
        (corrupt, "sft", f"data file {corrupt} cannot be read: "),
        (tmp_path / "missing.jsonl", "sft", "no such file or folder"),
    ]
    for path, stage, message in cases:
        r = recipe(stage, f"data.train.0.path={path}", "data.train.0.rows=null")
        with pytest.raises(UserError) as info:
            source_chunks(r.data.train[0], stage, 0)
        assert message in str(info.value)
    r = recipe("sft", f"data.train.0.path={folder}", "data.train.0.rows=null", "data.train.0.split=test_sft")
    with pytest.raises(UserError, match="no file for split 'test_sft'"):
        source_chunks(r.data.train[0], "sft", 0)


def test_a_missing_data_file_is_one_line_before_ray_starts(tmp_path):
    missing = tmp_path / "missing.jsonl"
    for job in ("jobs/preview.py", "jobs/sft.py"):
        done = subprocess.run([sys.executable, job, "--config", "tiny-sft", f"data.train=[{{path: {missing}}}]",
                               f"train.output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode != 0 and "Started a local Ray instance" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (f"error: data source '{missing}': no such file or folder "
                                                        "(and not a hub dataset id 'owner/name')"), job


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = recipe("sft", "data.train=[{path: HuggingFaceH4/ultrachat_200k, split: train_sft}]")
    with pytest.raises(UserError, match="hub dataset 'HuggingFaceH4/ultrachat_200k': cannot list its files"):
        source_chunks(r.data.train[0], "sft", 0)


def test_parquet_is_read_in_row_group_chunks_with_file_row_indices(ray_session, tmp_path):
    file = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([preference_row(3, "x", i) for i in range(100)]), file, row_group_size=5)
    r = recipe("dpo", f"data.train.0.path={file}", "data.train.0.rows=null", "data.eval=[]")
    chunks = source_chunks(r.data.train[0], "dpo", 0)
    assert len(chunks) == 5 and [c.row_offset for c in chunks] == [0, 20, 40, 60, 80]
    got = rows_of(build_datasets(r, load_tokenizer(r)).train)
    assert sorted(x["row"] for x in got) == list(range(100))


def test_a_stalled_pipeline_raises_instead_of_hanging(ray_session):
    import ray

    ds = ray.data.range(4).map_batches(lambda b: b, num_cpus=1000)  # can never be scheduled
    start = time.monotonic()
    with pytest.raises(DataStallError, match="no first batch within 3s"):
        for _ in iter_with_stall_timeout(ds.iter_batches(), 3, "stall test"):
            pass
    assert time.monotonic() - start < 60


def test_preview_lengths_are_after_truncation_and_supervised_never_exceeds_them():
    import numpy as np

    from ray_zephyr.config import load_recipe
    from ray_zephyr.data.preview import _lengths

    pair = {"prompt_ids": np.array([[1] * 10], dtype=object), "chosen_ids": np.array([[2] * 30], dtype=object),
            "rejected_ids": np.array([[3] * 5], dtype=object)}
    for mode, supervised in (("keep_start", 10 + 5), ("keep_end", 20 + 5)):
        recipe = load_recipe("tiny-dpo", ["data.max_length=20", f"data.truncation_mode={mode}"])
        assert _lengths(pair, recipe) == ([20 + 15], [supervised])  # both sequences, each cut at max_length


def test_preview_shows_counts_lengths_and_a_marked_example(joined_env):
    result = subprocess.run(
        [sys.executable, "jobs/preview.py", "--config", "tiny-dpo", "model.name_or_path=embedded",
         "data.train.0.rows=300", "data.eval.0.rows=50", "--verbose"],
        cwd=ROOT, env=joined_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Starting execution of Dataset" in result.stderr  # --verbose: Ray Data's own lines too
    out = result.stdout
    assert "train: read 300 rows = kept 300 + dropped 0" in out
    assert "eval: read 50 rows = kept 50 + dropped 0" in out
    assert "train tokens per row after truncation (a pair: prompt + chosen and prompt + rejected): p50 " in out
    assert "supervised tokens: p50 " in out
    assert "<|assistant|>\n[[" in out and "--- rejected completion:" in out
