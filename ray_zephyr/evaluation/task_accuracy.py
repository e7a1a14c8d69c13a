"""Greedy task accuracy: the share of held-out prompts a model answers right, checked by a verifier function.

Preference accuracy (log-probs of given answers) can rise while the answers a user sees get worse; this is
the check on what the model itself says. Answers are greedy (temperature 0) through the same Ray Data
generation pass as AI feedback.
"""

from __future__ import annotations

from ray_zephyr.llm.config import GeneratorConfig
from ray_zephyr.llm.functions import load_function
from ray_zephyr.llm.generate import generate


def greedy_task_accuracy(model_dir: str, prompts: list[dict], verifier: str, max_tokens: int = 32,
                         seed: int = 0) -> float:
    """`prompts`: `{id, messages}`; `verifier`: "module:function"(messages, answer) -> score in [0, 1]."""
    check = load_function(verifier)
    spec = GeneratorConfig(name="greedy", kind="transformers", model=model_dir, n=1, temperature=0.0,
                           max_tokens=max_tokens, batch_size=64)
    answers = generate([{**p, "temperature": 0.0} for p in prompts], spec, seed)
    by_id = {p["id"]: p["messages"] for p in prompts}
    return sum(check(by_id[i], outs[0]["text"] or "") for i, outs in answers.items()) / len(prompts)
