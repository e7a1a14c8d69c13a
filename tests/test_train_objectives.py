"""Parity of our SFT and DPO losses and metrics with TRL 1.16's trainers (fp32, CPU, same model and rows)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr.embedded import chat_row, preference_row
from ray_zephyr.train.objectives import (
    MetricSums,
    dpo_loss,
    dpo_metrics,
    sft_loss,
    sft_score_mask,
)
from ray_zephyr.train.scoring import TokenScorer, sequence_logps

trl = pytest.importorskip("trl")


def _first_batch(trainer) -> dict:
    trainer.model.train()  # TRL files metrics under "train" only in training mode
    return next(iter(trainer.get_train_dataloader()))


def _perturbed(model_dir, seed: int):
    """The same model with slightly different weights, so policy and reference differ."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_metrics_equal_trl(embedded_model_dir, tmp_path, loss_type):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    policy, reference = _perturbed(embedded_model_dir, 1), AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    rows = [preference_row(0, "train", i) for i in range(6)]
    data = Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rows])
    args = trl.DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=6, beta=0.2, loss_type=[loss_type],
        max_length=48, report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
    )
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    batch = _first_batch(trainer)
    assert batch["completion_mask"].sum() > 0
    expected = trainer.compute_loss(trainer.model, batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # Ours, on TRL's own batch, the same policy weights, and a resident reference.
    policy_scorer, ref_scorer = TokenScorer(trainer.model), TokenScorer(reference)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    stats = policy_scorer(*inputs)
    chosen, rejected = sequence_logps(stats, batch["input_ids"].shape[0])
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(ref_scorer(*inputs), batch["input_ids"].shape[0])
    per_pair = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, batch["completion_mask"].sum(dim=1), 0.2,
                        loss_type)
    metrics = MetricSums()
    dpo_metrics(metrics, stats, per_pair, chosen, rejected, ref_chosen, ref_rejected, 0.2)
    ours = metrics.means()

    assert per_pair.mean().item() == pytest.approx(expected, abs=1e-5)
    assert ours["loss"] == pytest.approx(expected, abs=1e-5)
    for name in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]:
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_sft_assistant_only_loss_equals_trl(embedded_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    data = Dataset.from_list([{"messages": chat_row(0, "train", i)["messages"]} for i in range(6)])
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=6, assistant_only_loss=True, max_length=64,
        report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = _first_batch(trainer)
    labels = batch["labels"]
    assert 0 < (labels != -100).sum() < batch["attention_mask"].sum()  # assistant tokens only
    expected = trainer.compute_loss(trainer.model, dict(batch)).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    stats = TokenScorer(trainer.model)(batch["input_ids"], batch["attention_mask"], sft_score_mask(labels))
    metrics = MetricSums()
    loss = sft_loss(stats, (labels[:, 1:] != -100).sum(), metrics)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    for name in ["entropy", "mean_token_accuracy"]:
        assert metrics.means()[name] == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_sft_loss_weighs_tokens_equally_across_uneven_micro_batches(embedded_model_dir):
    """Two micro-batches with very different token counts: summing our per-micro-batch losses (each divided
    by the global count) gives the mean over all tokens, which a mean of micro-batch means would not."""
    model = TokenScorer(AutoModelForCausalLM.from_pretrained(embedded_model_dir))
    torch.manual_seed(0)
    ids = torch.randint(10, 500, (3, 20))
    mask = torch.ones_like(ids)
    score = torch.zeros_like(ids)
    score[0, 2:18] = 1
    score[1, 15:17] = 1
    score[2, 5:12] = 1
    everything = model(ids, mask, score)
    total = everything.logps.numel()
    reference = -everything.logps.mean()
    parts = [model(ids[:1], mask[:1], score[:1]), model(ids[1:], mask[1:], score[1:])]
    summed = sum(sft_loss(p, total, MetricSums()) for p in parts)
    assert summed.item() == pytest.approx(reference.item(), abs=1e-6)
    mean_of_means = sum(-p.logps.mean() for p in parts) / 2
    assert abs(mean_of_means.item() - reference.item()) > 1e-3


def test_rpo_term_equals_trl_sigmoid_plus_weighted_sft_loss(embedded_model_dir, tmp_path):
    """dpo.rpo_alpha adds the chosen answer's mean token NLL, weighted: TRL's loss_type [sigmoid, sft] with
    loss_weights [1, alpha] (one pair per batch, where TRL's batch-wide token mean is the pair's own)."""
    from ray_zephyr.config import load_recipe
    from ray_zephyr.train.objectives import make_objective

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    policy, reference = _perturbed(embedded_model_dir, 3), AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    row = preference_row(0, "train", 7)
    data = Dataset.from_list([{"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}])
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, beta=0.2, loss_type=["sigmoid", "sft"],
                         loss_weights=[1.0, 0.7], max_length=48, report_to=[], use_cpu=True, bf16=False, seed=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    batch = _first_batch(trainer)
    expected = trainer.compute_loss(trainer.model, batch).item()

    recipe = load_recipe("tiny-dpo", [f"model.name_or_path={embedded_model_dir}", "dpo.beta=0.2", "dpo.rpo_alpha=0.7",
                                      "train.padding_free=false"])
    objective = make_objective(recipe, tokenizer.pad_token_id, TokenScorer(reference))
    ours = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    ours |= {"lengths": batch["attention_mask"].sum(1), "completion_lengths": batch["completion_mask"].sum(1)}
    metrics = MetricSums()
    loss = objective.loss(TokenScorer(trainer.model), ours, torch.tensor(1.0), metrics)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics.means()["nll_loss"] > 0


@pytest.mark.parametrize("softcap, bias", [(None, False), (30.0, True)])
def test_chunked_logps_equal_full_cross_entropy_and_trl_kernel(monkeypatch, softcap, bias):
    """The chunked head (several chunks here) gives the log-probs, token statistics and gradients (hidden states,
    weight, bias) of full-vocabulary fp32 cross-entropy, and the log-probs of TRL's chunked kernel."""
    import torch.nn.functional as F
    from trl.kernels import ChunkedLogProbFunction

    from ray_zephyr.train import scoring

    monkeypatch.setattr(scoring, "SCORE_CHUNK", 7)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(300, 16) * 0.3).requires_grad_()
    b = (torch.randn(300) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, 300, (30,))
    upstream = torch.randn(30)  # an arbitrary downstream use of the per-token log-probs

    def full():
        logits = F.linear(hidden, weight, b).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits, -F.cross_entropy(logits, targets, reduction="none")

    logits, expected = full()
    (expected * upstream).sum().backward()
    expected_grads = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None

    logps, entropy, is_top1, mean_logits = scoring.ChunkedLogps.apply(hidden, weight, b, targets, softcap, True)
    (logps * upstream).sum().backward()
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip([t.grad for t in (hidden, weight, b) if t is not None], expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    log_dist = logits.detach().log_softmax(-1)
    torch.testing.assert_close(entropy, -(log_dist.exp() * log_dist).sum(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(is_top1, logits.argmax(-1) == targets)
    torch.testing.assert_close(mean_logits, logits.detach().mean(-1))

    trl_logps = ChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 128, softcap, 1.0, ("log_probs",))[0]
    torch.testing.assert_close(logps, trl_logps, atol=1e-5, rtol=1e-5)


def _objective_loss_and_grads(recipe_overrides: list[str], model_dir, policy, reference, batch: dict):
    """Our objective's loss, metrics and gradients on a batch (input_ids, attention_mask, completion_mask) of
    [chosen; rejected] rows: one worker, one micro-batch, so the global denominators are this batch's."""
    from ray_zephyr.config import load_recipe
    from ray_zephyr.train.objectives import make_objective, orpo_score_mask

    recipe = load_recipe("tiny-dpo", [f"model.name_or_path={model_dir}", "dpo.rpo_alpha=0", "train.padding_free=false",
                                      *recipe_overrides])
    objective = make_objective(recipe, 0, reference and TokenScorer(reference))
    ours = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    ours |= {"lengths": ours["attention_mask"].sum(1), "completion_lengths": ours["completion_mask"].sum(1)}
    if objective.kind == "orpo":
        ours = orpo_score_mask(ours)
    metrics = MetricSums()
    loss = objective.loss(TokenScorer(policy), ours, objective.loss_denominator(ours), metrics)
    loss.backward()
    return loss.item(), metrics.means(), {n: p.grad.clone() for n, p in policy.named_parameters()}


def _trl_loss_and_grads(trainer, batch: dict):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    stored = getattr(trainer, "_stored_metrics", None) or trainer._metrics  # CPO and ORPO keep theirs apart
    return (loss.item(), {k: float(v[-1]) for k, v in stored["train"].items()},
            {n: p.grad.clone() for n, p in trainer.model.named_parameters()})


def _assert_grads_equal(ours: dict, theirs: dict) -> None:
    assert sum(g.abs().sum() for g in ours.values()) > 0
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_type, weights", [(["apo_zero"], None), (["apo_down"], None),
                                                (["sigmoid", "apo_zero"], [0.8, 0.2])])
def test_apo_and_weighted_mixtures_equal_trl(embedded_model_dir, tmp_path, loss_type, weights):
    """APO-zero, APO-down and a weighted mixture as TRL's DPOTrainer spells them (loss_type list, loss_weights):
    the same loss, rewards and gradients on TRL's own batch of 6 pairs."""
    import copy

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    policy, reference = _perturbed(embedded_model_dir, 5), AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    rows = [preference_row(0, "train", i) for i in range(6)]
    data = Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rows])
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, beta=0.2, loss_type=loss_type,
                         loss_weights=weights, max_length=48, report_to=[], use_cpu=True, bf16=False, seed=0)
    ours_policy = copy.deepcopy(policy)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    batch = _first_batch(trainer)
    expected, trl_metrics, trl_grads = _trl_loss_and_grads(trainer, batch)

    types = "[" + ", ".join(loss_type) + "]"
    overrides = ["dpo.beta=0.2", f"dpo.loss_type={types}"] + ([f"dpo.loss_weights={weights}"] if weights else [])
    loss, metrics, grads = _objective_loss_and_grads(overrides, embedded_model_dir, ours_policy, reference, batch)
    assert loss == pytest.approx(expected, abs=1e-5) and metrics["loss"] == pytest.approx(expected, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    _assert_grads_equal(grads, trl_grads)


def _paired_batch(trainer) -> dict:
    """TRL's CPO/ORPO batch (chosen_* and rejected_* tensors) as one [chosen; rejected] batch."""
    batch = _first_batch(trainer)
    joined = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=getattr(trainer, "pad_token_id", None) or trainer.padding_value,
                                         device=torch.device("cpu"))
    return batch, {"input_ids": joined["concatenated_input_ids"], "attention_mask": joined["concatenated_attention_mask"],
                   "completion_mask": (joined["concatenated_labels"] != -100).long()}


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_objectives_equal_trl(embedded_model_dir, tmp_path, objective):
    """SimPO (TRL's CPOTrainer, loss_type simpo, cpo_alpha 0) and ORPO (TRL's ORPOTrainer) on TRL's own batch of 6
    pairs of uneven lengths: the same loss, rewards, log-probs and gradients, with no reference model."""
    import copy

    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    policy = _perturbed(embedded_model_dir, 6)
    rows = [preference_row(0, "train", i) for i in range(6)]
    data = Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rows])
    common = {"output_dir": str(tmp_path), "per_device_train_batch_size": 6, "max_length": 64, "report_to": [],
              "use_cpu": True, "bf16": False, "seed": 0}
    if objective == "simpo":
        trainer = CPOTrainer(model=policy, args=CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7,
                                                          **common), train_dataset=data, processing_class=tokenizer)
        overrides = ["dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=0.7"]
    else:
        trainer = ORPOTrainer(model=policy, args=ORPOConfig(beta=0.3, **common), train_dataset=data,
                              processing_class=tokenizer)
        overrides = ["dpo.loss_type=orpo", "dpo.beta=0.3"]
    ours_policy = copy.deepcopy(trainer.model)
    trl_batch, batch = _paired_batch(trainer)
    chosen_lengths = batch["completion_mask"][:6].sum(1)
    assert len(set(chosen_lengths.tolist())) > 1  # uneven: a token mean and a mean of row means differ
    trainer.model.train()
    expected, trl_metrics, trl_grads = _trl_loss_and_grads(trainer, trl_batch)

    loss, metrics, grads = _objective_loss_and_grads(overrides, embedded_model_dir, ours_policy, None, batch)
    assert loss == pytest.approx(expected, abs=1e-5) and metrics["loss"] == pytest.approx(expected, abs=1e-5)
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected"] + (["nll_loss", "log_odds_ratio", "log_odds_chosen"] if objective == "orpo" else [])
    for name in names:
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    _assert_grads_equal(grads, trl_grads)


