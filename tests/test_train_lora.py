"""LoRA (peft) in the training step, one process (world size 1, DeepSpeed on CPU), on the tiny model: what is
trainable, what changes, the adapter folder and the merged model against the trained model, serving the adapter
folder, resume, the DPO reference with the adapter off (against the precomputed pass and against TRL + peft), DPO
from an SFT adapter, and the recipe checks. QLoRA on CPU is in tests/test_train_qlora.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_zephyr.config import load_recipe
from ray_zephyr.data.tokenize import tokenize_sft
from ray_zephyr.embedded import chat_row
from ray_zephyr.errors import UserError
from ray_zephyr.models import load_tokenizer
from ray_zephyr.train import checkpoint
from ray_zephyr.train.deepspeed_setup import (
    build_engine,
    build_reference,
    init_single_process,
    save_hf_model,
    save_merged,
)
from ray_zephyr.train.objectives import make_objective
from ray_zephyr.train.reference import ReferenceScorer
from ray_zephyr.train.step import eval_metrics, train_step
from tests.test_train_step import _rows as preference_rows

peft = pytest.importorskip("peft")

LORA = "model.lora={r: 4, alpha: 8, dropout: 0.0}"  # the default targets: every attention and MLP projection
ONE_WORKER = ["train.num_workers=1", "train.global_batch_size=8", "train.per_device_batch_size=4", "train.warmup_ratio=0"]


def sft_recipe(model_dir, *overrides: str):
    return load_recipe("tiny-sft", [*ONE_WORKER, f"model.name_or_path={model_dir}", LORA, "train.lr=0.02", *overrides])


def sft_batches(recipe, tokenizer, objective, n: int = 16, per: int = 4) -> list[dict]:
    tokenized = tokenize_sft(tokenizer, [chat_row(0, "train", i) for i in range(n)], 128, "keep_start", False)
    rows = {k: np.array([np.array(t[k]) for t in tokenized], dtype=object) for k in tokenized[0]}
    return [objective.collate({k: v[i : i + per] for k, v in rows.items()}) for i in range(0, n, per)]


def gathered_weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's model, whole (gathered from ZeRO-3 partitions)."""
    import deepspeed

    out = {}
    for name, param in engine.module.lm.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().clone()
    return out


def logits(model, probe: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


@pytest.fixture(scope="module")
def sft_run(embedded_model_dir, tmp_path_factory):
    """Two LoRA SFT steps under ZeRO-3 (the tiny recipes' stage), the adapter saved and merged as a run does."""
    init_single_process()
    out = tmp_path_factory.mktemp("lora-sft")
    recipe = sft_recipe(embedded_model_dir)
    tokenizer = load_tokenizer(recipe)
    objective = make_objective(recipe, tokenizer.pad_token_id)
    engine = build_engine(recipe, str(embedded_model_dir), total_steps=2)
    batches = sft_batches(recipe, tokenizer, objective)
    before, loss_before = gathered_weights(engine), eval_metrics(engine, objective, batches[0:2])["eval_loss"]
    for step_batches in (batches[0:2], batches[2:4]):
        train_step(engine, objective, step_batches)
    after, loss_after = gathered_weights(engine), eval_metrics(engine, objective, batches[0:2])["eval_loss"]
    save_hf_model(engine, tokenizer, str(out / "model"), rank=0)
    save_merged(recipe, str(out / "model"), tokenizer, str(out / "merged"))
    probe = tokenizer(["<|user|>\nWhat is 2 plus 3?</s>\n<|assistant|>\n2 plus 3 is 5.", "Sort 3 1 2."],
                      return_tensors="pt", padding=True)
    engine.eval()
    return SimpleNamespace(recipe=recipe, engine=engine, losses=(loss_before, loss_after), before=before, after=after, out=out,
                           probe=probe, trained=logits(engine.module.lm, probe), tokenizer=tokenizer)


def test_only_the_adapter_is_trainable_r_times_each_projection(sft_run):
    lm = sft_run.engine.module.lm
    c = lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, h, i = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, c.hidden_size, c.intermediate_size
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)  # A: r x in, B: out x r for each projection
    trainable = {n: p.ds_numel for n, p in lm.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 4 * per_layer * c.num_hidden_layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * c.num_hidden_layers


def test_training_changes_the_adapter_and_nothing_else(sft_run):
    before, after = sft_run.before, sft_run.after
    assert sft_run.losses[1] < sft_run.losses[0]  # on the same rows
    for name in before:
        if ".lora_B." in name:  # zero at the start (so the adapter starts as a no-op), trained since
            assert not before[name].any() and after[name].abs().sum() > 0, name
        elif ".lora_A." not in name:
            assert torch.equal(before[name], after[name]), name


def test_adapter_folder_reloads_and_merges_to_the_trained_model(sft_run, embedded_model_dir):
    adapter = sft_run.out / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(embedded_model_dir))

    unmerged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model_dir), adapter).eval()
    expected = sft_run.trained
    torch.testing.assert_close(logits(unmerged, sft_run.probe), expected, rtol=1e-5, atol=1e-5)
    merged = unmerged.merge_and_unload()
    torch.testing.assert_close(logits(merged, sft_run.probe), expected, rtol=1e-5, atol=1e-5)
    published = AutoModelForCausalLM.from_pretrained(sft_run.out / "merged").eval()  # model.lora.merge's output
    torch.testing.assert_close(logits(published, sft_run.probe), expected, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name in published.state_dict())


