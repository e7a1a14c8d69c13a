"""Iterative on-policy DPO (ray_zephyr/iterative.py) for real: 2 rounds of generate (the policy in a Ray Data actor)
-> judge -> binarize -> dDPO (Ray Train, DeepSpeed ZeRO-3), crashed in round 2's judging and again in its dDPO,
resumed each time without redoing what finished; the dSFT model as every round's reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.ipc as ipc
import pytest

from ray_zephyr.embedded import verify
from ray_zephyr.errors import UserError

CRASH_ENV = "RZ_TEST_JUDGE_CRASHES"  # an environment variable: the judge runs from its own import of this module


def judge(prompt: list[dict], completion: str) -> float:
    """The task's verifier, made to crash (as a lost judge process would) while it is armed."""
    if os.environ.get(CRASH_ENV):
        raise RuntimeError("judge crashed")
    return verify(prompt, completion)


@pytest.fixture(scope="module")
def rounds_recipe(embedded_model_dir, tmp_path_factory):
    from ray_zephyr.iterative import IterativeRecipe

    return IterativeRecipe(
        rounds=2, policy=str(embedded_model_dir), aif="tiny-aif", dpo="tiny-dpo", prompts="fresh", reference="sft",
        aif_overrides=["prompts=[{path: embedded, split: train, rows: 48}]", "generators.0.n=2",
                       "generators.0.max_tokens=8", "generators.0.concurrency=1",
                       "judge.function=tests.test_iterative:judge"],
        dpo_overrides=["data.eval=[{path: embedded, split: test, rows: 16}]", "train.num_workers=1",
                       "train.max_steps=2", "train.global_batch_size=8", "train.per_device_batch_size=8",
                       "train.log_every_steps=1", "train.eval_every_steps=0", "train.group_by_length=false"],
        verifier="ray_zephyr.embedded:verify", output_dir=str(tmp_path_factory.mktemp("iterative")))


def _scorer_actors() -> set[str]:
    """The reference-scoring actors the session's Ray has ever started (from its GCS: no dashboard here)."""
    from ray._private import state

    return {a["ActorID"] for a in state.actors().values() if "ReferenceScorer" in a["ActorClassName"]}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_rounds_resume_after_crashes_in_judging_and_in_ddpo(ray_session, rounds_recipe, monkeypatch):
    from ray_zephyr.iterative import run_rounds
    from ray_zephyr.train.launch import run_training

    out, reports = Path(rounds_recipe.output_dir), {}
    monkeypatch.delenv(CRASH_ENV, raising=False)  # and restored after the test whatever happens

    def train(recipe, label):
        before = _scorer_actors()
        result = run_training(recipe)
        reports[label] = result.data_report
        # the reference pass scored train and eval rows with one model load (one actor: 1 worker), not one per split
        assert len(_scorer_actors() - before) == 1, label
        for split in ("train", "eval"):
            rows = ipc.open_file(Path(recipe.train.output_dir) / "data" / split / "rows.arrow").read_all()
            assert rows.num_rows and not rows.column("ref_chosen_logps").null_count, (label, split)
        if label == "round 1 dDPO":
            os.environ[CRASH_ENV] = "1"  # the next judging, round 2's, crashes
        return result

    with pytest.raises(RuntimeError, match="judge crashed"):
        run_rounds(rounds_recipe, train)
    round_1 = _mtimes(out / "round-1")
    assert (out / "round-1" / "summary.json").is_file() and (out / "round-2" / "aif" / "generated.json").is_file()
    assert not (out / "round-2" / "aif" / "pairs.parquet").exists()
    generated = (out / "round-2" / "aif" / "generated.json").stat().st_mtime_ns

    del os.environ[CRASH_ENV]

    def crash(recipe, label):
        raise RuntimeError(f"{label} crashed")

    with pytest.raises(RuntimeError, match="round 2 dDPO crashed"):
        run_rounds(rounds_recipe, crash)  # round 1 is not trained again: only round 2's dDPO reaches `crash`
    assert (out / "round-2" / "aif" / "generated.json").stat().st_mtime_ns == generated  # not sampled again
    pairs = (out / "round-2" / "aif" / "pairs.parquet").stat().st_mtime_ns

    table, numbers = run_rounds(rounds_recipe, train)
    assert list(reports) == ["round 1 dDPO", "round 2 dDPO"]
    assert _mtimes(out / "round-1") == round_1  # the finished round untouched by both reruns
    assert (out / "round-2" / "aif" / "pairs.parquet").stat().st_mtime_ns == pairs
    assert (out / "round-2" / "dpo" / "model" / "model.safetensors").is_file()
    assert numbers["model"] == str(out / "round-2" / "dpo" / "model")

    # Fresh prompts: the two rounds answered disjoint halves of the pool.
    ids = [set(json.loads((out / f"round-{r}" / "aif" / "generated.json").read_text())["completions"])
           for r in (1, 2)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert [f["prompts"] for f in numbers["rounds"]] == [len(ids[0]), len(ids[1])]

    # Round 2 started from round 1's model, with the dSFT model as its reference: at its first step the policy
    # already differs from the reference (round 1's first step, policy = reference, has rewards of exactly 0).
    assert f"reference: precomputed, {rounds_recipe.policy}" in reports["round 2 dDPO"]
    first_steps = [json.loads((out / f"round-{r}" / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
                   for r in (1, 2)]
    assert abs(first_steps[0]["rewards/chosen"]) < 1e-4 < 1e-2 < abs(first_steps[1]["rewards/chosen"])
    assert json.loads((out / "round-2" / "summary.json").read_text())["policy"] == str(out / "round-1" / "dpo" / "model")

    # The table: the dSFT model and each round side by side, the same numbers as summary.json.
    lines = table.splitlines()
    assert lines[0] == "| figure | dSFT | round 1 | round 2 |"
    accuracy = next(line for line in lines if line.startswith("| greedy task accuracy"))
    assert [cell.strip() for cell in accuracy.strip("|").split("|")][1:] == [
        f"{numbers['dsft_task_accuracy']:.3f}", *(f"{f['task_accuracy']:.3f}" for f in numbers["rounds"])]
    assert json.loads((out / "summary.json").read_text()) == numbers


def test_a_changed_recipe_is_refused_in_one_line(rounds_recipe, tmp_path):
    from ray_zephyr.iterative import check_resumable

    recipe = rounds_recipe.model_copy(update={"output_dir": str(tmp_path)})
    check_resumable(recipe)
    check_resumable(recipe)  # the same recipe resumes
    changed = recipe.model_copy(update={"dpo_overrides": [*recipe.dpo_overrides, "train.lr=5e-4"]})
    with pytest.raises(UserError, match=r"holds rounds of another recipe \(dpo.train.lr: 0.001 -> 0.0005\); use "
                                        "another output_dir, or delete it"):
        check_resumable(changed)
