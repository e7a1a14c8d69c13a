"""MT-Bench style: 80 two-turn questions, answers sampled at the original protocol's per-category temperatures,
each turn graded 1-10 by a judge (reference-guided for math, reasoning and coding when references exist).

Questions come from the hub (`HuggingFaceH4/mt_bench_prompts`: prompt, prompt_id, category, reference) or a local
jsonl (FastChat's question.jsonl: question_id, category, turns, reference), both read by ray_zephyr.data.sources.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from statistics import mean

from ray_zephyr.config import SourceConfig
from ray_zephyr.data.sources import read_rows, resolve_source
from ray_zephyr.data.validate import Invalid
from ray_zephyr.errors import UserError
from ray_zephyr.evaluation.config import EvalRecipe
from ray_zephyr.evaluation.judging import (
    judge_prompt_messages,
    load_judge_prompts,
    parse_score,
)
from ray_zephyr.llm.client import ChatClient
from ray_zephyr.llm.generate import generate
from ray_zephyr.progress import gather_shown

# FastChat's `temperature_config` (fastchat/llm_judge/common.py): the original protocol's sampling per category.
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
NEED_REFERENCE = ("math", "reasoning", "coding")
PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")


def _question(row: object, where: str) -> dict:
    if isinstance(row, Invalid):  # a line that is not JSON
        raise UserError(f"MT-Bench questions {where}: {row}")
    if not isinstance(row, dict):
        raise UserError(f"MT-Bench questions {where}: expected an object, got {type(row).__name__}")
    turns = row.get("turns", row.get("prompt"))
    if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, str) for t in turns):
        raise UserError(f"MT-Bench questions {where}: `turns` (or `prompt`) must be a list of two strings "
                        f"(fields: {', '.join(sorted(row)) or 'none'})")
    reference = [r for r in (row.get("reference") or []) if r]
    return {"question_id": str(row.get("question_id", row.get("prompt_id", where))),
            "category": str(row.get("category", "general")), "turns": turns, "reference": reference}


def load_questions(source: str, revision: str | None = None) -> list[dict]:
    """Questions from a local file (FastChat's question.jsonl) or a hub dataset's train split at `revision`
    (HuggingFaceH4/mt_bench_prompts is parquet: prompt, prompt_id, category, reference), read by the data layer."""
    try:
        resolved = resolve_source(SourceConfig(path=source, revision=revision), "prompts", 0)
        rows = list(read_rows(resolved))
    except UserError as exc:
        raise UserError(f"MT-Bench questions: {exc}") from None
    return [_question(row, f"{chunk.label}, row {i}") for chunk, i, row in rows]


def answer_questions(questions: list[dict], recipe: EvalRecipe) -> dict[str, list[str | None]]:
    """Both turns' answers per question id, the second turn answered with the first in the history."""
    spec = recipe.candidate.model_copy(update={"n": 1, "max_tokens": recipe.mt_bench.max_tokens})
    temperature = {q["question_id"]: CATEGORY_TEMPERATURE.get(q["category"], 0.7) for q in questions}
    first = generate([{"id": q["question_id"], "messages": [{"role": "user", "content": q["turns"][0]}],
                       "temperature": temperature[q["question_id"]]} for q in questions], spec, recipe.seed)
    answers = {qid: [outs[0]["text"]] for qid, outs in first.items()}
    second = generate([{"id": q["question_id"], "temperature": temperature[q["question_id"]], "messages": [
        {"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": answers[q["question_id"]][0]},
        {"role": "user", "content": q["turns"][1]}]} for q in questions if answers[q["question_id"]][0] is not None],
        spec, recipe.seed + 1)
    for qid in answers:
        answers[qid].append(second[qid][0]["text"] if qid in second else None)
    return answers


def _grading(question: dict, answers: list[str], turn: int, prompts: dict[str, dict]) -> tuple[str, list[dict]]:
    """(the judge prompt's name, the judge's messages) for one turn."""
    reference = question["category"] in NEED_REFERENCE and len(question["reference"]) >= turn
    q, a, ref = question["turns"], answers, question["reference"]
    if turn == 1:
        fields = {"question": q[0], "answer": a[0]} | ({"ref_answer_1": ref[0]} if reference else {})
        name = "single-math-v1" if reference else "single-v1"
        return name, judge_prompt_messages(prompts[name], **fields)
    fields = {"question_1": q[0], "answer_1": a[0], "question_2": q[1], "answer_2": a[1]}
    fields |= {"ref_answer_1": ref[0], "ref_answer_2": ref[1]} if reference else {}
    name = "single-math-v1-multi-turn" if reference else "single-v1-multi-turn"
    return name, judge_prompt_messages(prompts[name], **fields)


async def grade(questions: list[dict], answers: dict[str, list], recipe: EvalRecipe, client: ChatClient) -> list[dict]:
    """One judgment per (question, turn): `score` 1-10, or None with the `reason`."""
    prompts = load_judge_prompts(recipe.mt_bench.judge_prompts, PROMPT_NAMES)
    cases = [(q, turn) for q in questions for turn in (1, 2)]

    async def one(question: dict, turn: int) -> dict:
        got = answers[question["question_id"]]
        if got[turn - 1] is None:
            score, reason, prompt, replies = None, "no_answer", None, []
        else:
            prompt, messages = _grading(question, got, turn, prompts)
            score, reason, replies = await client.ask(messages, parse_score, recipe.parse_retries, temperature=0.0,
                                                      max_tokens=recipe.judge_max_tokens)
        return {"question_id": question["question_id"], "category": question["category"], "turn": turn,
                "answer": got[turn - 1], "score": score, "reason": reason, "judge_prompt": prompt,
                "judge_replies": replies}

    return await gather_shown("MT-Bench judge", "turn", [one(q, t) for q, t in cases])


def scores(judgments: list[dict]) -> dict:
    """Mean score per turn, per category (both turns) and overall, over the graded turns; drops by reason."""
    graded = [j for j in judgments if j["score"] is not None]
    if not graded:
        raise UserError(f"MT-Bench: no turn could be graded ({dict(Counter(j['reason'] for j in judgments))})")
    by = lambda key, value: [j["score"] for j in graded if j[key] == value]  # noqa: E731
    categories = sorted({j["category"] for j in graded})
    return {
        "overall": mean(j["score"] for j in graded),
        "turn_1": mean(by("turn", 1)) if by("turn", 1) else None,
        "turn_2": mean(by("turn", 2)) if by("turn", 2) else None,
        "categories": {c: mean(by("category", c)) for c in categories},
        "graded": len(graded),
        "ungraded": dict(Counter(j["reason"] for j in judgments if j["score"] is None)),
    }


def plot(result: dict, path: Path) -> None:
    """Bar chart of the per-category scores, the overall score as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = result["categories"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(list(categories), list(categories.values()), color="#4c72b0")
    ax.axhline(result["overall"], color="#c44e52", linestyle="--", label=f"overall {result['overall']:.2f}")
    ax.set_ylim(0, 10)
    ax.set_ylabel("judge score (1-10)")
    ax.set_title("MT-Bench by category")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
