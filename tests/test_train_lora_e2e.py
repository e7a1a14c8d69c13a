"""A LoRA SFT run through the real launcher (slow, ~1 min): 2 CPU workers on Ray Train under ZeRO-3, the last
worker killed after step 3 and the run resumed from its step-2 checkpoint; it publishes the adapter folder (peft
format) and, asked by `model.lora.merge`, the merged model, which equals the adapter on its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr.config import load_recipe
from ray_zephyr.train.faults import FAULT_ENV
from ray_zephyr.train.launch import run_training

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")

# 48 rows = 3 global batches of 16 per epoch, 2 epochs = 6 steps, checkpoints after steps 2, 4 and 6.
RECIPE = ["data.train=[{path: embedded, split: train, rows: 48}]", "data.eval=[{path: embedded, split: test, rows: 16}]",
          "train.epochs=2", "train.checkpoint_every_steps=2", "train.log_every_steps=1", "train.max_failures=1",
          "train.warmup_ratio=0", "train.lr=0.02", "model.lora={r: 8, alpha: 16, merge: true}"]


def test_lora_run_on_two_zero3_workers_resumes_and_publishes_the_adapter_and_the_merged_model(ray_session, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "after_step:3")
    recipe = load_recipe("tiny-sft", [*RECIPE, f"train.output_dir={tmp_path / 'sft'}"])
    assert recipe.train.num_workers == 2 and recipe.train.zero_stage == 3
    result = run_training(recipe)
    out = tmp_path / "sft"
    assert (out / ".fault-injected").is_file() and result.metrics["step"] == 6
    workers = [json.loads((out / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["resumed_from_step"] for w in workers] == [2, 2]
    train = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]

    adapter = Path(result.model_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "embedded"  # named as the recipe names it, so any node resolves it
    from ray_zephyr.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    probe = tokenizer(["<|user|>\nSpell river backwards.</s>\n<|assistant|>\n"], return_tensors="pt")
    with torch.no_grad():
        on_base = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path(base)),
                                                 adapter).eval()(**probe).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(**probe).logits
    torch.testing.assert_close(merged, on_base, rtol=1e-5, atol=1e-5)
