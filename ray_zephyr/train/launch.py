"""The driver side of a training run: checks, data, reference pass, Ray Train TorchTrainer, summary.

Everything that can be wrong with a recipe is checked before any model is loaded or row is read:
model path, batch arithmetic, storage writability, and the number of workers against the cluster.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray

from ray_zephyr.config import Recipe
from ray_zephyr.embedded import resolve_model_path
from ray_zephyr.errors import UserError
from ray_zephyr.train.engine import grad_accumulation_steps
from ray_zephyr.train.sampler import Layout, number_rows

FAULT_ENV = "RAY_ZEPHYR_FAULT_AT_STEP"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class TrainResult:
    metrics: dict
    model_dir: Path
    metrics_file: Path
    checkpoint: str | None
    data_report: list[str]


def storage_path(recipe: Recipe) -> str:
    return recipe.train.storage_path or str(Path(recipe.train.output_dir).resolve() / "ray")


def check_model_path(recipe: Recipe) -> None:
    name = recipe.model.name_or_path
    if name == "embedded" or Path(name).exists():
        return
    if not HUB_ID.match(name):
        hint = " (run jobs/sft.py first: it writes <output_dir>/model)" if name.rstrip("/").endswith("model") else ""
        raise UserError(f"model.name_or_path {name!r} does not exist{hint}")


def check_storage(recipe: Recipe) -> None:
    """The output folder and the checkpoint storage (local folder or a URI pyarrow can open) must be writable."""
    import pyarrow.fs

    for where in (str(Path(recipe.train.output_dir).resolve()), storage_path(recipe)):
        probe = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(where) if "://" in where else (pyarrow.fs.LocalFileSystem(), where)
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(f"{root}/{probe}") as f:
                f.write(b"ok")
            fs.delete_file(f"{root}/{probe}")
        except (OSError, pyarrow.ArrowException) as exc:
            raise UserError(f"cannot write to {where}: {exc}") from None


def check_cluster(recipe: Recipe) -> None:
    """More workers than a fixed-size Ray can ever have is an error; a cluster we joined may still autoscale."""
    from ray_zephyr.runtime import fixed_size

    train = recipe.train
    resource, each = ("GPU", 1) if train.use_gpu else ("CPU", 1)
    have = ray.cluster_resources().get(resource, 0.0)
    if train.num_workers * each > have and not fixed_size():
        print(f"waiting for the cluster to grow: {train.num_workers * each:g} {resource}s asked, {have:g} now", flush=True)
    elif train.num_workers * each > have:
        raise UserError(
            f"train.num_workers={train.num_workers} needs {train.num_workers * each} {resource}s but the Ray cluster "
            f"has {have:g}; lower train.num_workers" + ("" if train.use_gpu else " or start Ray with more --num-cpus")
        )


def preflight(recipe: Recipe) -> None:
    """Fail fast, with one line, before any compute is spent."""
    check_model_path(recipe)
    grad_accumulation_steps(recipe.train)
    check_storage(recipe)
    check_cluster(recipe)


def prepare_data(recipe: Recipe, tokenizer, model_path: str):
    """Tokenized datasets (+ reference log-probs for DPO with a precomputed reference), materialized and numbered."""
    from ray_zephyr.data.pipeline import build_datasets

    prepared = build_datasets(recipe, tokenizer)
    datasets = {"train": prepared.train, "eval": prepared.eval}
    if recipe.stage == "dpo" and recipe.dpo.reference == "precomputed":
        from ray_zephyr.train.reference import add_reference_logps

        datasets = {k: ds and add_reference_logps(ds, recipe, model_path, tokenizer.pad_token_id)
                    for k, ds in datasets.items()}
    numbered = {k: number_rows(ds) if ds is not None else (None, 0) for k, ds in datasets.items()}
    return numbered, prepared.report().lines()


def run_training(recipe: Recipe, on_start: Callable[[int], None] | None = None) -> TrainResult:
    """Run the recipe's stage on the current Ray cluster (see ray_zephyr.runtime.init_ray).

    `on_start(total_steps)` is called when the data is ready and training starts (e.g. to size a progress bar;
    the rank-0 worker appends each finished step to <output_dir>/samples/rank0.jsonl)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_zephyr.data.tokenize import load_tokenizer
    from ray_zephyr.train.worker import train_worker

    preflight(recipe)
    train = recipe.train
    model_path = recipe.model.name_or_path
    if model_path != "embedded":
        model_path = str(Path(model_path).resolve()) if Path(model_path).exists() else model_path
    tokenizer = load_tokenizer(recipe)
    numbered, data_report = prepare_data(recipe, tokenizer, resolve_model_path(model_path))
    (train_ds, rows), (eval_ds, eval_rows) = numbered["train"], numbered["eval"]
    layout = Layout(rows, train.per_device_batch_size, train.num_workers, grad_accumulation_steps(train),
                    recipe.seed, recipe.data.shuffle)
    if layout.steps_per_epoch == 0:
        raise UserError(f"{rows} training rows cannot fill one global batch of {layout.global_batch}")
    total_steps = layout.steps_per_epoch * train.epochs
    if train.max_steps > 0:
        total_steps = min(total_steps, train.max_steps)
    output = Path(train.output_dir).resolve()
    config = {
        "recipe": recipe.model_copy(update={"train": train.model_copy(update={"output_dir": str(output)})}),
        "model_path": model_path, "tokenizer": tokenizer, "layout": layout, "total_steps": total_steps,
        "train": train_ds, "eval": eval_ds, "eval_rows": eval_rows,
        "fault_at_step": int(os.environ.get(FAULT_ENV, "0")),
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"GPU": 1, "CPU": 1} if train.use_gpu else {"CPU": 1}),
        run_config=RunConfig(
            name=output.name,
            storage_path=storage_path(recipe),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    if on_start:
        on_start(total_steps)
    result = trainer.fit()
    metrics_file = output / "metrics.jsonl"
    return TrainResult(
        metrics=last_metrics(metrics_file),
        model_dir=output / "model",
        metrics_file=metrics_file,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        data_report=data_report,
    )


def last_metrics(metrics_file: Path) -> dict:
    """The last train and eval records of metrics.jsonl, merged."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    out: dict = {}
    for split in ("train", "eval"):
        out |= next((r for r in reversed(records) if r["split"] == split), {})
    out.pop("split", None)
    return out


def summary(result: TrainResult) -> str:
    keys = ("step", "loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies", "eval_mean_token_accuracy",
            "tokens/s")
    shown = ", ".join(f"{k}={result.metrics[k]:.4g}" for k in keys if k in result.metrics)
    return "\n".join([*result.data_report, f"final: {shown}", f"model: {result.model_dir}",
                      f"metrics: {result.metrics_file}"])


def main(stage: str, argv: list[str] | None = None) -> TrainResult:
    """`python jobs/<stage>.py --config <recipe> [key=value ...]`: joins the Ray cluster (or starts a local one)."""
    from ray_zephyr.cli import parse_recipe_args
    from ray_zephyr.runtime import init_ray

    recipe, _ = parse_recipe_args(f"Zephyr d{stage.upper()} on Ray Train + DeepSpeed", argv)
    if recipe.stage != stage:
        raise UserError(f"this is a {recipe.stage} recipe; run it with jobs/{recipe.stage}.py")
    init_ray()
    result = run_training(recipe)
    print(summary(result), flush=True)
    return result
