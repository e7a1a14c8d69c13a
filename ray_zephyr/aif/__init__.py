"""AI feedback: completions from several models, rated by a teacher, binarized into preference pairs (UltraFeedback).

The LLM calls themselves (generators, the chat client, its cache) are `ray_zephyr.llm`, shared with evaluation.
"""
