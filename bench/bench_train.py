"""SFT and DPO step throughput (tokens/s) and peak memory: ours (DeepSpeed ZeRO-3 engine, world size 1) vs
TRL 1.16's trainers, on the same tiny model, rows, batch, length and precision (fp32, CPU, one process).

    python bench/bench_train.py [--steps 20] [--hidden 256] [--layers 4]

Each side runs in its own subprocess so peak RSS is its own. Prints both and the ratio (ours / TRL).
"""

from __future__ import annotations

import argparse
import os
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def model_dir(hidden: int, layers: int) -> str:
    from ray_zephyr.embedded import save_embedded_model

    return str(save_embedded_model(Path(tempfile.gettempdir()) / f"bench-tiny-{hidden}x{layers}", hidden, layers))


def run_ours(stage: str, path: str, steps: int, resident: bool = False) -> dict:
    import numpy as np

    from ray_zephyr.config import load_recipe
    from ray_zephyr.data.tokenize import load_tokenizer, tokenize_preference, tokenize_sft
    from ray_zephyr.data.validate import Invalid
    from ray_zephyr.train.engine import build_engine, build_reference, init_single_process
    from ray_zephyr.train.reference import ReferenceScorer
    from ray_zephyr.train.step import make_objective, train_step

    init_single_process()
    recipe = load_recipe(f"tiny-{stage}", [f"model.name_or_path={path}", "train.num_workers=1",
                                            f"train.global_batch_size={BATCH}", f"train.per_device_batch_size={BATCH}",
                                            f"data.max_length={MAX_LENGTH}", "train.lr=1.0e-4",
                                            f"train.zero_stage={os.environ.get('BENCH_ZERO_STAGE', '3')}"])
    tokenizer = load_tokenizer(recipe)
    tokenize = tokenize_sft if stage == "sft" else tokenize_preference
    tokenized = [t for t in tokenize(tokenizer, rows(stage, BATCH * (steps + 2)), MAX_LENGTH, "keep_start", False)
                 if not isinstance(t, Invalid)]  # the rows TRL drops too (no assistant token / prompt too long)
    batches = [{k: np.array([np.array(t[k]) for t in tokenized[i:i + BATCH]], dtype=object) for k in tokenized[0]}
               for i in range(0, len(tokenized), BATCH)]
    reference = None
    if stage == "dpo" and resident:  # the frozen reference engine beside the policy, scored every step
        reference = build_reference(recipe, path)
    elif stage == "dpo":  # what the Ray Data reference pass adds before training (not timed: done once, off the step)
        scorer = ReferenceScorer(recipe, path, tokenizer.pad_token_id)
        batches = [scorer(b) for b in batches]
    engine = build_engine(recipe, path, total_steps=steps + 2)
    objective = make_objective(recipe, tokenizer.pad_token_id, reference)
    train_step(engine, objective, batches[:1]), train_step(engine, objective, batches[1:2])  # warm-up
    tokens, start = 0, time.perf_counter()
    for b in batches[2:]:
        tokens += train_step(engine, objective, [b])["step_tokens"]
    return {"tokens/s": tokens / (time.perf_counter() - start)}


def run_trl(stage: str, path: str, steps: int) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, report_to=[],
                  use_cpu=True, bf16=False, learning_rate=1e-4, max_steps=steps + 2, gradient_checkpointing=False,
                  dataloader_drop_last=True, logging_steps=10**6, save_strategy="no")
    data = Dataset.from_list(rows(stage, BATCH * (steps + 2)))
    model = AutoModelForCausalLM.from_pretrained(path)
    if stage == "sft":
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(assistant_only_loss=True, **common),
                                 train_dataset=data, processing_class=tokenizer)
    else:  # TRL's fastest setup: reference log-probs precomputed before training, as ours
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(precompute_ref_log_probs=True, **common),
                                 train_dataset=data, processing_class=tokenizer)
    loader = trainer.get_train_dataloader()
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 2)
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    tokens, start = 0, None
    for i, batch in enumerate(loader):
        if i == 2:
            start = time.perf_counter()
        if i >= 2:
            tokens += int(batch["attention_mask"].sum())
        trainer.training_step(model, batch)
        trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step(), trainer.lr_scheduler.step(), trainer.optimizer.zero_grad()
    return {"tokens/s": tokens / (time.perf_counter() - start)}


def child(side: str, stage: str, path: str, steps: int) -> None:
    import torch

    torch.manual_seed(0)
    run = {"ours": run_ours, "ours-resident": lambda *a: run_ours(*a, resident=True), "trl": run_trl}[side]
    out = run(stage, path, steps)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "STAGE", "PATH"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.steps)
    path = model_dir(args.hidden, args.layers)
    print(f"model: tiny Llama hidden={args.hidden} layers={args.layers}; batch {BATCH}, max_length {MAX_LENGTH}, fp32 CPU, "
          f"{args.steps} timed steps")
    for stage in ("sft", "dpo"):
        results = {}
        for side in ("ours", "trl") + (("ours-resident",) if stage == "dpo" else ()):
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", side, stage, path],
                                  capture_output=True, text=True, check=True)
            results[side] = json.loads(proc.stdout.split("RESULT ")[-1])
        ours, trl = results["ours"], results["trl"]
        print(f"{stage}: ours {ours['tokens/s']:.0f} tokens/s, peak {ours['peak_rss_mib']:.0f} MiB | "
              f"TRL {trl['tokens/s']:.0f} tokens/s, peak {trl['peak_rss_mib']:.0f} MiB | "
              f"ratio {ours['tokens/s'] / trl['tokens/s']:.2f}x")
        if "ours-resident" in results:
            resident = results["ours-resident"]
            print(f"{stage} with a resident reference engine: {resident['tokens/s']:.0f} tokens/s, peak "
                  f"{resident['peak_rss_mib']:.0f} MiB (precomputed is {ours['tokens/s'] / resident['tokens/s']:.2f}x)")


if __name__ == "__main__":
    main()
