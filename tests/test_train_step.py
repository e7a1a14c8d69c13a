"""The training step without Ray (world size 1, DeepSpeed ZeRO-3 on CPU): reference modes and schedules."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from ray_zephyr.config import load_recipe
from ray_zephyr.data.tokenize import tokenize_preference
from ray_zephyr.embedded import preference_row
from ray_zephyr.models import load_tokenizer
from ray_zephyr.train.deepspeed_setup import (
    build_engine,
    build_reference,
    deepspeed_config,
    init_single_process,
)
from ray_zephyr.train.objectives import make_objective
from ray_zephyr.train.reference import ReferenceScorer
from ray_zephyr.train.step import train_step


def _rows(recipe, tokenizer, n: int) -> dict:
    examples = []
    for i in range(n):
        row = preference_row(0, "train", i)
        examples.append({"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]})
    tokenized = tokenize_preference(tokenizer, examples, recipe.data.max_length, "keep_start", False)
    return {k: np.array([np.array(t[k]) for t in tokenized], dtype=object) for k in tokenized[0]}


def test_precomputed_and_resident_reference_give_the_same_loss(embedded_model_dir):
    """(b) reference log-probs from the Ray Data scorer == (a) a resident frozen ZeRO-3 engine, step for step."""
    init_single_process()
    overrides = ["train.num_workers=1", "train.global_batch_size=8", "train.per_device_batch_size=4",
                 f"model.name_or_path={embedded_model_dir}", "dpo.beta=0.5", "train.warmup_ratio=0",
                 "dpo.rpo_alpha=0"]  # plain DPO: its loss is log 2 while the policy is the reference
    recipe = load_recipe("tiny-dpo", overrides)
    tokenizer = load_tokenizer(recipe)
    rows = _rows(recipe, tokenizer, 16)
    micro = [{k: v[i : i + 4] for k, v in rows.items()} for i in range(0, 16, 4)]

    scorer = ReferenceScorer(recipe, str(embedded_model_dir), tokenizer.pad_token_id)
    precomputed = [scorer(m) for m in micro]
    runs = {}
    for mode, batches in [("precomputed", precomputed), ("resident", micro)]:
        reference = build_reference(recipe, str(embedded_model_dir)) if mode == "resident" else None
        engine = build_engine(recipe, str(embedded_model_dir), total_steps=2)
        objective = make_objective(recipe, tokenizer.pad_token_id, reference)
        batches = [objective.collate(b) for b in batches]
        runs[mode] = [train_step(engine, objective, batches[0:2]), train_step(engine, objective, batches[2:4])]
    assert runs["precomputed"][0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 1
    for step in range(2):
        for name in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected", "grad_norm"):
            assert runs["precomputed"][step][name] == pytest.approx(runs["resident"][step][name], abs=1e-5), name
    assert runs["precomputed"][1]["rewards/margins"] != 0.0


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """Each training worker imports DeepSpeed, whose autotuner would import mlflow (1.3 s here) when installed."""
    import subprocess
    import sys

    code = ("import sys; from ray_zephyr.train.deepspeed_setup import import_deepspeed; import_deepspeed(); "
            "print('mlflow' in sys.modules); import mlflow, deepspeed.autotuning.autotuner as a; print(a.has_mlflow)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split()[-2:] == ["False", "False"], done.stdout + done.stderr[-2000:]


def test_deepspeed_on_cpu_compiles_nothing(tmp_path):
    """DeepSpeed's comm init on gloo would compile its shared-memory op (~45 s of a 2-core machine, once per machine
    and environment) that only its inference kernels use; a fresh extensions folder stays empty, and the
    collectives training uses still work."""
    import subprocess
    import sys

    code = ("import torch; from ray_zephyr.train.deepspeed_setup import import_deepspeed, init_single_process; "
            "init_single_process('gloo'); t = torch.ones(3); import_deepspeed().comm.all_reduce(t); print(t.tolist())")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.split("\n")[-2] == "[1.0, 1.0, 1.0]", done.stdout + done.stderr[-2000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1])
def test_lr_schedule_equals_transformers_get_scheduler(kind, warmup_ratio):
    import torch
    from transformers import get_scheduler

    from ray_zephyr.train.deepspeed_setup import scheduler_factory

    recipe = load_recipe("tiny-sft", [f"train.lr_scheduler={kind}", f"train.warmup_ratio={warmup_ratio}"])
    total = 37
    ours = scheduler_factory(recipe.train, total)(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-4))
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    theirs = get_scheduler(name, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-4),
                           math.ceil(total * warmup_ratio), total)
    for _ in range(total + 2):  # and past the end
        assert ours.get_last_lr() == theirs.get_last_lr()
        ours.optimizer.step(), ours.step(), theirs.optimizer.step(), theirs.step()


def test_deepspeed_config_follows_the_recipe():
    recipe = load_recipe("zephyr-7b-beta-dpo", ["train.offload_optimizer=true",
                                                "train.zero_options={reduce_bucket_size: 50000000, overlap_comm: true}"])
    config = deepspeed_config(recipe.train)
    assert config["gradient_accumulation_steps"] == 64 // (4 * 16)
    assert config["bf16"] == {"enabled": True} and config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["reduce_bucket_size"] == 50_000_000 and config["zero_optimization"]["overlap_comm"]
    assert "optimizer" not in config and config["zero_allow_untested_optimizer"]  # rmsprop: a torch optimizer
    reference = deepspeed_config(recipe.train, training=False)
    assert "optimizer" not in reference and "offload_optimizer" not in reference["zero_optimization"]
    cpu = deepspeed_config(load_recipe("tiny-sft").train)
    assert cpu["bf16"] == {"enabled": False} and cpu["optimizer"]["params"]["torch_adam"]
    assert "fused" not in cpu["optimizer"]["params"]  # TRL's adamw_torch, for the parity tests


@pytest.mark.parametrize("overrides, implementation", [
    ([], "torch's fused AdamW"),  # no DeepSpeed op to JIT-build with nvcc
    (["train.offload_optimizer=true"], "DeepSpeed's CPU Adam"),
])
def test_adamw_on_gpu_needs_no_op_built_at_start(overrides, implementation):
    import torch

    train = load_recipe("zephyr-7b-beta-dpo-handbook", overrides).train
    params = deepspeed_config(train)["optimizer"]["params"]
    if implementation == "DeepSpeed's CPU Adam":
        assert "torch_adam" not in params  # ZeRO-Offload's own optimizer
        return
    assert params["torch_adam"] and params["fused"]
    # What DeepSpeed then builds: torch.optim.AdamW(params, **the rest, foreach=None); these kwargs are valid.
    rest = {k: v for k, v in params.items() if k != "torch_adam"}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))], **rest, foreach=None)
    assert optimizer.defaults["fused"] and optimizer.defaults["lr"] == train.lr
    sized = deepspeed_config(load_recipe("tiny-sft").train, hidden_size=4096)["zero_optimization"]  # zephyr-7b's
    assert (sized["reduce_bucket_size"], sized["stage3_prefetch_bucket_size"],
            sized["stage3_param_persistence_threshold"]) == (4096**2, int(0.9 * 4096**2), 40960)  # HF's "auto" values


def test_one_step_hands_two_collectives_tensors_on_the_engine_device(embedded_model_dir, monkeypatch):
    """Under NCCL (Ray Train on GPU) a collective on a CPU tensor crashes; so every tensor the step all-reduces must
    live on the engine's device, and there are two collectives per step (the loss denominator, then every metric
    at once). The step believes it has a twin worker (world size 2, each collective doubles its tensor), which
    also checks the arithmetic: means unchanged, totals doubled, the loss averaged over both workers' tokens."""
    import torch

    import ray_zephyr.train.objectives as objectives_module
    import ray_zephyr.train.step as step_module

    init_single_process()
    recipe = load_recipe("tiny-sft", ["train.num_workers=1", "train.global_batch_size=4", "train.per_device_batch_size=4",
                                      f"model.name_or_path={embedded_model_dir}", "train.warmup_ratio=0"])
    tokenizer = load_tokenizer(recipe)
    from ray_zephyr.data.tokenize import tokenize_sft
    from ray_zephyr.embedded import chat_row

    tokenized = tokenize_sft(tokenizer, [chat_row(0, "train", i) for i in range(4)], 128, "keep_start", False)
    rows = {k: np.array([np.array(t[k]) for t in tokenized], dtype=object) for k in tokenized[0]}
    objective = make_objective(recipe, tokenizer.pad_token_id)
    engine = build_engine(recipe, str(embedded_model_dir), total_steps=4)
    batch = objective.collate(rows)
    alone = train_step(engine, objective, [batch])

    handed = []

    class TwinWorker:
        """torch.distributed as the step sees it: two identical workers."""

        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def get_world_size():
            return 2

        @staticmethod
        def all_reduce(tensor):
            handed.append(tensor.device)
            tensor.mul_(2)

    monkeypatch.setattr(step_module, "dist", TwinWorker)
    monkeypatch.setattr(objectives_module, "dist", TwinWorker)  # where the collectives' helper lives
    twin = train_step(engine, objective, [batch])
    assert handed == [engine.device, engine.device]
    assert all(isinstance(d, torch.device) for d in handed)
    assert twin["step_tokens"] == 2 * alone["step_tokens"]
    assert twin["mean_token_accuracy"] >= 0 and twin["entropy"] > 0


