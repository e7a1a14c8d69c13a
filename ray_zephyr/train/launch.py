"""The driver side of a training run: checks, data, reference pass, Ray Train TorchTrainer, summary.

Everything that can be wrong with a recipe is checked before any model is loaded or row is read:
model path, batch arithmetic, storage writability, the number of workers against the cluster, and a
local output path on a cluster whose nodes do not share it. Everything the run writes goes to
`train.output_dir` through `ray_zephyr.storage` (a local path or a URI), so the driver reads the results
from there, wherever the workers ran.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from ray_zephyr import storage, tracking
from ray_zephyr.config import Recipe
from ray_zephyr.errors import UserError
from ray_zephyr.models import check_model_source, load_tokenizer, resolve_model_path


@dataclass
class TrainResult:
    metrics: dict  # the last train metrics and the final evaluation (<output_dir>/summary.json)
    model_dir: str  # local path or URI
    metrics_file: str  # local path or URI
    checkpoint: str | None
    data_report: list[str]


def output_dir(recipe: Recipe) -> str:
    return storage.absolute(recipe.train.output_dir)


def storage_path(recipe: Recipe) -> str:
    return storage.absolute(recipe.train.storage_path or storage.join(recipe.train.output_dir, "ray"))


def check_storage(recipe: Recipe) -> None:
    """The output folder and the checkpoint storage (local folder or a URI pyarrow can open) must be writable."""
    import pyarrow

    for where in (output_dir(recipe), storage_path(recipe)):
        probe = storage.join(where, f".write-probe-{uuid.uuid4().hex[:8]}")
        try:
            storage.write_text(probe, "ok")
            fs, path = storage.filesystem(probe)
            fs.delete_file(path)
        except (OSError, pyarrow.ArrowException) as exc:
            raise UserError(f"cannot write to {where}: {str(exc).splitlines()[0]}") from None


def _needed(recipe: Recipe) -> tuple[str, int]:
    train = recipe.train
    return ("GPU", train.num_workers) if train.use_gpu else ("CPU", train.num_workers * train.cpus_per_worker)


def check_cluster(recipe: Recipe) -> None:
    """More workers than a fixed-size Ray can ever have is an error; a cluster we joined may still autoscale."""
    from ray_zephyr.runtime import fixed_size

    resource, count = _needed(recipe)
    have = ray.cluster_resources().get(resource, 0.0)
    if count > have and not fixed_size():
        print(f"waiting for the cluster to grow: {count} {resource}s asked, {have:g} now", flush=True)
    elif count > have:
        train = recipe.train
        per = "" if train.use_gpu or train.cpus_per_worker == 1 else f" x train.cpus_per_worker={train.cpus_per_worker}"
        raise UserError(
            f"train.num_workers={train.num_workers}{per} needs {count} {resource}s but the Ray cluster has {have:g}; "
            "lower train.num_workers" + ("" if train.use_gpu else " or start Ray with more --num-cpus")
        )


def check_shared_output(recipe: Recipe) -> None:
    """A local output path only works where every worker sees the same folder: one node running everything, or
    a folder every node mounts (train.shared_filesystem). Elsewhere rank 0 would write the model on its own
    node's disk, where the next job, the Serve replica and the driver never find it."""
    local = [p for p in (output_dir(recipe), storage_path(recipe)) if not storage.is_uri(p)]
    if not local or recipe.train.shared_filesystem:
        return
    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = next((n for n in nodes if n["NodeID"] == ray.get_runtime_context().get_node_id()), {"Resources": {}})
    resource, count = _needed(recipe)
    if len(nodes) > 1:
        why = f"the Ray cluster has {len(nodes)} nodes"
    elif here["Resources"].get(resource, 0) < count:
        why = f"this node has {here['Resources'].get(resource, 0):g} of the {count} {resource}s the workers need, so they run on nodes that join later"
    else:
        return
    raise UserError(f"{local[0]} is a local path but {why}: use a URI (s3://..., gs://...) for train.output_dir, or a "
                    "folder every node mounts with train.shared_filesystem=true")


def check_inputs(recipe: Recipe) -> None:
    """The model (and a DPO reference model) and the data sources exist and are readable: checked before Ray
    starts, too (nothing is read but file headers and folder listings)."""
    from ray_zephyr.data.sources import source_files

    check_model_source(recipe.model.name_or_path, "model.name_or_path")
    if recipe.dpo.reference_model:
        check_model_source(recipe.dpo.reference_model, "dpo.reference_model")
    for source in [*recipe.data.train, *recipe.data.eval]:
        if source.path != "embedded":
            source_files(source)


