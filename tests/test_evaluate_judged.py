"""Judged evaluation for real: answers generated through Ray Data from an OpenAI-compatible endpoint, graded
over real HTTP by a local stand-in for the paid judge, parsed, retried, cached, scored and plotted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from judge_stub import StubJudge, last_user_text

from ray_zephyr.config import load_recipe
from ray_zephyr.errors import UserError
from ray_zephyr.evaluation.alpaca_eval import length_controlled_win_rate
from ray_zephyr.evaluation.config import EvalRecipe
from ray_zephyr.evaluation.judging import load_judge_prompts, parse_score, parse_verdict

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Make it rhyme."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "reference": ["It is 4.", "It is 6."]},
    {"question_id": 3, "category": "coding", "turns": ["Write fizzbuzz.", "GARBAGE in python"]},
]
BASELINE = [{"instruction": f"Name a color, please ({i}).", "output": "Blue." * (1 + i % 3)} for i in range(8)]


def _script(request: dict, seen: int) -> tuple[int, str, float]:
    text = last_user_text(request)
    if request["model"] == "under-test":  # the model being evaluated
        return 200, f"answer at T={request['temperature']} to {text}", 0
    if "[The Start of Assistant A's Answer]" in text:
        return 200, "A is better. [[A]]", 0  # a judge that always prefers the first position
    if "### User:\nWrite fizzbuzz." in text:  # the coding question's second turn: never a rating
        return 200, "I cannot rate this.", 0
    if "Reference Answer" in text:
        return 200, "It contradicts the reference. Rating: [[3]]", 0
    return 200, "Rating: [[6]]" if "SECOND answer" in text else "Good. Rating: [[8]]", 0


@pytest.fixture(scope="module")
def stub():
    server = StubJudge(_script)
    yield server
    server.close()


def _recipe(stub: StubJudge, tmp_path, **sections) -> EvalRecipe:
    endpoint = {"base_url": stub.base_url, "max_concurrency": 4, "timeout_s": 10, "max_retries": 1}
    return EvalRecipe.model_validate({
        "candidate": {"name": "under-test", "kind": "openai", "endpoint": endpoint | {"model": "under-test"},
                  "temperature": 0.5, "max_tokens": 16},
        "judge": endpoint | {"model": "gpt-stub"}, "output_dir": str(tmp_path / "eval"), **sections})


def test_mt_bench_grades_each_turn_with_the_protocol_temperatures_and_references(ray_session, stub, tmp_path, capsys):
    from ray_zephyr.evaluation.run import run_evaluation

    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    recipe = _recipe(stub, tmp_path, mt_bench={"questions": str(questions), "max_tokens": 16}, max_ungraded_fraction=0.2)
    start = len(stub.requests)
    results = run_evaluation(recipe)
    sent = stub.requests[start:]

    answers = [r for r in sent if r["model"] == "under-test"]
    assert {(r["messages"][-1]["content"], r["temperature"]) for r in answers} == {
        ("Write a haiku.", 0.7), ("Make it rhyme.", 0.7), ("What is 2+2?", 0.0), ("And 3+3?", 0.0),
        ("Write fizzbuzz.", 0.0), ("GARBAGE in python", 0.0)}
    second = next(r for r in answers if r["messages"][-1]["content"] == "Make it rhyme.")
    assert second["messages"][1] == {"role": "assistant", "content": "answer at T=0.7 to Write a haiku."}
    judgments = [json.loads(line) for line in (tmp_path / "eval" / "mt_bench_judgments.jsonl").read_text().splitlines()]
    fizz = next(j for j in judgments if str(j["question_id"]) == "3" and j["turn"] == 2)  # an auditable drop
    assert fizz["judge_prompt"] == "single-v1-multi-turn" and fizz["judge_replies"] == ["I cannot rate this."] * 3
    math = next(j for j in judgments if str(j["question_id"]) == "2" and j["turn"] == 1)
    assert math["judge_prompt"] == "single-math-v1" and math["judge_replies"] == [
        "It contradicts the reference. Rating: [[3]]"]
    graded = [last_user_text(r) for r in sent if r["model"] == "gpt-stub"]
    assert any("It is 4." in t and "What is 2+2?" in t for t in graded)  # reference-guided for math

    m = results["mt_bench"]
    assert m["categories"] == {"coding": 8.0, "math": 3.0, "writing": 7.0}
    assert m["turn_1"] == pytest.approx((8 + 3 + 8) / 3) and m["turn_2"] == pytest.approx((6 + 3) / 2)
    assert m["overall"] == pytest.approx((8 + 6 + 3 + 3 + 8) / 5)
    assert m["ungraded"] == {"unparseable_no_rating": 1} and results["judge"]["reasks"] == 2
    assert (tmp_path / "eval" / "mt_bench.png").read_bytes()[:4] == b"\x89PNG"
    shown = capsys.readouterr().err.splitlines()
    assert "MT-Bench judge: 6 turns" in shown and any(l.startswith("MT-Bench judge: turn 6/6 (100%)") for l in shown)

    again = run_evaluation(recipe)  # judge answers come from the cache
    assert again["judge"]["calls"] == 0 and again["mt_bench"] == m

    # 1 of 6 turns ungraded is too many for the default 5%: the job fails with the counts, the partial scores kept
    strict = recipe.model_copy(update={"max_ungraded_fraction": 0.05})
    with pytest.raises(UserError, match=r"^MT-Bench: 1 of 6 turns ungraded \(17%: \{'unparseable_no_rating': 1\}\), "
                                        r"above max_ungraded_fraction 0.05; the partial scores are in .*results.json$"):
        run_evaluation(strict)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["mt_bench"] == m

    # a quick run: the first question only
    first = run_evaluation(recipe.model_copy(update={"mt_bench": recipe.mt_bench.model_copy(update={"limit": 1})}))
    assert first["mt_bench"]["categories"] == {"writing": 7.0} and first["mt_bench"]["graded"] == 2


def test_alpaca_eval_randomizes_the_order_and_reports_both_win_rates(ray_session, stub, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from ray_zephyr.evaluation.run import run_evaluation

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(BASELINE))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    results = run_evaluation(_recipe(stub, tmp_path, alpaca_eval={"baseline": str(baseline)}, report_to=["mlflow"],
                                     project="eval-test"))
    pairs = [json.loads(line) for line in (tmp_path / "eval" / "alpaca_eval_judgments.jsonl").read_text().splitlines()]
    first = [p["model_first"] for p in pairs]
    assert 0 < sum(first) < len(first)  # both orders are shown
    a = results["alpaca_eval"]  # the judge always picks position A: the model wins exactly when shown first
    assert a["win_rate"] == pytest.approx(np.mean(first)) and a["pairs"] == 8 and a["ties"] == 0
    assert 0 < a["length_controlled_win_rate"] < 1
    # the scores and the judge's counts, as the tracker got them (read back through MLflow's client)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert run.data.metrics["alpaca_eval/win_rate"] == pytest.approx(a["win_rate"])
    assert run.data.metrics["alpaca_eval/length_controlled_win_rate"] == pytest.approx(a["length_controlled_win_rate"])
    assert run.data.metrics["judge/calls"] == results["judge"]["calls"] > 0
    assert run.data.params["alpaca_eval.baseline"] == str(baseline)
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["results.json"]


def test_length_controlled_win_rate_removes_the_length_effect():
    rng = np.random.default_rng(0)
    longer = rng.normal(1.0, 1.0, 4000)  # the model's answers are mostly longer, and the judge likes length
    wins = (rng.random(4000) < 1 / (1 + np.exp(-2 * longer))).astype(float)
    assert wins.mean() > 0.7 and length_controlled_win_rate(wins, longer * 100) == pytest.approx(0.5, abs=0.04)
    fair = (rng.random(4000) < 0.7).astype(float)  # wins that do not depend on length
    assert length_controlled_win_rate(fair, longer * 100) == pytest.approx(fair.mean(), abs=0.03)
    ties = np.array([1.0, 0.5, 0.0, 1.0])  # no length difference: the raw win rate
    assert length_controlled_win_rate(ties, np.zeros(4)) == pytest.approx(ties.mean(), abs=1e-6)


def test_verdict_parsing_and_judge_prompt_files(tmp_path):
    assert parse_score("Rating: [[7.5]]") == 7.5 and parse_score("rating [4]") == 4
    assert parse_verdict("after thought: [[B]]") == "B"
    for bad, reason in [("[[11]]", "rating_out_of_range"), ("seven", "no_rating")]:
        with pytest.raises(ValueError, match=reason):
            parse_score(bad)
    with pytest.raises(ValueError, match="conflicting_verdicts"):
        parse_verdict("[[A]] or [[B]]")
    assert set(load_judge_prompts(None, ("single-v1", "pair-v2"))) >= {"single-math-v1-multi-turn"}
    assert load_recipe("mt-bench-gpt4", kind=EvalRecipe).mt_bench.questions == "HuggingFaceH4/mt_bench_prompts"
    broken = tmp_path / "judge_prompts.jsonl"
    broken.write_text(json.dumps({"name": "single-v1", "system_prompt": "x"}) + "\n")
    with pytest.raises(UserError, match=r"row 0: missing field 'prompt_template'"):
        load_judge_prompts(str(broken), ("single-v1",))
    broken.write_text(json.dumps({"name": "single-v1", "system_prompt": "x", "prompt_template": "{question}"}) + "\n")
    with pytest.raises(UserError, match="no prompt named pair-v2"):
        load_judge_prompts(str(broken), ("pair-v2",))


def test_the_judge_is_checked_before_any_answer_is_generated(stub, tmp_path, monkeypatch):
    """A closed judge port and an unset key variable are one line before generation: no request reaches the
    candidate's endpoint (here the stub) first."""
    from ray_zephyr.evaluation.run import run_evaluation
    from ray_zephyr.runtime import free_ports

    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    recipe = _recipe(stub, tmp_path, mt_bench={"questions": str(questions)})
    closed = f"http://127.0.0.1:{free_ports()[0]}/v1"
    start = len(stub.requests)
    with pytest.raises(UserError, match=rf"^judge endpoint {closed} cannot be reached \(connection_error: .*\); is it running\?$"):
        run_evaluation(recipe.model_copy(update={"judge": recipe.judge.model_copy(update={"base_url": closed})}))
    monkeypatch.delenv("RZ_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match=r"environment variable RZ_NO_SUCH_KEY is not set"):
        run_evaluation(recipe.model_copy(update={"judge": recipe.judge.model_copy(update={"api_key_env": "RZ_NO_SUCH_KEY"})}))
    assert len(stub.requests) == start
