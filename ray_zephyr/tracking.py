"""Experiment trackers, TRL's `report_to`: rank 0 sends each line it writes to metrics.jsonl (same names, same steps,
train and eval) to the trackers the recipe names, the resolved recipe as the run's parameters, and at the end the
model's URI and metrics.jsonl itself. The AI-feedback and evaluation jobs report their summaries the same way
(`report_summary`): counts, drops by reason, judge calls, scores.

A tracker's own environment variables (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_TOKEN, ...)
are read on the driver and handed to the workers (`tracker_env`), so a job configured on the
driver logs to the same place from whichever node rank 0 lands on. A resumed run reopens the same tracker run (ids
kept in <output_dir>/trackers.json) and skips the steps the earlier attempt already logged, so each step appears
once. Each tracker is an optional extra, imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from ray_zephyr import storage
from ray_zephyr.config import flatten
from ray_zephyr.errors import UserError

# tracker -> (module it needs, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
ENV_PREFIXES = ("MLFLOW_", "TENSORBOARD_")
IDS_FILE = "trackers.json"
NOT_METRICS = {"split", "step", "time"}


def check_installed(report_to: list[str]) -> None:
    """Before any compute: each tracker asked for is importable, or a one-line error naming its extra."""
    for name in report_to:
        module, extra = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"train.report_to: {name} is not installed ({exc}): pip install 'ray-zephyr[{extra}]'") \
                from None


def tracker_env(report_to: list[str]) -> dict[str, str]:
    """The driver's tracker settings for the workers; MLflow's default store is resolved here, on the driver (a
    worker's working directory is a Ray session folder)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    if "mlflow" in report_to:
        import mlflow

        uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db here)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
        env["MLFLOW_TRACKING_URI"] = uri
    return env


class Trackers:
    """Rank 0's open tracker runs for one training run."""

    def __init__(self, recipe, output_dir: str, resumed: bool, env: dict[str, str]):
        os.environ.update(env)
        train = recipe.train
        self.output_dir = output_dir
        self.ids_path = storage.join(output_dir, IDS_FILE)
        ids = json.loads(storage.read_text(self.ids_path) or "{}") if resumed else {}
        self.logged = _logged_steps(storage.join(output_dir, "metrics.jsonl")) if resumed else set()
        name = train.run_name or storage.absolute(output_dir).rstrip("/").rsplit("/", 1)[-1]
        project = train.project or "ray-zephyr"
        params = _flatten(recipe.model_dump(mode="json"))
        self.runs = [OPENERS[t](name, project, params, ids.get(t), output_dir) for t in train.report_to]
        storage.write_text(self.ids_path, json.dumps({t: r.run_id for t, r in zip(train.report_to, self.runs,
                                                                                  strict=True)}))

    def log(self, record: dict) -> None:
        if (record["split"], record["step"]) in self.logged:
            return  # logged by the attempt before the restart
        metrics = {k: float(v) for k, v in record.items()
                   if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)}
        for run in self.runs:
            run.log(metrics, record["step"])

    def finish(self, model_uri: str) -> None:
        metrics_file = storage.local_copy(storage.join(self.output_dir, "metrics.jsonl"))
        for run in self.runs:
            run.finish({"model_uri": model_uri}, metrics_file)


def report_summary(report_to: list[str], run_name: str | None, project: str | None, recipe, output_dir: str,
                   summary: dict, summary_file: str) -> None:
    """A job's summary as one tracker run per tracker: the recipe as parameters, every number in `summary` (nested
    keys joined by '/', e.g. `unrated/unparseable`) at step 0, and `summary_file` attached."""
    if not report_to:
        return
    os.environ.update(tracker_env(report_to))
    name = run_name or storage.absolute(output_dir).rstrip("/").rsplit("/", 1)[-1]
    params = _flatten(recipe.model_dump(mode="json"))
    metrics = {k: float(v) for k, v in _leaves(summary).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for tracker in report_to:
        run = OPENERS[tracker](name, project or "ray-zephyr", params, None, output_dir)
        run.log(metrics, 0)
        run.finish({"output_dir": storage.absolute(output_dir)}, summary_file)


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= _leaves(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def _logged_steps(metrics_path: str) -> set[tuple[str, int]]:
    return {(r["split"], r["step"]) for r in map(json.loads, (storage.read_text(metrics_path) or "").splitlines())}


def _flatten(tree: dict) -> dict[str, str]:
    """A recipe as tracker parameters: dotted keys, each value a string."""
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in flatten(tree).items()}


def _local_artifact_root() -> str | None:
    """Beside a local sqlite store, mlartifacts/ (as `mlflow server` puts it), rather than ./mlruns in the worker's
    working directory (a Ray session folder); a tracking server's own default otherwise."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


class TensorBoardRun:
    """Event files under <output_dir>/tensorboard (a local folder; under a URI output_dir, a local folder published
    there at the end), readable by `tensorboard --logdir`."""

    def __init__(self, name, project, params, run_id, output_dir):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id, self.dest = name, None
        local = storage.join(output_dir, "tensorboard")
        if storage.is_uri(output_dir):
            self.dest, local = local, str(storage.cache_root() / "tensorboard" / name)
        self.local = local
        self.writer = SummaryWriter(log_dir=local)
        if run_id is None:
            self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, tags, attachment):
        for key, value in tags.items():
            self.writer.add_text(key, value)
        self.writer.close()
        if self.dest:
            storage.publish_dir(self.local, self.dest)


class MLflowRun:
    """One MLflow run in the experiment `project` (or MLFLOW_EXPERIMENT_NAME), the recipe as its parameters."""

    def __init__(self, name, project, params, run_id, output_dir):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        if run_id is None:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                experiment_name, artifact_location=_local_artifact_root())
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            from mlflow.entities import Param

            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, metrics, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, tags, attachment):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.client.log_artifact(self.run_id, attachment)
        self.client.set_terminated(self.run_id)


OPENERS = {"tensorboard": TensorBoardRun, "mlflow": MLflowRun}
