"""AI feedback for real: Ray Data generation from the tiny model (in-process engine and our Ray Serve app over
HTTP), an LLM judge over real HTTP (a local stand-in for the paid API), the cache, binarization, and the
output read by the DPO data pipeline."""

from __future__ import annotations

import hashlib
import random
import re

import pyarrow.parquet as pq
import pytest
from judge_stub import StubJudge, last_user_text

from ray_zephyr.aif.binarize import Pair, binarize
from ray_zephyr.aif.config import AIFRecipe, JudgeConfig
from ray_zephyr.aif.judge import Judge
from ray_zephyr.aif.ratings import Rating, parse_rating
from ray_zephyr.config import load_recipe
from ray_zephyr.errors import UserError
from ray_zephyr.llm.config import EndpointConfig
from ray_zephyr.runtime import free_ports

GOOD = "Instruction following: {a}\nTruthfulness: {a}\nHonesty: 5\nHelpfulness: {a}\nOverall: {o}"


def _answer(request: dict) -> str:
    return re.search(r"\[Answer\]\n(.*)\n\nReply with", last_user_text(request), re.S).group(1)


def _by_content(request: dict, seen: int) -> tuple[int, str, float]:
    """A deterministic teacher: scores from a hash of the answer; scripted failures by the answer's text."""
    answer = _answer(request)
    score = int(hashlib.sha256(answer.encode()).hexdigest(), 16) % 10 + 1
    good = GOOD.format(a=(score + 1) // 2, o=score)
    if answer == "garbage once":
        return 200, ("I think it is fine." if seen == 1 else good), 0
    if answer == "garbage always":
        return 200, "Overall: great", 0
    if answer == "out of range":
        return 200, GOOD.format(a=9, o=9), 0
    if answer == "500 once":
        return (500, "", 0) if seen == 1 else (200, good, 0)
    if answer == "500 always":
        return 503, "", 0
    if answer == "slow":
        return 200, good, 3.0
    return 200, good, 0


@pytest.fixture(scope="module")
def judge_server():
    stub = StubJudge(_by_content)
    yield stub
    stub.close()


def _endpoint(stub: StubJudge, **changes) -> EndpointConfig:
    return EndpointConfig(**{"base_url": stub.base_url, "model": "gpt-stub", "max_concurrency": 4, "timeout_s": 10,
                             "max_retries": 2, **changes})


def _rating(overall: float, *aspects: float) -> Rating:
    return Rating({f"a{i}": a for i, a in enumerate(aspects or (overall,))}, overall)


# -- binarization on hand-made score tables --------------------------------------------------------------------


def test_zephyr_binarization_takes_the_best_overall_and_a_random_other():
    ratings = [_rating(3), _rating(9), None, _rating(5), _rating(3)]
    rejected = {binarize(ratings, "zephyr", random.Random(s)).rejected for s in range(40)}
    assert {binarize(ratings, "zephyr", random.Random(s)).chosen for s in range(40)} == {1}
    assert rejected == {0, 3, 4}  # any other rated one, never the unrated
    assert binarize(ratings, "zephyr", random.Random(7)) == binarize(ratings, "zephyr", random.Random(7))  # seeded
    pair = binarize([_rating(4), _rating(4)], "zephyr", random.Random(0))  # Zephyr keeps ties
    assert isinstance(pair, Pair) and pair.score_chosen == pair.score_rejected == 4


def test_argilla_binarization_ranks_on_the_aspect_mean_and_drops_ties():
    # overall says 0 is best; the aspect means say 1 (4.5 > 2.0 > 1.0)
    ratings = [_rating(10, 2, 2), _rating(2, 4, 5), _rating(6, 1, 1)]
    pairs = [binarize(ratings, "argilla", random.Random(s)) for s in range(20)]
    assert {p.chosen for p in pairs} == {1} and {p.rejected for p in pairs} == {0, 2}
    assert pairs[0].score_chosen == 4.5
    # the rejected one must be strictly worse: a tie at the top with nothing below is dropped
    assert binarize([_rating(5, 3, 4), _rating(9, 4, 3)], "argilla", random.Random(0)) == "tie"
    top_tie = binarize([_rating(1, 4, 4), _rating(1, 4, 4), _rating(1, 1, 1)], "argilla", random.Random(0))
    assert top_tie.rejected == 2 and top_tie.chosen in (0, 1)


@pytest.mark.parametrize("method", ["zephyr", "argilla"])
def test_fewer_than_two_rated_completions_make_no_pair(method):
    assert binarize([_rating(5)], method, random.Random(0)) == "fewer_than_2_rated"
    assert binarize([None, _rating(5), None], method, random.Random(0)) == "fewer_than_2_rated"
    assert binarize([], method, random.Random(0)) == "fewer_than_2_rated"


def test_rating_parser():
    rating = parse_rating("Sure.\n**Instruction following:** 4\ntruthfulness = 5\nHonesty: 3\nHelpfulness: 4.5\nOverall: 8")
    assert rating.aspects == {"instruction_following": 4, "truthfulness": 5, "honesty": 3, "helpfulness": 4.5}
    assert rating.overall == 8
    with pytest.raises(ValueError, match="missing_honesty"):
        parse_rating("Instruction following: 4\nTruthfulness: 5\nHelpfulness: 4\nOverall: 8")
    with pytest.raises(ValueError, match="out_of_range_overall"):
        parse_rating(GOOD.format(a=3, o=11))


# -- the judge over real HTTP ----------------------------------------------------------------------------------


def test_bad_answers_timeouts_and_5xx_are_retried_then_counted(judge_server, tmp_path):
    prompt = [{"role": "user", "content": "Say something."}]
    answers = ["fine answer", "garbage once", "garbage always", "out of range", "500 once", "500 always", "slow"]
    config = JudgeConfig(endpoint=_endpoint(judge_server, timeout_s=1.0, max_retries=1), parse_retries=2)
    judge = Judge(config)
    judged = dict(zip(answers, judge.rate_all([(prompt, a) for a in answers])))
    assert all(judged[a][0] is not None for a in ("fine answer", "garbage once", "500 once"))
    assert judged["garbage always"][:2] == (None, "unparseable_missing_instruction_following")
    assert judged["out of range"][:2] == (None, "unparseable_out_of_range_instruction_following")
    assert judged["500 always"] == (None, "judge_http_503", [])
    assert judged["slow"] == (None, "judge_timeout", [])
    # the raw replies behind each verdict, one per attempt, for the audit trail
    garbage = judged["garbage always"][2]
    assert len(garbage) == 3 and len(set(garbage)) == 1 and len(judged["garbage once"][2]) == 2
    assert judge.stats.reasks == 1 + 2 + 2  # garbage once: 1 re-ask; the two unparseable ones: 2 each
    assert judge.unrated == {"unparseable_missing_instruction_following": 1,
                             "unparseable_out_of_range_instruction_following": 1, "judge_http_503": 1, "judge_timeout": 1}


def test_function_judge_is_the_task_verifier():
    from ray_zephyr.embedded import verify

    judge = Judge(JudgeConfig(kind="function", function="ray_zephyr.embedded:verify"))
    prompt = [{"role": "user", "content": "What is 3 plus 4?"}]
    judged = judge.rate_all([(prompt, "3 plus 4 is 7."), (prompt, "3 plus 4 is 8."), (prompt, "plus 1 is.")])
    assert [r.overall for r, _, _ in judged] == [1.0, 0.0, 0.0] == [verify(prompt, a) for a in
                                                                 ("3 plus 4 is 7.", "3 plus 4 is 8.", "plus 1 is.")]
    with pytest.raises(UserError, match="no_such_module"):
        Judge(JudgeConfig(kind="function", function="no_such_module:f"))


@pytest.mark.parametrize("question, answers", [
    ("What is 1 plus 0?", {"1 + 0 = 1.": 1, "The answer is 1": 1, "1 plus 0 is 2.": 0, "It is 11": 0, "": 0}),
    ("Sort 8 1 5.", {"Sorted: 1, 5, 8.": 1, "1 5 8": 1, "8, 5, 1": 0, "1 5": 0}),
    ("Spell tiger backwards.", {"regit": 1, "Backwards: r-e-g-i-t.": 1, "tiger": 0, "regitt": 0}),
    ("How many letters are in tiger?", {"tiger has 5 letters.": 1, "Five": 0, "It has 6 letters.": 0}),
    ("Tell me a story.", {"Once upon a time": 0}),
])
def test_the_lenient_verifier_reads_a_real_models_own_wording(question, answers):
    from ray_zephyr.embedded import verify_value

    prompt = [{"role": "user", "content": question}]
    assert {answer: verify_value(prompt, answer + "\nsecond line: 7 3") for answer in answers} == answers


def test_recipe_errors_are_one_line():
    def load(name: str, *overrides: str) -> AIFRecipe:
        return load_recipe(name, overrides, AIFRecipe)

    with pytest.raises(UserError, match=r"unknown key 'judge.functon' \(did you mean 'function'\?\)"):
        load("tiny-aif", "judge.functon=x")
    with pytest.raises(UserError, match="kind openai needs an endpoint"):
        load("tiny-aif", "generators.0.kind=openai")
    with pytest.raises(UserError, match="engine vllm on CPU .num_gpus 0. needs a vLLM CPU build and vllm_engine_args"):
        load("tiny-aif", "generators.0.kind=vllm")
    with pytest.raises(UserError, match="ask for 2 GPUs .* but num_gpus is 1.0: set num_gpus: 2"):
        load("ultrafeedback-gpt4", "generators.0.vllm_engine_args={tensor_parallel_size: 2}")
    with pytest.raises(UserError, match="vllm_engine_args are for kind vllm, not transformers"):
        load("tiny-aif", "generators.0.vllm_engine_args={enforce_eager: true}")
    with pytest.raises(UserError, match="aif recipe 'mt-bench-gpt4' not found: not a file, and not one of smollm2-135m-aif, smollm2-135m-task-aif, tiny-aif, "):
        load("mt-bench-gpt4")  # each kind of recipe is found among its own shipped ones
    assert load("tiny-aif").judge.function == "ray_zephyr.embedded:verify"
    assert load("ultrafeedback-gpt4").binarize == "argilla"


def test_prompts_of_each_shape_come_through_the_data_layer_and_bad_rows_name_file_and_row(tmp_path):
    import json

    import pyarrow as pa

    from ray_zephyr.aif.prompts import read_prompts
    from ray_zephyr.config import SourceConfig
    from ray_zephyr.errors import DataError

    def turn(role: str, text: str) -> dict:
        return {"role": role, "content": text}

    folder = tmp_path / "prompts"
    folder.mkdir()
    ultrafeedback = {"prompt": "What is 2?", "chosen": [turn("user", "What is 2?"), turn("assistant", "2")]}
    ultrachat = {"messages": [turn("user", "Hi"), turn("assistant", "Hello"), turn("user", "Bye"),
                              turn("assistant", "!")]}
    (folder / "train-a.jsonl").write_text(json.dumps(ultrafeedback) + "\n\n" + json.dumps(ultrachat) + "\n")
    (folder / "train-b.json").write_text(json.dumps([{"instruction": "List 3 colors.", "output": "red"}]))  # AlpacaEval
    (folder / "test-c.jsonl").write_text(json.dumps({"prompt": "Not in the train split."}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"question": "Name a fruit."}]), tmp_path / "questions.parquet")
    got = read_prompts([SourceConfig(path=str(folder), split="train"),
                        SourceConfig(path=str(tmp_path / "questions.parquet"), columns={"prompt": "question"})], 0)
    assert [p["messages"] for p in got] == [[turn("user", "What is 2?")], ultrachat["messages"][:3],
                                            [turn("user", "List 3 colors.")], [turn("user", "Name a fruit.")]]
    bad = tmp_path / "bad.jsonl"
    for line, message in [("{not json", "row 1: not valid JSON"),
                          (json.dumps({"text": "x"}), "row 2: needs prompt, instruction, messages or chosen")]:
        bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + ("\n" if "text" in line else "") + line + "\n")
        with pytest.raises(DataError, match=f"^prompt source {re.escape(str(bad))}, {message}"):
            read_prompts([SourceConfig(path=str(bad))], 0)


