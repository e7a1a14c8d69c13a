"""A worker dies mid-run; Ray Train restarts the group, which resumes from the last checkpoint and finishes,
each sample trained exactly once per epoch (slow: ~2 min)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.train.launch import FAULT_ENV, run_training

pytestmark = pytest.mark.slow


def test_worker_death_resumes_without_repeating_or_skipping_samples(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "6")
    recipe = load_recipe("tiny-sft", [
        f"train.output_dir={tmp_path}/run", "data.train=[{path: embedded, split: train, rows: 200}]", "data.eval=[]",
        "train.epochs=2", "train.checkpoint_every_steps=4", "train.log_every_steps=2", "train.max_failures=1",
    ])
    result = run_training(recipe)
    assert (tmp_path / "run" / ".fault-injected").is_file()
    assert result.metrics["step"] == 24 and (result.model_dir / "model.safetensors").is_file()

    records = defaultdict(list)  # (rank, step) -> one record per attempt that trained it, in order
    for rank in (0, 1):
        for line in (tmp_path / "run" / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            records[(rank, r["step"])].append(r)
    for rank in (0, 1):  # the run was interrupted and resumed by a new worker group
        assert len({r["attempt"] for (k, _), rs in records.items() if k == rank for r in rs}) == 2
    # Steps 5 and 6 ran before the crash and again after resuming from the step-4 checkpoint, on the same rows.
    redone = {step for (rank, step), rs in records.items() if len(rs) > 1}
    assert redone == {5, 6}
    for rs in records.values():
        assert all(r["sample_ids"] == rs[0]["sample_ids"] for r in rs)
    # Keeping the attempt that counts (the last), every sample is seen exactly once per epoch.
    steps_per_epoch = 12
    for epoch in (0, 1):
        seen = [i for (rank, step), rs in records.items() if (step - 1) // steps_per_epoch == epoch
                for i in rs[-1]["sample_ids"]]
        assert len(seen) == 192 and len(set(seen)) == 192  # 200 rows, 12 global batches of 16
    first, second = ([i for (rank, step), rs in sorted(records.items()) if (step - 1) // 12 == e for i in rs[-1]["sample_ids"]]
                     for e in (0, 1))
    assert first != second  # each epoch in its own order
