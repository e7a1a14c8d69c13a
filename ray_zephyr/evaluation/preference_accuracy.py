"""Held-out preference accuracy of model folders, every model measured the same way.

A pair counts as right when the model gives the chosen completion a higher log-probability (summed over
its tokens) than the rejected one. This "implicit" accuracy needs no reference model, so the SFT model
and the DPO model are scored alike. DPO's own reward accuracy, beta * (log pi - log pi_ref) with the SFT
model as the reference, comes from the same numbers. The log-probs are computed by the training code's
reference pass (`ReferenceScorer`): the same tokenization, collation and scoring as training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from ray_zephyr.config import Recipe
from ray_zephyr.errors import UserError


@dataclass(frozen=True)
class PairScores:
    """Summed completion log-probs of one model, one entry per held-out pair (in a fixed order)."""

    chosen: np.ndarray
    rejected: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.chosen > self.rejected))

    @property
    def margin(self) -> float:
        return float(np.mean(self.chosen - self.rejected))


@dataclass(frozen=True)
class PreferenceEval:
    """The SFT model and the DPO model on the same held-out pairs."""

    sft: PairScores
    dpo: PairScores
    beta: float

    @property
    def pairs(self) -> int:
        return len(self.sft.chosen)

    def rewards(self) -> tuple[np.ndarray, np.ndarray]:
        """DPO's implicit rewards of (chosen, rejected), the SFT model being the reference."""
        return self.beta * (self.dpo.chosen - self.sft.chosen), self.beta * (self.dpo.rejected - self.sft.rejected)

    @property
    def reward_accuracy(self) -> float:
        chosen, rejected = self.rewards()
        return float(np.mean(chosen > rejected))

    @property
    def reward_margin(self) -> float:
        chosen, rejected = self.rewards()
        return float(np.mean(chosen - rejected))


@ray.remote
def score_pairs(batches: list[dict], recipe: Recipe, model_dirs: list[str], pad_token_id: int) -> list[PairScores]:
    """Each model's log-probs of every pair, in the order of `batches`. One Ray task for all models: on a GPU
    cluster it gets a GPU (see `evaluate_preferences`), on a laptop it costs one worker process, no actor pool."""
    from ray_zephyr.train.reference import ReferenceScorer

    out = []
    for model_dir in model_dirs:
        scorer = ReferenceScorer(recipe, model_dir, pad_token_id)
        scored = [scorer(dict(batch)) for batch in batches]
        out.append(PairScores(np.concatenate([b["ref_chosen_logps"] for b in scored]),
                              np.concatenate([b["ref_rejected_logps"] for b in scored])))
    return out


def evaluate_preferences(recipe: Recipe, sft_dir: str, dpo_dir: str) -> PreferenceEval:
    """Score the DPO recipe's held-out pairs (its eval data) with the SFT model and with the DPO model."""
    from ray_zephyr.data.pipeline import build_datasets
    from ray_zephyr.models import load_tokenizer

    if recipe.data_kind != "dpo":
        raise UserError(f"preference evaluation needs a dpo recipe trained on pairs, got a {recipe.data_kind} recipe")
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": sft_dir})})
    tokenizer = load_tokenizer(recipe)
    pairs = build_datasets(recipe, tokenizer).eval
    if pairs is None:
        raise UserError("the dpo recipe has no held-out pairs to evaluate on; set data.eval or data.eval_fraction")
    batches = list(pairs.iter_batches(batch_size=recipe.train.per_device_batch_size, batch_format="numpy"))
    task = score_pairs.options(num_gpus=1 if recipe.train.use_gpu else 0)
    sft, dpo = ray.get(task.remote(batches, recipe, [sft_dir, dpo_dir], tokenizer.pad_token_id))
    return PreferenceEval(sft=sft, dpo=dpo, beta=recipe.dpo.beta)
