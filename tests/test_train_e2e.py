"""SFT then DPO through Ray Train: 2 CPU workers, DeepSpeed ZeRO-3, the tiny recipes (slow: ~3 min)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr.config import load_recipe
from ray_zephyr.train.launch import run_training

pytestmark = pytest.mark.slow

SMALL = ["data.train=[{path: embedded, split: train, rows: 480}]", "data.eval=[{path: embedded, split: test, rows: 64}]",
         "train.log_every_steps=3", "train.eval_every_steps=15", "train.epochs=1"]


def _records(path, split):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["split"] == split]


def _generates(model_dir) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_sft_then_dpo_on_two_zero3_workers(ray_session, tmp_path):
    sft = load_recipe("tiny-sft", [*SMALL, f"train.output_dir={tmp_path}/sft"])
    assert sft.train.num_workers == 2 and sft.train.zero_stage == 3
    result = run_training(sft)
    train = _records(result.metrics_file, "train")
    assert [r["step"] for r in train] == list(range(3, 31, 3))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    for name in ("loss", "entropy", "mean_token_accuracy", "lr", "grad_norm", "tokens/s", "samples/s", "num_tokens"):
        assert all(name in r for r in train), name
    evals = _records(result.metrics_file, "eval")
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    model_dir = Path(result.model_dir)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "generation_config.json").is_file()
    assert "<|assistant|>" in AutoTokenizer.from_pretrained(result.model_dir).chat_template
    _generates(result.model_dir)

    dpo = load_recipe("tiny-dpo", [*SMALL, f"train.output_dir={tmp_path}/dpo", f"model.name_or_path={result.model_dir}"])
    assert dpo.dpo.reference == "precomputed"
    result = run_training(dpo)
    train = _records(result.metrics_file, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "lr", "grad_norm", "tokens/s", "samples/s"):
        assert all(name in r for r in train), name
    final_eval = _records(result.metrics_file, "eval")[-1]
    assert final_eval["eval_rewards/accuracies"] > 0.6 and final_eval["eval_rewards/margins"] > 0
    _generates(result.model_dir)
    # The policy moved away from the SFT model it started from.
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model").state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.model_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