# -- the whole job: Ray Data generation, our Serve app as a generator, the judge, the cache, the DPO reader --------


@pytest.fixture(scope="module")
def serve_url(ray_session, embedded_model_dir):
    from ray import serve

    from ray_zephyr.serving.app import build_app
    from ray_zephyr.serving.settings import ServeSettings

    port = free_ports()[0]
    settings = ServeSettings(model=str(embedded_model_dir), model_name="tiny", engine="transformers", num_gpus=0,
                             min_replicas=1, max_replicas=1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="aif-generator", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()


def test_aif_job_generates_judges_binarizes_and_resumes_from_the_cache(judge_server, serve_url, embedded_model_dir,
                                                                        tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ray_zephyr.aif.run import run_aif
    from ray_zephyr.config import validate_recipe
    from ray_zephyr.data.pipeline import build_datasets
    from ray_zephyr.models import load_tokenizer

    recipe = AIFRecipe.model_validate({
        "prompts": [{"path": "embedded", "split": "train", "rows": 6}],
        "generators": [
            {"name": "local", "kind": "transformers", "model": str(embedded_model_dir), "n": 2, "max_tokens": 8,
             "batch_size": 3},
            {"name": "served", "kind": "openai", "n": 1, "max_tokens": 8,
             "endpoint": {"base_url": serve_url, "model": "tiny", "max_concurrency": 4}},
            {"name": "teacher", "kind": "function", "function": "ray_zephyr.embedded:teacher", "n": 1},
        ],
        "judge": {"kind": "llm", "endpoint": _endpoint(judge_server).model_dump()},
        "binarize": "zephyr",
        "output_dir": str(tmp_path / "aif"),
        "report_to": ["mlflow", "tensorboard"], "project": "aif-test",
    })
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    calls_before = len(judge_server.requests)
    summary = run_aif(recipe)
    assert summary.prompts == 6 and summary.completions == {"local": 12, "served": 6, "teacher": 6}
    assert summary.judge_calls == 24 == len(judge_server.requests) - calls_before and summary.judge_cached == 0
    assert summary.rated == 24 and summary.pairs == 6 and summary.generated_tokens > 0
    # the three generators ran at once (each its own Ray Data execution): together longer than the wall time taken
    assert set(summary.generation_seconds) == {"local", "served", "teacher"}
    assert sum(summary.generation_seconds.values()) > 1.2 * summary.generation_wall_seconds, summary
    shown = capsys.readouterr().err.splitlines()  # no terminal here: plain progress lines
    assert "judge: 24 ratings" in shown and any(line.startswith("judge: rating 24/24 (100%)") for line in shown)

    table = pq.read_table(tmp_path / "aif" / "pairs.parquet").to_pylist()
    for row in table:
        scores = [c["overall"] for c in row["completions"]]
        assert [c["generator"] for c in row["completions"]] == ["local", "local", "served", "teacher"]
        for completion in row["completions"][:3]:  # the engine's and the endpoint's: why each stopped, and its length
            assert completion["finish_reason"] in ("stop", "length") and 0 <= completion["tokens"] <= 8, completion
        assert row["score_chosen"] == max(scores) and row["score_rejected"] in scores
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1]["role"] == "assistant"
        assert row["messages"] == row["chosen"] and row["prompt"] == row["chosen"][-2]["content"]

    # A second run (as after a crash) pays for no judge call and gives the same pairs.
    again = run_aif(recipe)
    assert again.judge_calls == 0 and again.judge_cached == 24 and len(judge_server.requests) - calls_before == 24
    assert pq.read_table(tmp_path / "aif" / "pairs.parquet").to_pylist() == table

    # Each run's summary reached the trackers: MLflow (read back through its client), TensorBoard (its reader).
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aif-test").experiment_id], order_by=["start_time ASC"])
    assert [r.data.metrics["judge_cached"] for r in runs] == [0, 24]
    first = runs[0].data.metrics
    assert (first["pairs"], first["prompts"], first["completions/local"], first["judge_calls"]) == (6, 6, 12, 24)
    assert runs[0].data.params["binarize"] == "zephyr"
    events = EventAccumulator(str(tmp_path / "aif" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("pairs")] == [6, 6]

    # The DPO data pipeline reads the output as is.
    dpo = validate_recipe({"stage": "dpo", "model": {"name_or_path": str(embedded_model_dir)},
                           "data": {"train": [{"path": str(tmp_path / "aif" / "pairs.parquet")}], "max_length": 128},
                           "train": {"output_dir": str(tmp_path / "dpo")}})
    prepared = build_datasets(dpo, load_tokenizer(dpo))
    assert prepared.train.count() == 6
    assert prepared.report().kept("train") == 6


@pytest.mark.parametrize("job, args, message", [
    ("jobs/aif.py", ["--config", "tiny-aif", "judge.functon=x"], "unknown key 'judge.functon'"),
    ("jobs/evaluate.py", ["--config", "mt-bench-gpt4", "mt_bench=null", "alpaca_eval=null"], "nothing to evaluate"),
    # a model that does not exist: one line before Ray starts, not a traceback from each Ray Data actor
    ("jobs/aif.py", ["--config", "tiny-aif", "generators.0.model=outputs/nope/model"],
     "generator 'tiny-sft' model 'outputs/nope/model' does not exist (run jobs/sft.py first"),
    ("jobs/evaluate.py", ["--config", "mt-bench-gpt4", "candidate.model=outputs/nope/model"],
     "candidate model 'outputs/nope/model' does not exist"),
])
def test_jobs_report_config_errors_in_one_line(job, args, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, job, *args], cwd=root, capture_output=True, text=True, timeout=120)
    assert "Started a local Ray instance" not in done.stderr + done.stdout  # checked before Ray starts
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