def _unpaired_rows() -> list[dict]:
    """4 desirable and 2 undesirable rows of 6 different prompts (conversational, as UltraFeedback's)."""
    rows = [preference_row(0, "train", i) for i in range(6)]
    return [{"prompt": r["chosen"][:-1], "completion": r[side][-1:], "label": side == "chosen"}
            for r, side in zip(rows, ["chosen"] * 4 + ["rejected"] * 2, strict=True)]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_tokens_batch_loss_metrics_and_gradients_equal_trl(embedded_model_dir, tmp_path, loss_type):
    """KTO (and unpaired APO-zero) as TRL's KTOTrainer: our tokenization and collation give its batch, KL rows
    included (each prompt with the previous row's completion), and on it our loss, metrics and gradients are
    its, with unequal weights on the two labels; padding-free gives the same loss and gradients."""
    import copy

    from ray_zephyr.config import load_recipe
    from ray_zephyr.data.tokenize import tokenize_unpaired
    from ray_zephyr.train.objectives import make_objective

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    # seed 12: a perturbation whose KL estimate on these rows is positive (a negative one is clamped to 0)
    policy, reference = _perturbed(embedded_model_dir, 12), AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    examples = _unpaired_rows()
    args = trl.KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, beta=0.2, loss_type=loss_type,
                         desirable_weight=1.3, undesirable_weight=0.8, max_length=48, report_to=[], use_cpu=True,
                         bf16=False, seed=0, train_sampling_strategy="sequential")
    ours_policy = copy.deepcopy(policy)
    trainer = trl.KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(examples),
                             processing_class=tokenizer)
    batch = _first_batch(trainer)
    expected, trl_metrics, trl_grads = _trl_loss_and_grads(trainer, batch)

    tokenized = tokenize_unpaired(tokenizer, examples, 48, "keep_start", False)
    for key in ("prompt_ids", "completion_ids", "label"):
        assert [r[key] for r in tokenized] == trainer.train_dataset[key], key
    rows = {key: [r[key] for r in tokenized] for key in ("prompt_ids", "completion_ids", "label")}
    results = {}
    for padding_free in ("false", "true"):
        recipe = load_recipe("tiny-dpo", [f"model.name_or_path={embedded_model_dir}", "dpo.rpo_alpha=0",
                                          f"train.padding_free={padding_free}", f"dpo.loss_type={loss_type}",
                                          "dpo.beta=0.2", "dpo.desirable_weight=1.3", "dpo.undesirable_weight=0.8",
                                          "data.max_length=48"])
        assert recipe.dpo.reference == "resident" and recipe.data_kind == "kto"
        objective = make_objective(recipe, tokenizer.pad_token_id, TokenScorer(reference))
        ours = objective.collate(rows)
        if padding_free == "false":
            expected_keys = [k for k in batch if k.startswith(("input_ids", "attention_mask", "completion_mask", "KL_",
                                                               "label"))]
            assert expected_keys and all(torch.equal(ours[k], batch[k]) for k in expected_keys)
            assert ("KL_input_ids" in ours) == (loss_type == "kto")
        scorer = TokenScorer(copy.deepcopy(ours_policy))
        metrics = MetricSums()
        loss = objective.loss(scorer, ours, objective.loss_denominator(ours), metrics)
        loss.backward()
        results[padding_free] = (loss.item(), metrics.means(), {n: p.grad.clone() for n, p in scorer.lm.named_parameters()})

    loss, metrics, grads = results["false"]
    assert loss == pytest.approx(expected, abs=1e-5) and metrics["loss"] == pytest.approx(expected, abs=1e-5)
    names = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
             "logits/chosen", "logits/rejected", "entropy"]
    for name in names:
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    if loss_type == "kto":
        assert metrics["kl"] > 0  # the perturbed policy is not the reference: the KL term is really there
    _assert_grads_equal(grads, trl_grads)
    packed_loss, _, packed_grads = results["true"]
    assert packed_loss == pytest.approx(loss, abs=1e-5)
    _assert_grads_equal(packed_grads, grads)


def test_kto_reports_its_label_balance_and_trl_advice_when_the_weights_do_not_make_up_for_it():
    from ray_zephyr.config import load_recipe
    from ray_zephyr.train.objectives import kto_balance

    dpo = load_recipe("tiny-dpo", ["dpo.loss_type=kto", "dpo.rpo_alpha=0"]).dpo
    assert kto_balance(16, 16, dpo) == "kto: 16 desirable + 16 undesirable training rows (weights 1 / 1)"
    assert kto_balance(30, 10, dpo).endswith("the weights do not balance the labels (KTO paper, eq. 8): set EITHER "
                                             "dpo.desirable_weight in [0.33, 0.44] OR dpo.undesirable_weight in "
                                             "[2.26, 3.0]")
    balanced = load_recipe("tiny-dpo", ["dpo.loss_type=kto", "dpo.rpo_alpha=0", "dpo.undesirable_weight=2.5"]).dpo
    assert "do not balance" not in kto_balance(30, 10, balanced)
