"""AlpacaEval style: the model's answer against a baseline's on each instruction, judged pairwise.

The two answers are shown in a random order per pair (seeded), since judges favour a position. Besides the
raw win rate (ties count half), the length-controlled win rate of AlpacaEval 2 in its simplest form: a
logistic regression of the judge's preference on the (standardized) length difference, read at zero
difference, i.e. the win rate the model would have if its answers were as long as the baseline's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from ray_zephyr.errors import UserError
from ray_zephyr.evaluation.config import EvalRecipe
from ray_zephyr.evaluation.judging import (
    judge_prompt_messages,
    load_judge_prompts,
    parse_verdict,
)
from ray_zephyr.llm.client import ChatClient
from ray_zephyr.llm.generate import generate
from ray_zephyr.progress import gather_shown
from ray_zephyr.seeding import seeded_rng

WIN = {"model": 1.0, "baseline": 0.0, "tie": 0.5}


def load_baseline(path: str, limit: int | None) -> list[dict]:
    """A json list of {instruction, output}: the baseline's answers (AlpacaEval's reference outputs format)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"AlpacaEval baseline {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"AlpacaEval baseline {path}: expected a non-empty JSON list of {{instruction, output}}")
    for i, row in enumerate(rows):
        for field in ("instruction", "output"):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise UserError(f"AlpacaEval baseline {path}, row {i}: field {field!r} must be a string")
    return rows[:limit]


def length_controlled_win_rate(wins: np.ndarray, length_diff: np.ndarray, l2: float = 1e-3) -> float:
    """P(win) at zero length difference from a logistic regression win ~ a + b * standardized length difference.

    Fitted with torch's L-BFGS on binary cross-entropy (ties are soft labels of 0.5); the small L2 penalty on
    the slope keeps it finite when wins are perfectly separated by length.
    """
    import torch

    x = torch.tensor(length_diff / (length_diff.std() or 1.0), dtype=torch.float64)
    y = torch.tensor(wins, dtype=torch.float64)
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(params[0] + params[1] * x, y) + l2 * params[1] ** 2
        value.backward()
        return value

    optimizer.step(loss)
    return float(torch.sigmoid(params[0]))


def answer_instructions(baseline: list[dict], recipe: EvalRecipe) -> dict[str, str | None]:
    spec = recipe.candidate.model_copy(update={"n": 1, "max_tokens": recipe.alpaca_eval.max_tokens})
    outs = generate([{"id": str(i), "messages": [{"role": "user", "content": row["instruction"]}]}
                     for i, row in enumerate(baseline)], spec, recipe.seed)
    return {i: o[0]["text"] for i, o in outs.items()}


async def judge_pairs(baseline: list[dict], answers: dict[str, str | None], recipe: EvalRecipe,
                      client: ChatClient) -> list[dict]:
    prompt = load_judge_prompts(recipe.alpaca_eval.judge_prompts, ("pair-v2",))["pair-v2"]

    async def one(i: int, row: dict) -> dict:
        answer = answers[str(i)]
        model_first = seeded_rng(recipe.seed, f"alpaca/{i}").random() < 0.5
        result = {"index": i, "instruction": row["instruction"], "output": answer, "model_first": model_first}
        if answer is None:
            return result | {"winner": None, "reason": "no_answer", "judge_prompt": None, "judge_replies": []}
        a, b = (answer, row["output"]) if model_first else (row["output"], answer)
        messages = judge_prompt_messages(prompt, question=row["instruction"], answer_a=a, answer_b=b)
        verdict, reason, replies = await client.ask(messages, parse_verdict, recipe.parse_retries, temperature=0.0,
                                                    max_tokens=recipe.judge_max_tokens)
        winner = None if verdict is None else "tie" if verdict == "C" else (
            "model" if (verdict == "A") == model_first else "baseline")
        return result | {"winner": winner, "reason": reason, "judge_prompt": "pair-v2", "judge_replies": replies}

    return await gather_shown("AlpacaEval judge", "pair", [one(i, row) for i, row in enumerate(baseline)])


def win_rates(judgments: list[dict], baseline: list[dict]) -> dict:
    judged = [j for j in judgments if j["winner"] is not None]
    if not judged:
        raise UserError(f"AlpacaEval: no pair could be judged ({dict(Counter(j['reason'] for j in judgments))})")
    wins = np.array([WIN[j["winner"]] for j in judged])
    length_diff = np.array([len(j["output"]) - len(baseline[j["index"]]["output"]) for j in judged], dtype=float)
    return {
        "win_rate": float(wins.mean()),
        "length_controlled_win_rate": length_controlled_win_rate(wins, length_diff),
        "pairs": len(judged),
        "wins": int((wins == 1).sum()), "ties": int((wins == 0.5).sum()), "losses": int((wins == 0).sum()),
        "unjudged": dict(Counter(j["reason"] for j in judgments if j["winner"] is None)),
    }
