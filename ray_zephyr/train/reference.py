"""DPO reference log-probs precomputed in a Ray Data batch-inference pass, before training.

The reference is the frozen starting model, so its log-probs are a pure function of each row: computing
them once (on an actor pool, one model per actor) and carrying them as `ref_chosen_logps` /
`ref_rejected_logps` columns means no reference model sits beside the policy during training, and the
training step does one forward instead of two. It scores log-probs only (no token statistics), collates as
training does (padding-free with `train.padding_free`) and takes several training micro-batches of rows at a time.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from ray_zephyr.config import Recipe
from ray_zephyr.models import resolve_model_path
from ray_zephyr.train.deepspeed_setup import load_causal_lm
from ray_zephyr.train.objectives import DPOObjective
from ray_zephyr.train.padding_free import model_inputs
from ray_zephyr.train.scoring import TokenScorer, sequence_logps

# A forward without gradients keeps no activations and no optimizer state: it fits several training micro-batches.
MICRO_BATCHES_PER_REFERENCE_BATCH = 4


class ReferenceScorer:
    """Ray Data actor: adds the reference model's summed completion log-probs to each preference row."""

    def __init__(self, recipe: Recipe, model_path: str, pad_token_id: int):
        self.device = torch.device("cuda" if recipe.train.use_gpu else "cpu")
        self.model = TokenScorer(load_causal_lm(recipe, resolve_model_path(model_path), recipe.train.use_gpu))
        self.model.to(self.device).eval().requires_grad_(False)
        self.objective = DPOObjective(recipe, pad_token_id)  # collates as training does (padding-free with train.padding_free)

    @torch.no_grad()
    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = {k: v.to(self.device) for k, v in self.objective.collate(rows).items()}
        stats = self.model(**model_inputs(batch, "completion_mask"), token_stats=False)
        chosen, rejected = sequence_logps(stats, len(batch["lengths"]))
        return rows | {"ref_chosen_logps": chosen.float().cpu().numpy(), "ref_rejected_logps": rejected.float().cpu().numpy()}


def add_reference_logps(ds: ray.data.Dataset, recipe: Recipe, model_path: str, pad_token_id: int) -> ray.data.Dataset:
    """`ds` with reference log-prob columns, scored by up to num_workers actors (one GPU each on GPU clusters).

    The seeded sort before this leaves the rows in one block, which one actor would score alone while the others
    wait: blocks of one batch each (in order) spread the rows over the whole pool."""
    train = recipe.train
    batch_size = MICRO_BATCHES_PER_REFERENCE_BATCH * train.per_device_batch_size
    return ds.repartition(target_num_rows_per_block=batch_size).map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"recipe": recipe, "model_path": model_path, "pad_token_id": pad_token_id},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=train.num_workers),
        num_gpus=1 if train.use_gpu else 0,
        num_cpus=1,
    )
