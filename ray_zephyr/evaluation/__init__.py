"""Judged evaluation: MT-Bench-style single-answer grading and AlpacaEval-style pairwise win rates.

The judge-free check, held-out preference accuracy from log-probs, stays in `ray_zephyr.evaluate`.
"""