def test_a_step_over_any_number_of_micro_batches_takes_one_optimizer_step(embedded_model_dir):
    """With a token budget (`train.micro_batch_tokens`) a step's rows come in however many micro-batches fit the
    budget, not DeepSpeed's configured accumulation (2 here): cut into 3 or into 1, the same rows give the same
    gradient, the same update and exactly one optimizer step per train_step."""
    init_single_process()
    recipe = load_recipe("tiny-dpo", ["train.num_workers=1", "train.global_batch_size=8", "train.per_device_batch_size=4",
                                      f"model.name_or_path={embedded_model_dir}", "train.warmup_ratio=0"])
    tokenizer = load_tokenizer(recipe)
    rows = ReferenceScorer(recipe, str(embedded_model_dir), tokenizer.pad_token_id)(_rows(recipe, tokenizer, 16))
    cuts = {"configured": [(0, 4), (4, 8), (8, 12), (12, 16)], "budgeted": [(0, 3), (3, 6), (6, 8), (8, 16)]}
    steps = {"configured": [2, 2], "budgeted": [3, 1]}  # micro-batches per step
    runs = {}
    for name, cut in cuts.items():
        engine = build_engine(recipe, str(embedded_model_dir), total_steps=4)
        objective = make_objective(recipe, tokenizer.pad_token_id)
        batches = [objective.collate({k: v[a:b] for k, v in rows.items()}) for a, b in cut]
        first, second = steps[name][0], steps[name][0] + steps[name][1]
        runs[name] = [train_step(engine, objective, batches[:first]), train_step(engine, objective, batches[first:second])]
        assert engine.global_steps == 2
    for step in range(2):
        for metric in ("loss", "grad_norm", "rewards/margins", "lr"):
            assert runs["budgeted"][step][metric] == pytest.approx(runs["configured"][step][metric], rel=1e-5), metric


