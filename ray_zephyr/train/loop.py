"""The training loop every Ray Train worker runs: read it top to bottom.

    set up   the DeepSpeed engine (+ a resident reference for DPO), the numbered rows, the run's side files;
             resume from Ray Train's latest checkpoint if there is one
    loop     each global step: this worker's micro-batches -> forward, loss, backward, optimizer step
             (`step.train_step`) -> audit the samples -> log -> evaluate -> checkpoint
    finish   a last evaluation, the consolidated model (a LoRA run: the adapter) published to
             <output_dir>/model (+ <output_dir>/merged on request), the summary written to
             <output_dir>/summary.json (the driver reads it from there)

torch.distributed is set up by Ray Train (gloo on CPU, nccl on GPU) before this runs. Which rows a worker
trains on at each step is `rows.Layout`'s business; what a checkpoint holds is `checkpoint`'s.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid

import ray.train
import transformers

from ray_zephyr import storage
from ray_zephyr.models import resolve_model_path
from ray_zephyr.prefetch import iter_with_stall_timeout
from ray_zephyr.tracking import Trackers
from ray_zephyr.train import checkpoint, faults
from ray_zephyr.train.deepspeed_setup import (
    build_engine,
    build_reference,
    save_hf_model,
    save_merged,
)
from ray_zephyr.train.objectives import make_objective
from ray_zephyr.train.plan import WorkerPlan
from ray_zephyr.train.rows import RowFile, eval_layout
from ray_zephyr.train.run_files import RunFiles
from ray_zephyr.train.step import collated, eval_metrics, train_step


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker; `config` is `{"plan": WorkerPlan}` from `launch.run_training`."""
    plan: WorkerPlan = config["plan"]
    if plan.ray_log_level != "INFO":  # quiet: Ray Train's worker lines off, and INFO lines of any library (Ray
        # Train logs "Reporting training result" per rank through a logger named by its file, under the root logger)
        logging.getLogger("ray.train").setLevel(plan.ray_log_level)
        logging.getLogger().setLevel(logging.WARNING)
        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" at each save
    recipe, layout, total_steps = plan.recipe, plan.layout, plan.total_steps
    train, output_dir = recipe.train, plan.output_dir
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    attempt = uuid.uuid4().hex[:8]

    # -- set up ------------------------------------------------------------------------------------
    if train.staging_dir:  # checkpoints and the model are staged here (tempfile), before they are uploaded
        os.makedirs(train.staging_dir, exist_ok=True)
        os.environ["TMPDIR"] = tempfile.tempdir = train.staging_dir
    model_path = resolve_model_path(plan.model_path)
    engine = build_engine(recipe, model_path, total_steps)
    resident = recipe.stage == "dpo" and recipe.dpo.reference == "resident"
    reference = build_reference(recipe, resolve_model_path(plan.reference_path), engine) if resident else None
    objective = make_objective(recipe, plan.tokenizer.pad_token_id, reference)
    train_rows = RowFile(plan.train_rows)
    eval_rows = RowFile(plan.eval_rows) if plan.eval_rows else None
    resumed = checkpoint.load(engine, rank)
    position, fetched = resumed or (checkpoint.Position(), [])
    trackers = Trackers(recipe, output_dir, resumed is not None, plan.tracker_env) if rank == 0 and train.report_to \
        else None
    files = RunFiles(output_dir, rank, attempt, resumed=resumed is not None, trackers=trackers)
    files.describe_worker(engine, resumed_from_step=position.global_step if resumed else None, fetched=fetched)

    def micro_batches(rows: RowFile, steps: list[list], what: str):
        """Collated micro-batches of `steps` (each a list of arrays of sample ids), prepared ahead in a
        background thread."""
        batches = collated(objective, rows.micro_batches(ids for step in steps for ids in step), train.use_gpu)
        return iter_with_stall_timeout(batches, recipe.data.stall_timeout_s, what)  # a local row file: no cold start

    def run_eval() -> dict:
        if eval_rows is None:
            return {}
        order = eval_layout(plan.eval_size, layout.micro_batch, world_size)
        batches = micro_batches(eval_rows, order.rank_micro_batches(0, rank, 0, eval_rows.lengths, False), "eval data")
        metrics = eval_metrics(engine, objective, (batch for _, batch in batches))
        files.log("eval", position.global_step, position.epoch, metrics)
        return metrics

    # -- loop --------------------------------------------------------------------------------------
    metrics: dict = {}
    if train.eval_on_start and position.global_step == 0:
        run_eval()
        files.flush()
    while position.global_step < total_steps:
        if position.step_in_epoch == layout.steps_per_epoch:
            position.epoch, position.step_in_epoch = position.epoch + 1, 0
        steps = layout.rank_micro_batches(position.epoch, rank, position.step_in_epoch, train_rows.lengths,
                                          train.group_by_length)
        batches = micro_batches(train_rows, steps, "train data")
        for step_micro_batches in faults.after_steps(plan.fault, steps[: total_steps - position.global_step],
                                                     position.global_step, output_dir, attempt, rank == world_size - 1):
            step_ids, step_batches = zip(*[next(batches) for _ in step_micro_batches], strict=True)
            step = position.global_step + 1
            logged = step % train.log_every_steps == 0 or step == total_steps
            metrics = train_step(engine, objective, list(step_batches), token_stats=logged)
            position.step_in_epoch += 1
            position.global_step = step
            position.num_tokens += metrics["step_tokens"]
            metrics |= {"step": step, "num_tokens": position.num_tokens,
                        "epoch": position.epoch + position.step_in_epoch / layout.steps_per_epoch}
            files.record_samples(position.epoch, step, [i for ids in step_ids for i in ids])

            evaluating = train.eval_every_steps > 0 and step % train.eval_every_steps == 0 and step < total_steps
            checkpointing = train.checkpoint_every_steps > 0 and step % train.checkpoint_every_steps == 0
            if logged:
                files.log("train", step, position.epoch, metrics)
            report = dict(metrics) | (run_eval() if evaluating else {})
            if logged or evaluating or checkpointing:
                files.flush()
                if checkpointing:
                    checkpoint.save_and_report(engine, report, position, plan.fingerprint, rank)
                else:
                    ray.train.report(report)  # a barrier: every worker calls it

    # -- finish ------------------------------------------------------------------------------------
    final = run_eval()
    files.flush()
    save_hf_model(engine, plan.tokenizer, storage.join(output_dir, "model"), rank,
                  before_last_file=faults.mid_save(plan.fault, position.global_step, output_dir, attempt))
    if recipe.model.lora and recipe.model.lora.merge and rank == 0:
        save_merged(recipe, storage.join(output_dir, "model"), plan.tokenizer, storage.join(output_dir, "merged"))
    summary = metrics | final | {"step": position.global_step}
    files.write_summary(summary)
    if trackers:
        trackers.finish(storage.absolute(storage.join(output_dir, "model")))
    ray.train.report(summary)
