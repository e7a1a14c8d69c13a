"""ORPO, a reference-free objective, through the real launcher (slow, ~1 min): one stage from the untrained base
model on 2 CPU workers under ZeRO-3, with no reference pass (no reference columns in the row file) and its two means
(chosen tokens, pairs) taken over the whole global batch across workers; each worker has the CPU threads
`train.cpus_per_worker` reserves, and stages what it writes in `train.staging_dir`."""

from __future__ import annotations

import json

import pyarrow.ipc as ipc
import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.train.launch import run_training

pytestmark = pytest.mark.slow


def test_orpo_trains_from_the_base_model_without_a_reference_pass(ray_session, embedded_model_dir, tmp_path):
    out = tmp_path / "orpo"
    recipe = load_recipe("tiny-dpo", [f"model.name_or_path={embedded_model_dir}", f"train.output_dir={out}",
                                      "data.train=[{path: embedded, split: train, rows: 64}]",
                                      "data.eval=[{path: embedded, split: test, rows: 20}]", "train.epochs=1",
                                      "train.log_every_steps=1", "train.eval_every_steps=0", "train.warmup_ratio=0",
                                      "dpo.loss_type=orpo", "dpo.beta=0.2", "dpo.rpo_alpha=0",
                                      "train.cpus_per_worker=2", f"train.staging_dir={tmp_path / 'staging'}"])
    assert recipe.train.num_workers == 2 and recipe.train.zero_stage == 3
    result = run_training(recipe)
    assert "reference: none (orpo is reference-free: no reference pass)" in result.data_report
    assert ("eval: 16 of the 20 kept rows scored at each evaluation (whole rounds of 2 workers x 8 rows; 4 left out)"
            in result.data_report)  # the count evaluation really uses, not only what was read
    columns = ipc.open_file(out / "data" / "train" / "rows.arrow").read_all().column_names
    assert "chosen_ids" in columns and not [c for c in columns if c.startswith("ref_")]
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        # the logged loss is ORPO's: the chosen tokens' NLL minus beta times the mean log-sigmoid of the log odds
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.2 * r["log_odds_ratio"], rel=1e-4)
    assert train[-1]["nll_loss"] < train[0]["nll_loss"]
    workers = [json.loads((out / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["torch_threads"] for w in workers] == [2, 2]  # train.cpus_per_worker reached torch in each worker
    # the model was staged in train.staging_dir before it was published (tempfile's folder in each worker)
    assert [w["staging_dir"] for w in workers] == [str(tmp_path / "staging")] * 2
    left = [p.name for p in (tmp_path / "staging").iterdir() if not p.name.startswith("torchinductor_")]  # torch's cache
    assert (out / "model" / "model.safetensors").is_file() and not left  # the staged folders are gone once published
    final = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert final and "eval_log_odds_ratio" in final[-1]
