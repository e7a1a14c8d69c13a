"""What the driver hands every Ray Train worker: one typed plan instead of a loose config dict.

The driver (`launch.run_training`) has checked the recipe, written the row files and laid out the steps; a worker
(`loop.train_loop`) needs only this to train its share and to resume where the run left off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from ray_zephyr.config import Recipe
from ray_zephyr.train.faults import Fault
from ray_zephyr.train.rows import Layout


@dataclass(frozen=True)
class WorkerPlan:
    recipe: Recipe
    model_path: str  # as the recipe names it (an absolute folder, `embedded`, a hub id, a URI): resolved on each node
    reference_path: str  # DPO's reference, named the same way: model_path unless dpo.reference_model
    tokenizer: PreTrainedTokenizerBase  # with the recipe's chat template and a pad token
    output_dir: str  # local path or URI: model, metrics, samples, summary
    layout: Layout  # which rows each worker trains on at each step
    total_steps: int
    fingerprint: dict  # what a checkpoint must match to be resumed (`checkpoint.fingerprint`)
    train_rows: str  # the train row file's folder
    eval_rows: str | None  # the eval row file's folder; None without an eval split
    eval_size: int  # rows in the eval row file
    tracker_env: dict = field(default_factory=dict)  # the driver's tracker settings (`tracking.tracker_env`)
    ray_log_level: str = "INFO"  # of Ray Train's own lines in the worker (`runtime.ray_log_level`)
    fault: Fault | None = None  # tests only (`faults`): where to make a worker die once
