"""KTO through the real launcher (slow, ~30 s): the embedded preference pairs, each split into a desirable and an
undesirable row, trained by 2 CPU workers under ZeRO-3 with a resident reference, padding-free and grouped by
length; the KL estimate is one figure over both workers' micro-batches (the loss itself equals TRL's KTOTrainer:
tests/test_train_objectives.py)."""

from __future__ import annotations

import json

import pyarrow.ipc as ipc
import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.train.launch import run_training

pytestmark = pytest.mark.slow


def test_kto_trains_on_pairs_split_into_desirable_and_undesirable_rows(ray_session, embedded_model_dir, tmp_path):
    out = tmp_path / "kto"
    recipe = load_recipe("tiny-dpo", [f"model.name_or_path={embedded_model_dir}", f"train.output_dir={out}",
                                      "data.train=[{path: embedded, split: train, rows: 8}]",
                                      "data.eval=[{path: embedded, split: test, rows: 8}]", "train.epochs=5",
                                      "train.global_batch_size=16", "train.per_device_batch_size=8",
                                      "train.log_every_steps=1", "train.eval_every_steps=0", "train.warmup_ratio=0",
                                      "dpo.loss_type=kto", "dpo.rpo_alpha=0", "dpo.beta=0.5"])
    assert recipe.dpo.reference == "resident"  # chosen for KTO: the recipe leaves it unset
    result = run_training(recipe)
    assert "train: read 8 rows = kept 8 + dropped 0" in result.data_report
    assert "reference: resident, the starting model" in result.data_report
    assert "kto: 8 desirable + 8 undesirable training rows (weights 1 / 1)" in result.data_report
    rows = ipc.open_file(out / "data" / "train" / "rows.arrow").read_all()
    assert {"prompt_ids", "completion_ids", "label"} <= set(rows.column_names)
    assert rows.num_rows == 16 and sum(rows.column("label").to_pylist()) == 8  # each pair: one row of each label
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # each step: all 16 rows, 8 per worker
    first, last = train[0], train[-1]
    # step 1: the policy is the reference, so every log-ratio and the KL estimate are 0 and each row's loss is
    # 1 - sigmoid(0)
    assert first["loss"] == pytest.approx(0.5, abs=1e-4) and first["kl"] == pytest.approx(0, abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-6)
    assert last["rewards/margins"] > train[1]["rewards/margins"] > 0 and last["loss"] < first["loss"]
    assert max(r["kl"] for r in train) > 0 and min(r["kl"] for r in train) >= 0  # estimated, and clamped at 0
    final = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert final and {"eval_kl", "eval_rewards/margins"} <= set(final[-1])
