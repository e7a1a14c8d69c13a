"""What a user relies on when a run is interrupted or laid out differently (2 CPU workers, ZeRO-3, fp32; slow: ~3 min;
a tiny Mistral, zephyr-7b's architecture: an LM head of its own, untied from the embeddings, a sliding window):

(a) a run whose worker is killed mid-run resumes from its checkpoint and ends with exactly the weights of the
    same run uninterrupted, each sample trained exactly once per epoch;
(b) 2 workers x accumulation 1 and 1 worker whose 16 rows per step are cut by a token budget into however
    many micro-batches fit (`train.micro_batch_tokens`) give the same weights (the loss is a mean over the global
    batch, however it is split);
(c) under ZeRO-3 each worker holds only its share of the parameters;
(d) the saved model equals DeepSpeed's own consolidation of the final checkpoint;
and a rerun into the same output with a different recipe is refused before any compute.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_zephyr.config import load_recipe
from ray_zephyr.errors import UserError
from ray_zephyr.train import checkpoint
from ray_zephyr.train.faults import FAULT_ENV
from ray_zephyr.train.launch import run_training, storage_path

pytestmark = pytest.mark.slow

# 72 rows = 4 global batches of 16 (8 left out per epoch), 2 epochs = 8 steps, checkpoints after steps 4 and 8.
RECIPE = ["data.train=[{path: embedded, split: train, rows: 72}]", "data.eval=[]", "train.epochs=2",
          "train.checkpoint_every_steps=4", "train.log_every_steps=2", "train.max_failures=1", "train.warmup_ratio=0"]


def _run(tmp_path, model_dir, name: str, *overrides: str):
    return run_training(load_recipe("tiny-sft", [*RECIPE, f"model.name_or_path={model_dir}",
                                                 f"train.output_dir={tmp_path / name}", *overrides]))


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.model_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, mistral_model_dir):
    tmp_path = tmp_path_factory.mktemp("runs")
    plain = _run(tmp_path, mistral_model_dir, "plain")
    # the same global batch 16 = 8 x 1 x 2, cut by a token budget of 100 into ~6 micro-batches per step (~450 tokens)
    one_worker = _run(tmp_path, mistral_model_dir, "one", "train.num_workers=1", "train.micro_batch_tokens=100")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, "after_step:6")  # after the step-4 checkpoint
        # set on the driver only (the workers already run): the run hands it to rank 0 wherever it lands
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        faulted = _run(tmp_path, mistral_model_dir, "faulted", "train.report_to=[tensorboard, mlflow]",
                       "train.project=resume-test")
    return tmp_path, plain, one_worker, faulted


def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(runs):
    tmp_path, plain, _, faulted = runs
    assert (tmp_path / "faulted" / ".fault-injected").is_file()
    assert faulted.metrics["step"] == plain.metrics["step"] == 8
    expected, got = _weights(plain), _weights(faulted)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resumed_run_trains_each_sample_exactly_once_per_epoch(runs):
    tmp_path, *_ = runs
    records = defaultdict(list)  # (rank, step) -> one record per attempt that trained it, in order
    for rank in (0, 1):
        for line in (tmp_path / "faulted" / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            records[(rank, r["step"])].append(r)
    assert {step for (_, step), rs in records.items() if len(rs) > 1} == {5, 6}  # redone after the step-4 checkpoint
    for rs in records.values():
        assert all(r["sample_ids"] == rs[0]["sample_ids"] for r in rs)
    epochs = [[i for (_, step), rs in sorted(records.items()) if (step - 1) // 4 == e for i in rs[-1]["sample_ids"]]
              for e in (0, 1)]
    for seen in epochs:
        assert len(seen) == 64 and len(set(seen)) == 64
    assert epochs[0] != epochs[1]  # each epoch in its own order
    workers = [json.loads((tmp_path / "faulted" / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["resumed_from_step"] for w in workers] == [4, 4]


def test_two_workers_and_one_worker_with_a_token_budget_agree(runs):
    tmp_path, plain, one_worker, _ = runs
    expected, got = _weights(plain), _weights(one_worker)
    for name in expected:
        # summation order differs (6 micro-batches vs 2 workers): fp noise, mostly ~1e-6, up to ~1.4e-5 where Adam
        # divides a near-zero gradient by its near-zero second moment; one wrong optimizer step (an update is
        # ~lr = 3e-3) or a mis-weighted micro-batch would move weights by orders of magnitude more
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=5e-5, msg=name)
    assert plain.metrics["loss"] == pytest.approx(one_worker.metrics["loss"], rel=1e-4)
    logged = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["micro_batches"] > 2 for m in logged if m["split"] == "train")  # the budget's cut, not 8 x 2 rows


def test_zero3_partitions_the_parameters_across_workers(runs):
    tmp_path, *_ = runs
    workers = [json.loads((tmp_path / "plain" / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = workers[0]["parameters"]
    assert total == sum(p.numel() for p in _weights(runs[1]).values())
    for w in workers:  # half each, up to ZeRO's padding of each partition
        assert total / 2 <= w["parameters_held"] <= total / 2 + 1000
    single = json.loads((tmp_path / "one" / "workers" / "rank0.json").read_text())
    assert single["parameters_held"] == total


def test_saved_model_equals_deepspeed_consolidation_of_the_last_checkpoint(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, plain, _, _ = runs
    assert plain.checkpoint.endswith("step_00000008")
    consolidated = get_fp32_state_dict_from_zero_checkpoint(plain.checkpoint, tag=checkpoint.TAG)
    saved = _weights(plain)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(plain.model_dir).state_dict()
    assert "lm_head.weight" in saved and not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    assert set(reloaded) <= {k.removeprefix("lm.") for k in consolidated}
    for name, tensor in consolidated.items():
        name = name.removeprefix("lm.")
        if name in saved:
            assert torch.equal(saved[name], tensor), name


def test_rerun_with_another_recipe_is_refused_and_fresh_start_deletes(runs, mistral_model_dir):
    tmp_path, plain, *_ = runs
    with pytest.raises(UserError, match=r"has checkpoints of a different run \(train.lr: 0.003 -> 0.001\)"):
        _run(tmp_path, mistral_model_dir, "plain", "train.lr=1e-3")
    recipe = load_recipe("tiny-sft", [*RECIPE, f"train.output_dir={tmp_path / 'plain'}"])
    run_dir = f"{storage_path(recipe)}/{checkpoint.run_name(str(tmp_path / 'plain'))}"
    assert Path(run_dir, "step_00000008", checkpoint.FINGERPRINT_FILE).is_file()
    checkpoint.check_resumable(run_dir, {"anything": 1}, "fresh")
    assert not Path(run_dir).exists()


def test_run_names_are_unique_per_output_path():
    a, b = checkpoint.run_name("/data/team-a/sft"), checkpoint.run_name("/data/team-b/sft")
    assert a.startswith("sft-") and b.startswith("sft-") and a != b
    assert checkpoint.run_name("s3://bucket/x/sft") != checkpoint.run_name("s3://other/x/sft")


def _per_step(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """metrics.jsonl's train lines by step: the first and the last line of each (a step redone after the restart
    has two)."""
    lines = [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]
    return {r["step"]: r for r in reversed(lines)}, {r["step"]: r for r in lines}


def test_trackers_hold_each_logged_step_once_across_the_restart(runs):
    """MLflow (a local sqlite store, read back with its client) and TensorBoard (event files, read back with
    tensorboard's reader): one run each, continued after the restart, every metric at every logged step equal to
    metrics.jsonl's, each step once; the recipe as MLflow parameters, the model's URI and metrics.jsonl at the end."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, *_ = runs
    out = tmp_path / "faulted"
    # the trackers keep the first attempt's line of step 6; the redone step computes the same (only timings differ)
    expected, redone = _per_step(out / "metrics.jsonl")
    assert sorted(expected) == [2, 4, 6, 8]
    names = ["loss", "grad_norm", "lr", "tokens/s", "num_tokens", "mean_token_accuracy"]
    for name in ("loss", "grad_norm", "num_tokens", "mean_token_accuracy"):
        assert redone[6][name] == pytest.approx(expected[6][name], rel=1e-6), name

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "faulted" and run.info.status == "FINISHED"
    for name in names:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [2, 4, 6, 8], name
        assert [m.value for m in history] == pytest.approx([expected[m.step][name] for m in history], rel=1e-6), name
    assert run.data.params["train.lr"] == "0.003" and run.data.params["stage"] == "sft"
    assert run.data.tags["model_uri"] == str(out / "model")
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path) and (artifacts / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name in names:
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [2, 4, 6, 8], name
        assert [e.value for e in scalars] == pytest.approx([expected[e.step][name] for e in scalars], rel=1e-6), name


def test_a_local_ray_runs_no_preemption_watcher(runs):
    """Ray Train's preemption watcher (an actor per run) polls for nodes being drained, as a cluster's spot nodes
    are; a local Ray's one node is the machine itself, so `ray_zephyr.runtime` turns it off there."""
    from ray._private import state

    assert not [a for a in state.actors().values() if "PreemptionWatcher" in a["ActorClassName"]]
