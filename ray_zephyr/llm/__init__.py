"""The LLM-call layer that AI feedback and evaluation share: endpoint and generator configs, the chat client
with its on-disk request cache, and K completions per prompt as a Ray Data pass.

It knows nothing of AI feedback or evaluation (neither `ray_zephyr.aif` nor `ray_zephyr.evaluation` is imported
here); both build on it.
"""
