"""QLoRA on CPU: bitsandbytes' CPU backend runs its 4-bit NF4 linear layers, so the tiny model trains a LoRA adapter
on 4-bit weights in one process under ZeRO-2 (the QLoRA recipes' stage), with paged AdamW as the recipes use it."""

from __future__ import annotations

import pytest
import torch

from ray_zephyr.models import load_tokenizer
from ray_zephyr.train.deepspeed_setup import (
    build_engine,
    init_single_process,
    load_causal_lm,
    save_hf_model,
)
from ray_zephyr.train.objectives import make_objective
from ray_zephyr.train.step import eval_metrics, train_step
from tests.test_train_lora import gathered_weights, logits, sft_batches, sft_recipe

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def four_bit_outputs(lm) -> dict[str, torch.Tensor]:
    """What each 4-bit layer computes on fixed inputs (bitsandbytes may repack its weights for the CPU kernel on first
    use, so the packed bytes are no measure of the weights)."""
    x = torch.randn(3, lm.config.intermediate_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return {n: m(x[:, : m.in_features]) for n, m in lm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_qlora_trains_the_adapter_on_frozen_4bit_weights(embedded_model_dir, tmp_path):
    init_single_process()
    recipe = sft_recipe(embedded_model_dir, "model.load_in_4bit=true", "train.zero_stage=2",
                        "train.optimizer=paged_adamw")
    tokenizer = load_tokenizer(recipe)
    objective = make_objective(recipe, tokenizer.pad_token_id)
    engine = build_engine(recipe, str(embedded_model_dir), total_steps=2)
    lm = engine.module.lm
    assert len([m for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 7 * lm.config.num_hidden_layers
    batches = sft_batches(recipe, tokenizer, objective)
    before, loss_before = gathered_weights(engine), eval_metrics(engine, objective, batches[0:2])["eval_loss"]
    layers_before = four_bit_outputs(lm)
    for step_batches in (batches[0:2], batches[2:4]):
        train_step(engine, objective, step_batches)
    after, loss_after = gathered_weights(engine), eval_metrics(engine, objective, batches[0:2])["eval_loss"]
    assert loss_after < loss_before
    for name in before:
        if ".lora_B." in name:
            assert after[name].abs().sum() > 0, name
        elif ".lora_A." not in name and before[name].dtype != torch.uint8:
            assert torch.equal(before[name], after[name]), name
    for name, output in four_bit_outputs(lm).items():
        assert torch.equal(layers_before[name], output), name  # the frozen 4-bit weights

    save_hf_model(engine, tokenizer, str(tmp_path / "adapter"), rank=0)
    probe = tokenizer(["<|user|>\nWhat is 2 plus 3?</s>\n<|assistant|>\n2 plus 3 is 5."], return_tensors="pt")
    engine.eval()
    reloaded = peft.PeftModel.from_pretrained(load_causal_lm(recipe, str(embedded_model_dir), use_gpu=False),
                                              tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, probe), logits(lm, probe), rtol=1e-5, atol=1e-5)


def test_paged_adamw_takes_the_steps_of_adamw(embedded_model_dir):
    """bitsandbytes' PagedAdamW32bit handed to DeepSpeed (unpaged on CPU) and DeepSpeed's AdamW: the same adapter."""
    init_single_process()
    weights = {}
    for optimizer in ("adamw", "paged_adamw"):
        recipe = sft_recipe(embedded_model_dir, "train.zero_stage=2", f"train.optimizer={optimizer}")
        tokenizer = load_tokenizer(recipe)
        objective = make_objective(recipe, tokenizer.pad_token_id)
        engine = build_engine(recipe, str(embedded_model_dir), total_steps=3)
        batches = sft_batches(recipe, tokenizer, objective, n=24)
        for step in range(3):
            train_step(engine, objective, batches[2 * step : 2 * step + 2])
        weights[optimizer] = {n: p for n, p in gathered_weights(engine).items() if ".lora_" in n}
    # Each step moves an element by up to lr (0.02). The two add eps at different points, which shows where a gradient
    # is near eps: up to 2e-6 here, more on other CPUs. A wrong optimizer (no bias correction, other betas) is off by ~lr.
    for name, expected in weights["adamw"].items():
        torch.testing.assert_close(weights["paged_adamw"][name], expected, rtol=1e-4, atol=2e-5, msg=name)
