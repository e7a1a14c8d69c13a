"""The Ray Train worker: data stream, steps, metrics, evaluation, checkpoints, resume, final save.

Each worker builds its own DeepSpeed engine (torch.distributed is already set up by Ray Train: gloo on
CPU, nccl on GPU), reads its rows in the deterministic order of `sampler.Layout`, and after each
checkpointed step records (epoch, step) in the checkpoint beside the ZeRO state. On resume (worker death
under FailureConfig, or the job started again with the same output) it loads both and continues at the
next global batch.

Side files in the output folder: `metrics.jsonl` (rank 0; a step logged twice across a restart appears
twice, the later line wins) and `samples/rank<r>.jsonl` (the sample ids of every step, with the attempt
that trained them: the audit trail behind "each sample exactly once per epoch").
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import ray.data
import ray.train
from ray.train import CheckpointConsistencyMode

from ray_zephyr.data.pipeline import iter_with_stall_timeout
from ray_zephyr.embedded import resolve_model_path
from ray_zephyr.train.engine import build_engine, build_reference, save_hf_model
from ray_zephyr.train.sampler import Layout, eval_layout
from ray_zephyr.train.step import Stepper, make_objective

CHECKPOINT_TAG = "zero"
FAULT_MARKER = ".fault-injected"


class Run:
    """One worker's view of a training run, built from the config the driver hands to every worker."""

    def __init__(self, config: dict):
        data_context = ray.data.DataContext.get_current()
        data_context.execution_options.preserve_order = True
        data_context.enable_progress_bars = False
        self.recipe = config["recipe"]
        self.train_ds, self.eval_ds = config["train"], config.get("eval")
        self.layout: Layout = config["layout"]
        self.eval_rows: int = config.get("eval_rows", 0)
        self.total_steps: int = config["total_steps"]
        self.output = Path(self.recipe.train.output_dir)
        self.fault_at_step: int = config.get("fault_at_step", 0)
        self.tokenizer = config["tokenizer"]
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.attempt = uuid.uuid4().hex[:8]

        model_path = resolve_model_path(config["model_path"])
        self.engine = build_engine(self.recipe, model_path, self.total_steps)
        reference = None
        if self.recipe.stage == "dpo" and self.recipe.dpo.reference == "resident":
            reference = build_reference(self.recipe, model_path)
        self.stepper = Stepper(self.engine, make_objective(self.recipe, self.tokenizer.pad_token_id, reference))
        self.epoch, self.step_in_epoch, self.global_step, self.num_tokens = 0, 0, 0, 0.0

    # -- data ----------------------------------------------------------------------------------
    def micro_batches(self, layout: Layout, ds, epoch: int, start_step: int, what: str):
        batches = layout.rank_rows(ds, epoch, self.rank, start_step).iter_batches(
            batch_size=layout.micro_batch, batch_format="numpy", drop_last=False
        )
        return iter_with_stall_timeout(batches, self.recipe.data.stall_timeout_s, what)

    # -- checkpoints ---------------------------------------------------------------------------
    def position(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "num_tokens": self.num_tokens}

    def resume(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # a fresh start: side files of an earlier run into this folder are not ours
            (self.output / "samples" / f"rank{self.rank}.jsonl").unlink(missing_ok=True)
            if self.rank == 0:
                (self.output / "metrics.jsonl").unlink(missing_ok=True)
            return
        with checkpoint.as_directory() as folder:
            _, client_state = self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        for key, value in client_state["position"].items():
            setattr(self, key, value)
        if self.step_in_epoch >= self.layout.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def report(self, metrics: dict, checkpoint: bool = False) -> None:
        """Report through Ray Train (a barrier: every worker calls it), with a ZeRO checkpoint if asked."""
        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"position": self.position()})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{self.global_step:08d}")
        # Wait until the controller has committed it: a worker that dies right after must resume from here.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    # -- side files ----------------------------------------------------------------------------
    def append(self, path: Path, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, split: str, metrics: dict) -> None:
        if self.rank == 0:
            self.append(self.output / "metrics.jsonl",
                        {"split": split, "step": self.global_step, "epoch": self.epoch, **metrics, "time": time.time()})

    def maybe_inject_fault(self) -> None:
        """Testing aid (RAY_ZEPHYR_FAULT_AT_STEP): the last worker dies once, after the given global step."""
        marker = self.output / FAULT_MARKER
        if self.fault_at_step and self.global_step == self.fault_at_step and self.rank == self.world_size - 1:
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(self.attempt)
                os._exit(1)

    # -- the loop ------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        if self.eval_ds is None or not self.eval_rows:
            return {}
        layout = eval_layout(self.eval_rows, self.layout.micro_batch, self.world_size)
        metrics = self.stepper.evaluate(self.micro_batches(layout, self.eval_ds, 0, 0, "eval data"))
        self.log_metrics("eval", metrics)
        return metrics

    def train(self) -> dict:
        train = self.recipe.train
        self.resume()
        last: dict = {}
        while self.epoch < train.epochs and self.global_step < self.total_steps:
            batches = self.micro_batches(self.layout, self.train_ds, self.epoch, self.step_in_epoch, "train data")
            while self.step_in_epoch < self.layout.steps_per_epoch and self.global_step < self.total_steps:
                rows = [next(batches) for _ in range(self.layout.accumulation)]
                last = self.stepper.train_step(rows)
                self.step_in_epoch += 1
                self.global_step += 1
                self.num_tokens += last["step_tokens"]
                last |= {"num_tokens": self.num_tokens, "epoch": self.epoch + self.step_in_epoch / self.layout.steps_per_epoch}
                self.append(self.output / "samples" / f"rank{self.rank}.jsonl",
                            {"attempt": self.attempt, "epoch": self.epoch, "step": self.global_step,
                             "sample_ids": [int(i) for r in rows for i in r["sample_id"]]})
                self.maybe_inject_fault()
                self.after_step(last)
            if self.step_in_epoch >= self.layout.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
        final = self.evaluate()
        save_hf_model(self.engine, self.tokenizer, self.output / "model", self.rank)
        summary = {**{k: v for k, v in last.items()}, **final, "step": self.global_step}
        ray.train.report(summary)
        return summary

    def after_step(self, metrics: dict) -> None:
        train, step = self.recipe.train, self.global_step
        logging = step % train.log_every_steps == 0 or step == self.total_steps
        checkpointing = train.checkpoint_every_steps > 0 and step % train.checkpoint_every_steps == 0
        evaluating = train.eval_every_steps > 0 and step % train.eval_every_steps == 0 and step < self.total_steps
        if logging:
            self.log_metrics("train", metrics)
        report = dict(metrics, step=step)
        if evaluating:
            report |= self.evaluate()
        if logging or checkpointing or evaluating:
            self.report(report, checkpoint=checkpointing)


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    Run(config).train()