def test_cpu_engine_serves_an_adapter_folder_as_its_merged_model(sft_run):
    from ray_zephyr.serving.engines import load_engine
    from ray_zephyr.serving.protocol import ChatRequest
    from ray_zephyr.serving.service import ChatService
    from ray_zephyr.serving.settings import ServeSettings

    def answer(folder) -> str:
        settings = ServeSettings(model=str(folder), engine="transformers", num_gpus=0)
        service = ChatService(load_engine(settings), settings.served_name(), max_n=1)
        request = ChatRequest(model=settings.served_name(), messages=[{"role": "user", "content": "Sort 3 1 2."}],
                              temperature=0, max_tokens=12)
        return asyncio.run(service.complete(service.tokenize_request(request))).choices[0].message.content

    from_adapter = answer(sft_run.out / "model")
    assert from_adapter and from_adapter == answer(sft_run.out / "merged")


def test_resume_restores_the_adapter_and_its_optimizer_state(embedded_model_dir, tmp_path):
    """Checkpoint after step 2 of 4 (ZeRO-2, the QLoRA recipes' stage), resume in a fresh engine: steps 3 and 4
    end with exactly the weights of the uninterrupted run; the checkpoint holds no frozen weight."""
    init_single_process()
    recipe = sft_recipe(embedded_model_dir, "train.zero_stage=2")
    tokenizer = load_tokenizer(recipe)
    objective = make_objective(recipe, tokenizer.pad_token_id)
    batches = sft_batches(recipe, tokenizer, objective, n=32)
    plain = build_engine(recipe, str(embedded_model_dir), total_steps=4)
    for step in range(4):
        train_step(plain, objective, batches[2 * step : 2 * step + 2])
        if step == 1:
            checkpoint.save_state(plain, str(tmp_path), checkpoint.Position(global_step=2, step_in_epoch=2))
    saved = torch.load(next(tmp_path.rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert any(".lora_" in name for name in saved)
    # beside the adapter: buffers, and the tiny model's lm_head, which DeepSpeed keeps as a tied (shared) parameter
    assert [n for n in saved if n.endswith(".weight") and ".lora_" not in n] == ["lm.lm_head.weight"]

    resumed = build_engine(recipe, str(embedded_model_dir), total_steps=4)
    assert checkpoint.load_state(resumed, str(tmp_path)).global_step == 2
    for step in (2, 3):
        train_step(resumed, objective, batches[2 * step : 2 * step + 2])
    expected, got = gathered_weights(plain), gathered_weights(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def dpo_recipe(model_dir, *overrides: str):
    return load_recipe("tiny-dpo", [*ONE_WORKER, f"model.name_or_path={model_dir}", LORA, "dpo.beta=0.5",
                                    "dpo.rpo_alpha=0", "train.lr=0.02", *overrides])


def dpo_runs(recipe, model_dir: str, steps: int = 2) -> dict[str, list[dict]]:
    """The same DPO steps with the reference precomputed (Ray Data's scorer) and resident (the adapter off)."""
    init_single_process()
    tokenizer = load_tokenizer(recipe)
    rows = preference_rows(recipe, tokenizer, 8 * steps)
    micro = [{k: v[i : i + 4] for k, v in rows.items()} for i in range(0, 8 * steps, 4)]
    scorer = ReferenceScorer(recipe, model_dir, tokenizer.pad_token_id)
    runs = {}
    for mode, batches in [("precomputed", [scorer(m) for m in micro]), ("resident", micro)]:
        engine = build_engine(recipe, model_dir, total_steps=steps)
        reference = build_reference(recipe, model_dir, engine) if mode == "resident" else None
        objective = make_objective(recipe, tokenizer.pad_token_id, reference)
        batches = [objective.collate(b) for b in batches]
        runs[mode] = [train_step(engine, objective, batches[2 * s : 2 * s + 2]) for s in range(steps)]
    return runs


def test_dpo_reference_with_the_adapter_off_equals_the_precomputed_pass(embedded_model_dir):
    runs = dpo_runs(dpo_recipe(embedded_model_dir), str(embedded_model_dir))  # ZeRO-3
    assert runs["resident"][0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # a fresh adapter is a no-op
    for step in range(2):
        for name in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected", "grad_norm"):
            assert runs["precomputed"][step][name] == pytest.approx(runs["resident"][step][name], abs=1e-5), name
    assert runs["resident"][1]["rewards/margins"] != 0.0


def test_dpo_from_an_sft_adapter_starts_from_the_merged_sft_model(sft_run):
    """The SFT adapter is merged into its base as the DPO run loads it, and a new adapter trains on top: the
    reference (adapter off, or precomputed from the adapter folder) is the merged SFT model."""
    adapter = str(sft_run.out / "model")
    recipe = dpo_recipe(adapter, "train.zero_stage=2")
    runs = dpo_runs(recipe, adapter, steps=1)
    assert runs["resident"][0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert runs["precomputed"][0]["logps/chosen"] == pytest.approx(runs["resident"][0]["logps/chosen"], abs=1e-5)
    tokenizer = load_tokenizer(recipe)
    rows = preference_rows(recipe, tokenizer, 4)
    from_adapter = ReferenceScorer(recipe, adapter, tokenizer.pad_token_id)(rows)
    from_merged = ReferenceScorer(recipe, str(sft_run.out / "merged"), tokenizer.pad_token_id)(rows)
    np.testing.assert_allclose(from_adapter["ref_chosen_logps"], from_merged["ref_chosen_logps"], atol=1e-4)
    with pytest.raises(UserError, match=r"is a LoRA adapter, merged into its base as it loads.*zero_stage=2"):
        build_engine(dpo_recipe(adapter), adapter, total_steps=1)  # ZeRO-3


def test_dpo_loss_with_the_adapter_off_equals_trl_with_peft(embedded_model_dir, tmp_path):
    """TRL 1.16's DPOTrainer given a peft LoraConfig (its reference: the adapter disabled) and ours on TRL's batch
    and adapter, with the adapter moved off zero so policy and reference differ."""
    from datasets import Dataset

    from ray_zephyr.embedded import preference_row
    from ray_zephyr.lora import AdapterOff
    from ray_zephyr.train.objectives import MetricSums, dpo_loss, dpo_metrics
    from ray_zephyr.train.scoring import TokenScorer, sequence_logps
    from tests.test_train_objectives import _first_batch

    trl = pytest.importorskip("trl")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    rows = [preference_row(0, "train", i) for i in range(6)]
    data = Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
                              for r in rows])
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, beta=0.2, max_length=48,
                         report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                           task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(embedded_model_dir), args=args,
                             train_dataset=data, processing_class=tokenizer, peft_config=lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if ".lora_B." in name:
                param.add_(torch.randn_like(param) * 0.1)
    batch = _first_batch(trainer)
    expected = trainer.compute_loss(trainer.model, batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    scorer = TokenScorer(trainer.model.get_base_model())  # what build_engine hands DeepSpeed: the LM, adapter inside
    reference = AdapterOff(scorer, scorer.lm)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "score_mask": batch["completion_mask"]}
    stats = scorer(**inputs)
    chosen, rejected = sequence_logps(stats, len(batch["input_ids"]))
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(reference(**inputs, token_stats=False), len(batch["input_ids"]))
    per_pair = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, batch["completion_mask"].sum(1), 0.2, "sigmoid")
    metrics = MetricSums()
    dpo_metrics(metrics, stats, per_pair, chosen, rejected, ref_chosen, ref_rejected, 0.2)
    ours = metrics.means()
    assert ours["loss"] == pytest.approx(expected, abs=1e-5) and abs(expected - np.log(2)) > 1e-4
    for name in ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]:
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert all(layer.disable_adapters is False for layer in reference.layers)  # switched back on


def test_qlora_recipes_carry_the_handbook_values_and_bad_combinations_are_one_line_errors():
    sft, dpo = load_recipe("zephyr-7b-beta-sft-qlora"), load_recipe("zephyr-7b-beta-dpo-qlora")
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sft.model.load_in_4bit and (sft.model.lora.r, sft.model.lora.alpha, sft.model.lora.dropout) == (16, 16, 0.05)
    assert sft.model.lora.target_modules == projections and sft.train.lr == 2e-4 and sft.train.zero_stage == 2
    assert dpo.model.load_in_4bit and (dpo.model.lora.r, dpo.model.lora.alpha, dpo.dpo.beta) == (128, 128, 0.01)
    assert (dpo.train.lr, dpo.data.max_length, dpo.data.max_prompt_length, dpo.train.optimizer) == (
        5e-6, 1024, 512, "paged_adamw")
    assert dpo.model.name_or_path == f"{sft.train.output_dir}/model" and dpo.dpo.reference == "resident"
    for overrides, message in [
        (["model.load_in_4bit=true"], "model: load_in_4bit trains a LoRA adapter on 4-bit weights: set model.lora too"),
        (["model.load_in_4bit=true", LORA], "model.load_in_4bit needs train.zero_stage=2: ZeRO-3 does not partition"),
        (["model.lora.rank=8"], "unknown key 'model.lora.rank'"),
    ]:
        with pytest.raises(UserError) as info:
            load_recipe("tiny-sft", overrides)
        assert message in str(info.value) and "\n" not in str(info.value)
