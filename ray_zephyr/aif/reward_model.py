"""A reward-model judge: a sequence-classification reward model scores each (prompt, completion) in Ray Data actors.

The iterative DPO recipes rank the policy's own samples this way (PairRM for Snorkel's, ArmoRM and Skywork-Reward
for RLHFlow's): one forward per completion, no generation and no parsing, so it is cheap enough to rate n samples
of every prompt each round. The conversation is rendered with the reward model's own chat template, as its model
card scores it, and the score is the first logit at the last token (transformers' `...ForSequenceClassification`
head). A conversation longer than `max_length` tokens is counted (`reward_model_input_too_long`), never cut: a cut
answer would be scored as a different answer.
"""

from __future__ import annotations

import json

import numpy as np
import ray

from ray_zephyr.aif.config import JudgeConfig

TOO_LONG = "reward_model_input_too_long"


class RewardScorer:
    """Ray Data actor: a batch of conversations (JSON) -> the reward model's score of each (NaN: too long)."""

    def __init__(self, model: str, max_length: int, use_gpu: bool):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ray_zephyr.models import resolve_model_path
        from ray_zephyr.runtime import quiet_model_loading

        quiet_model_loading()
        folder = resolve_model_path(model, "judge.model")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.bfloat16 if use_gpu else torch.float32).to(self.device).eval()
        if self.model.config.pad_token_id is None:  # the head finds each row's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ids = [self.tokenizer.apply_chat_template(json.loads(c), tokenize=True, return_dict=True)["input_ids"]
               for c in batch["conversation"]]
        fits = [i for i, row in enumerate(ids) if len(row) <= self.max_length]
        scores = np.full(len(ids), np.nan, dtype=np.float64)
        if fits:
            padded = self.tokenizer.pad({"input_ids": [ids[i] for i in fits]}, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**{k: v.to(self.device) for k, v in padded.items()}).logits
            scores[fits] = logits[:, 0].float().cpu().numpy()
        return {"index": batch["index"], "score": scores}


def reward_scores(items: list[tuple[list[dict], str]], config: JudgeConfig) -> list[float | None]:
    """The reward model's score of each (prompt messages, completion), in order; None: too long to score."""
    if not items:
        return []
    rows = [{"index": i, "conversation": json.dumps([*prompt, {"role": "assistant", "content": answer}])}
            for i, (prompt, answer) in enumerate(items)]
    scored = ray.data.from_items(rows).map_batches(
        RewardScorer, fn_constructor_kwargs={"model": config.model, "max_length": config.max_length,
                                             "use_gpu": config.num_gpus > 0},
        batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_gpus=config.num_gpus, batch_format="numpy")
    scores: list[float | None] = [None] * len(items)
    for row in scored.iter_rows():
        scores[int(row["index"])] = None if np.isnan(row["score"]) else float(row["score"])
    return scores