def preflight(recipe: Recipe) -> None:
    """Fail fast, with one line, before any compute is spent."""
    from ray_zephyr.train.deepspeed_setup import grad_accumulation_steps

    check_inputs(recipe)
    grad_accumulation_steps(recipe.train)
    tracking.check_installed(recipe.train.report_to)
    check_storage(recipe)
    check_cluster(recipe)
    check_shared_output(recipe)


def write_row_files(recipe: Recipe, tokenizer, reference_path: str) -> tuple[dict[str, int], list[str]]:
    """Tokenize (+ reference log-probs for DPO with a precomputed reference) and write the numbered rows of each
    split to <output_dir>/data/<split> (see `rows`); returns the row counts and the data report.

    The splits flow as one stream tagged by split (a union keeps its parts' order), so the reference pass loads
    its model once per actor for train and eval together: a second pool for eval loaded it again (~7 s for a tiny
    model on 2 cores, a minute for a 7B one)."""
    from ray_zephyr.data.pipeline import build_datasets
    from ray_zephyr.prefetch import iter_with_stall_timeout
    from ray_zephyr.train.rows import RowWriter

    prepared = build_datasets(recipe, tokenizer)
    splits = {"train": prepared.train} | ({"eval": prepared.eval} if prepared.eval is not None else {})
    stream = _tagged_union(splits)
    if recipe.stage == "dpo" and recipe.dpo.uses_reference and recipe.dpo.reference == "precomputed":
        from ray_zephyr.train.reference import add_reference_logps

        stream = add_reference_logps(stream, recipe, reference_path, tokenizer.pad_token_id)
    writers = {split: RowWriter(storage.join(output_dir(recipe), "data", split)) for split in ("train", "eval")}
    desirable = 0
    try:
        batches = iter_with_stall_timeout(stream.iter_batches(batch_format="pyarrow", batch_size=1024),
                                          recipe.data.stall_timeout_s, " and ".join(splits) + " data",
                                          recipe.data.start_timeout_s)
        for batch in batches:
            for split, writer in writers.items():
                part = batch.filter(pc.equal(batch.column(SPLIT), split)).drop_columns([SPLIT])
                if part.num_rows:
                    writer.write(part)
                if split == "train" and recipe.data_kind == "kto":
                    desirable += int(pc.sum(part.column("label")).as_py() or 0)
    finally:
        counts = {split: writer.close() for split, writer in writers.items()}
    lines = prepared.report().lines()
    if recipe.data_kind == "kto":
        from ray_zephyr.train.objectives import kto_balance

        lines.append(kto_balance(desirable, counts["train"] - desirable, recipe.dpo))
    if recipe.stage == "dpo":
        dpo = recipe.dpo
        lines.append(f"reference: {dpo.reference}, {dpo.reference_model or 'the starting model'}" if dpo.uses_reference
                     else f"reference: none ({dpo.losses[0][0]} is reference-free: no reference pass)")
    return counts, lines


SPLIT = "split"  # the column that tags each row of `_tagged_union` with its split


def _tag(table: pa.Table, split: str) -> pa.Table:
    return table.append_column(SPLIT, pa.array([split] * table.num_rows, pa.string()))


def _tagged_union(splits: dict[str, ray.data.Dataset]) -> ray.data.Dataset:
    """The splits' rows as one dataset, in order, each with its split's name in the `split` column."""
    tagged = [ds.map_batches(functools.partial(_tag, split=split), batch_format="pyarrow")
              for split, ds in splits.items()]
    return tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]


def _absolute(model: str) -> str:
    """A local folder as an absolute path (the workers may run elsewhere); `embedded`, hub ids and URIs as given."""
    return str(Path(model).resolve()) if model != "embedded" and not storage.is_uri(model) and Path(model).exists() \
        else model


