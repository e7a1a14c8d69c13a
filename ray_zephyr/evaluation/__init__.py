"""Evaluation of trained models.

Judged (an LLM grades the model's answers, `run.py`, the `jobs/evaluate.py` job): MT-Bench-style single-answer
grading (`mt_bench.py`) and AlpacaEval-style pairwise win rates (`alpaca_eval.py`). Judge-free: held-out
preference accuracy from log-probs (`preference_accuracy.py`) and greedy task accuracy checked by a verifier
function (`task_accuracy.py`), both run by `jobs/zephyr.py`.
"""