def test_mistral_untied_head_under_zero3_gets_its_gradient(mistral_model_dir):
    """Zephyr's Mistral has an LM head of its own, not tied to the embeddings. The chunked scorer reads the head's
    weight directly, so under ZeRO-3 it must gather that partitioned weight itself, and keep it gathered until
    autograd has accumulated its gradient (the first backward crashed before). The step (ZeRO-3, packed rows,
    rows longer than the sliding window) gives plain PyTorch's loss and grad norm (a padded batch, full-vocabulary
    cross-entropy, no DeepSpeed), which it would not if the head's gradient were lost or padding-free batching broke the
    window. Several workers: tests/test_train_resume.py runs this model."""
    import torch
    from transformers import AutoModelForCausalLM

    from ray_zephyr.data.tokenize import tokenize_sft
    from ray_zephyr.embedded import chat_row

    init_single_process()
    recipe = load_recipe("tiny-sft", ["train.num_workers=1", "train.global_batch_size=4", "train.per_device_batch_size=4",
                                      f"model.name_or_path={mistral_model_dir}", "train.warmup_ratio=0"])
    tokenizer = load_tokenizer(recipe)
    rows = tokenize_sft(tokenizer, [{"messages": chat_row(0, "train", i)["messages"]} for i in range(4)],
                        recipe.data.max_length, "keep_start", False)
    assert recipe.train.padding_free and max(len(r["input_ids"]) for r in rows) > 16  # the sliding window
    objective = make_objective(recipe, tokenizer.pad_token_id)
    batch = objective.collate({k: np.array([np.array(r[k]) for r in rows], dtype=object) for k in rows[0]})
    engine = build_engine(recipe, str(mistral_model_dir), total_steps=1)
    lm = engine.module.lm
    assert hasattr(lm.lm_head.weight, "ds_status")  # partitioned, and not the embeddings' weight
    assert lm.lm_head.weight.ds_id != lm.model.embed_tokens.weight.ds_id
    metrics = train_step(engine, objective, [batch])

    plain = AutoModelForCausalLM.from_pretrained(mistral_model_dir)
    assert not plain.config.tie_word_embeddings
    longest = max(len(r["input_ids"]) for r in rows)
    pad = [longest - len(r["input_ids"]) for r in rows]
    loss = plain(input_ids=torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * k for r, k in zip(rows, pad)]),
                 attention_mask=torch.tensor([[1] * len(r["input_ids"]) + [0] * k for r, k in zip(rows, pad)]),
                 labels=torch.tensor([r["labels"] + [-100] * k for r, k in zip(rows, pad)])).loss
    loss.backward()
    norm = torch.stack([p.grad.norm() for p in plain.parameters()]).norm().item()
    without_head = torch.stack([p.grad.norm() for n, p in plain.named_parameters() if n != "lm_head.weight"]).norm()
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert abs(without_head.item() - norm) > 1e-2 * norm  # the head's share is large enough to be missed