def run_training(recipe: Recipe, on_start: Callable[[int], None] | None = None) -> TrainResult:
    """Run the recipe's stage on the current Ray cluster (see ray_zephyr.runtime.init_ray).

    `on_start(total_steps)` is called when the data is ready and training starts (e.g. to size a progress bar;
    the rank-0 worker appends each finished step to <output_dir>/samples/rank0.jsonl)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_zephyr.runtime import ray_log_level
    from ray_zephyr.train import checkpoint, faults
    from ray_zephyr.train.deepspeed_setup import grad_accumulation_steps
    from ray_zephyr.train.loop import train_loop
    from ray_zephyr.train.plan import WorkerPlan
    from ray_zephyr.train.rows import Layout, eval_layout
    from ray_zephyr.train.run_files import SUMMARY

    preflight(recipe)
    train, output = recipe.train, output_dir(recipe)
    model_path = _absolute(recipe.model.name_or_path)
    reference_path = _absolute(recipe.dpo.reference_model) if recipe.dpo.reference_model else model_path
    tokenizer = load_tokenizer(recipe)
    counts, data_report = write_row_files(recipe, tokenizer, resolve_model_path(reference_path))
    layout = Layout(counts["train"], train.per_device_batch_size, train.num_workers, grad_accumulation_steps(train),
                    recipe.seed, recipe.data.shuffle, train.micro_batch_tokens)
    if layout.steps_per_epoch == 0:
        raise UserError(f"{counts['train']} training rows cannot fill one global batch of {layout.global_batch}")
    evaluated = eval_layout(counts["eval"], train.per_device_batch_size, train.num_workers)
    if used := evaluated.steps_per_epoch * evaluated.global_batch:
        if used < counts["eval"]:  # every worker runs the same forwards under ZeRO-3: whole rounds only
            data_report.append(f"eval: {used} of the {counts['eval']} kept rows scored at each evaluation (whole "
                               f"rounds of {train.num_workers} workers x {train.per_device_batch_size} rows; "
                               f"{counts['eval'] - used} left out)")
    total_steps = layout.steps_per_epoch * train.epochs
    if train.max_steps > 0:
        total_steps = min(total_steps, train.max_steps)
    name = checkpoint.run_name(output)
    fingerprint = checkpoint.fingerprint(recipe, layout, counts["eval"])
    checkpoint.check_resumable(storage.join(storage_path(recipe), name), fingerprint, train.resume)
    plan = WorkerPlan(
        recipe=recipe, model_path=model_path, reference_path=reference_path, tokenizer=tokenizer, output_dir=output, layout=layout,
        total_steps=total_steps, fingerprint=fingerprint, train_rows=storage.join(output, "data", "train"),
        eval_rows=storage.join(output, "data", "eval") if counts["eval"] else None, eval_size=counts["eval"],
        tracker_env=tracking.tracker_env(train.report_to), fault=faults.planned(), ray_log_level=ray_log_level(),
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker} | (
                                         {"GPU": 1} if train.use_gpu else {}),
                                     placement_strategy=train.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(recipe),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    if on_start:
        on_start(total_steps)
    result = trainer.fit()
    return TrainResult(
        metrics=json.loads(storage.read_text(storage.join(output, SUMMARY)) or "{}"),
        model_dir=storage.join(output, "model"),
        metrics_file=storage.join(output, "metrics.jsonl"),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        data_report=data_report,
    )


def summary(result: TrainResult) -> str:
    keys = ("step", "loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies", "eval_mean_token_accuracy",
            "tokens/s")
    shown = ", ".join(f"{k}={result.metrics[k]:.4g}" for k in keys if k in result.metrics)
    return "\n".join([*result.data_report, f"final: {shown}", f"model: {result.model_dir}",
                      f"metrics: {result.metrics_file}"])


def main(stage: str, argv: list[str] | None = None) -> TrainResult:
    """`python jobs/<stage>.py --config <recipe> [key=value ...]`: joins the Ray cluster (or starts a local one)."""
    from ray_zephyr.cli import parse_recipe_args
    from ray_zephyr.progress import train_with_progress
    from ray_zephyr.runtime import init_ray

    recipe, _ = parse_recipe_args(f"Zephyr d{stage.upper()} on Ray Train + DeepSpeed", argv)
    if recipe.stage != stage:
        raise UserError(f"this is a {recipe.stage} recipe; run it with jobs/{recipe.stage}.py")
    check_inputs(recipe)  # a missing model or data file is one line, without the seconds a Ray start takes
    init_ray()
    result = train_with_progress(recipe, f"d{stage.upper()}")
    print(summary(result), flush=True)
    return result
