"""Padding-free micro-batches give the padded batch's loss, metrics and gradients (CPU, fp32), for SFT and for every
preference loss (DPO's, SimPO, ORPO), on rows of very different lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ray_zephyr.config import load_recipe
from ray_zephyr.data.tokenize import tokenize_preference, tokenize_sft
from ray_zephyr.embedded import chat_row, preference_row
from ray_zephyr.models import load_tokenizer
from ray_zephyr.train.objectives import MetricSums, make_objective
from ray_zephyr.train.scoring import TokenScorer


def _columns(tokenized: list[dict]) -> dict:
    return {k: np.array([np.array(t[k]) for t in tokenized], dtype=object) for k in tokenized[0]}


def _run(model_dir, recipe, rows, reference=None) -> tuple[dict, dict]:
    """Loss, metrics and gradients of one micro-batch."""
    torch.manual_seed(0)
    model = TokenScorer(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    objective = make_objective(recipe, load_tokenizer(recipe).pad_token_id, reference)
    batch = objective.collate(rows)
    metrics = MetricSums()
    loss = objective.loss(model, batch, objective.loss_denominator(batch), metrics)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return metrics.means() | {"objective": loss.item()}, grads


def _compare(padded, packed):
    (padded_metrics, padded_grads), (packed_metrics, packed_grads) = padded, packed
    assert padded_metrics.keys() == packed_metrics.keys()
    for name, value in padded_metrics.items():
        assert packed_metrics[name] == pytest.approx(value, abs=1e-5), name
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padding_free_sft_equals_padded(embedded_model_dir):
    recipes = {p: load_recipe("tiny-sft", [f"model.name_or_path={embedded_model_dir}", f"train.padding_free={p}"])
               for p in ("false", "true")}
    tokenizer = load_tokenizer(recipes["false"])
    chats = [chat_row(0, "train", i) for i in range(6)]
    chats[2]["messages"] += [{"role": "user", "content": "And now spell it backwards, then once more."},
                             {"role": "assistant", "content": "Sure: it is what it was, twice over."}]
    rows = _columns(tokenize_sft(tokenizer, chats, 128, "keep_start", False))
    assert len({len(r) for r in rows["input_ids"]}) > 2  # lengths differ: the padded batch has padding
    _compare(_run(embedded_model_dir, recipes["false"], rows), _run(embedded_model_dir, recipes["true"], rows))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "apo_zero", "apo_down", "simpo", "orpo"])
def test_padding_free_dpo_equals_padded(embedded_model_dir, loss_type):
    overrides = [f"model.name_or_path={embedded_model_dir}", f"dpo.loss_type={loss_type}", "dpo.beta=0.3",
                 *(["dpo.rpo_alpha=0"] if loss_type == "orpo" else [])]
    recipes = {p: load_recipe("tiny-dpo", [*overrides, f"train.padding_free={p}"]) for p in ("false", "true")}
    tokenizer = load_tokenizer(recipes["false"])
    examples = []
    for i in range(5):
        row = preference_row(0, "train", i)
        rejected = row["rejected"][-1:] if i % 2 else [{"role": "assistant", "content": "No. " * (3 + 4 * i)}]
        examples.append({"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": rejected})
    rows = _columns(tokenize_preference(tokenizer, examples, 128, "keep_start", False))
    # A reference that differs from the policy, so that the log-ratios (and the loss's gradient) are not trivial.
    reference = TokenScorer(AutoModelForCausalLM.from_pretrained(embedded_model_dir)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    if not recipes["false"].dpo.uses_reference:
        reference = None
    _compare(_run(embedded_model_dir, recipes["false"], rows, reference),
             _run(embedded_model_dir, recipes["true"], rows, reference))
