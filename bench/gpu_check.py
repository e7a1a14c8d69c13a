"""The device check: what a first GPU cluster run depends on, tried on one GPU machine in about 10 minutes, into one
JSON file. Each section records `ok`, its figures or its error, and the script goes on to the next.

    python bench/gpu_check.py [--out gpu_check.json] [--device cuda|cpu] [--quick]

- environment: GPU, driver, torch and its CUDA, nvcc, and the versions of ray, deepspeed, transformers, trl,
  flash-attn, bitsandbytes and vllm (the machine may lack some: ../shared/docs/gpu.md says how to carry wheels).
- optimizer: the AdamW that `deepspeed.initialize` builds from our config is torch's fused AdamW on GPU
  (`deepspeed_setup.adamw_params`), built in seconds, with no DeepSpeed op compiled.
- correctness: a tiny untied Mistral (the ZeRO-3 head-gather path), world size 1, ZeRO-3, our engine and SFT step
  against plain PyTorch on the same batches: the loss and grad norm of step 1 and the loss of step 2 (after one
  AdamW update with clipping), padding-free off and on (FlashAttention's varlen path on GPU), with and without
  gradient checkpointing; bf16 on GPU (the recipes' precision), fp32 on CPU.
- qlora: one step of a 4-bit LoRA engine (bitsandbytes, ZeRO-2): a finite loss, and the adapter moved.
- width: a 7B-width Mistral (hidden 4096, 32 heads, 8 KV heads, intermediate 14336) with 4 and 8 layers, through
  `bench/bench_train.py --device cuda` (ours and TRL's SFT and DPO steps): tokens/s, peak memory (the 8 - 4 layer
  difference is 4 layers' worth), MFU against the bf16 matmul rate measured in the same process.
- vllm: when vllm imports, our serving engine on vLLM answers with n=2, a seed and a stop sequence.

`--device cpu --quick` runs the first three sections on CPU (fp32): `tests/test_gpu_check.py` runs it, so the script
itself is known to work before a GPU machine is at hand. Record the figures, with the device name and date, in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PACKAGES = ("torch", "ray", "deepspeed", "transformers", "trl", "flash-attn", "bitsandbytes", "vllm", "peft")


def section(results: dict, name: str, fn) -> None:
    """Run one section; its figures, or its error, go into `results[name]`."""
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as exc:  # noqa: BLE001 - a failed section is a result, and the next one still runs
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']} "
          f"({results[name]['seconds']} s)", flush=True)


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip() if smi else None
    return {"python": sys.version.split()[0], "packages": versions, "torch_cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "nvidia_smi": driver,
            "nvcc": shutil.which("nvcc")}


def tiny_mistral(folder: Path) -> str:
    """A Mistral small enough for seconds per step, with an LM head of its own (untied, as zephyr-7b's)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from ray_zephyr.embedded import build_tokenizer

    if not (folder / "config.json").is_file():
        tokenizer = build_tokenizer()
        config = MistralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                               max_position_embeddings=512, sliding_window=None, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        MistralForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def attention(device: str) -> str:
    return "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def _recipe(model: str, device: str, *overrides: str):
    from ray_zephyr.config import load_recipe

    return load_recipe("tiny-sft", [f"model.name_or_path={model}", "train.num_workers=1", "train.global_batch_size=4",
                                    "train.per_device_batch_size=4", "train.lr=1.0e-3", "train.lr_scheduler=constant",
                                    "train.warmup_ratio=0", "train.max_grad_norm=1.0", "train.weight_decay=0",
                                    "data.max_length=128", "train.optimizer=adamw", "train.padding_free=false",
                                    f"train.use_gpu={device == 'cuda'}", f"model.attn_implementation={attention(device)}",
                                    *overrides])


def _batches(recipe, n: int) -> list[dict]:
    import numpy as np

    from ray_zephyr.data.tokenize import tokenize_sft
    from ray_zephyr.embedded import chat_row
    from ray_zephyr.models import load_tokenizer

    tokenized = tokenize_sft(load_tokenizer(recipe), [{"messages": chat_row(0, "gpu-check", i)["messages"]}
                                                      for i in range(4 * n)], 128, "keep_start", False)
    return [{k: np.array([np.array(t[k]) for t in tokenized[i:i + 4]], dtype=object) for k in ("input_ids", "labels")}
            for i in range(0, 4 * n, 4)]


def plain_pytorch(model_dir: str, rows: list[dict], device: str, checkpointing: bool) -> dict:
    """The same two steps by hand: padded batches, the mean next-token loss over the assistant tokens, AdamW with
    clipping at 1.0 (what the recipe above asks of DeepSpeed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ray_zephyr.data.collate import collate_sft

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    out = {}
    for step, row in enumerate(rows, start=1):
        batch = {k: v.to(device) for k, v in collate_sft(row, 0).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="sum") / (labels != -100).sum()
        loss.backward()
        out[f"step_{step}_loss"] = loss.item()
        out[f"step_{step}_grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad()
    return out


def ours(model_dir: str, device: str, padding_free: bool, checkpointing: bool) -> tuple[dict, list[dict], object]:
    from ray_zephyr.models import load_tokenizer
    from ray_zephyr.train.deepspeed_setup import build_engine, init_single_process
    from ray_zephyr.train.objectives import make_objective
    from ray_zephyr.train.step import train_step

    init_single_process()
    recipe = _recipe(model_dir, device, f"train.padding_free={padding_free}",
                     f"model.gradient_checkpointing={checkpointing}")
    rows = _batches(recipe, 2)
    engine = build_engine(recipe, model_dir, total_steps=2)
    objective = make_objective(recipe, load_tokenizer(recipe).pad_token_id)
    out = {}
    for step, row in enumerate(rows, start=1):
        metrics = train_step(engine, objective, [objective.collate(row)])
        out[f"step_{step}_loss"], out[f"step_{step}_grad_norm"] = metrics["loss"], metrics["grad_norm"]
    return out, rows, engine


def optimizer_check(device: str, work: Path) -> dict:
    import torch

    start = time.perf_counter()
    _, _, engine = ours(tiny_mistral(work / "tiny-mistral"), device, padding_free=False, checkpointing=False)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the basic optimizer
    kind = f"{type(inner).__module__}.{type(inner).__name__}"
    fused = bool(getattr(inner, "defaults", {}).get("fused"))
    if not isinstance(inner, torch.optim.AdamW) or fused != (device == "cuda"):
        raise AssertionError(f"DeepSpeed built {kind} (fused={fused}); expected torch's AdamW, fused on GPU")
    return {"optimizer": kind, "fused": fused, "engine_seconds": round(time.perf_counter() - start, 1)}


def correctness(device: str, work: Path) -> dict:
    """Ours against plain PyTorch: bf16 on GPU agrees to bf16's precision, fp32 on CPU to float noise."""
    model_dir = tiny_mistral(work / "tiny-mistral")
    tolerance = 2e-2 if device == "cuda" else 1e-4
    cases = {}
    for padding_free in (False, True):
        for checkpointing in (False, True):
            if padding_free and device == "cuda" and not attention(device).startswith("flash"):
                cases[f"padding_free={padding_free},checkpointing={checkpointing}"] = {
                    "skipped": "padding-free on GPU needs flash-attn (refused with sdpa: config.Recipe)", "agree": True}
                continue
            mine, rows, _ = ours(model_dir, device, padding_free, checkpointing)
            theirs = plain_pytorch(model_dir, rows, device, checkpointing)
            worst = max(abs(mine[k] - theirs[k]) / max(abs(theirs[k]), 1e-6) for k in theirs)
            cases[f"padding_free={padding_free},checkpointing={checkpointing}"] = {
                "ours": mine, "plain_pytorch": theirs, "worst_relative_difference": worst, "agree": worst <= tolerance}
    if not all(c["agree"] for c in cases.values()):
        raise AssertionError(f"differs from plain PyTorch beyond {tolerance}: "
                             f"{ {k: c.get('worst_relative_difference') for k, c in cases.items()} }")
    return {"tolerance": tolerance, "cases": cases}


def qlora(device: str, work: Path) -> dict:
    import torch

    from ray_zephyr.models import load_tokenizer
    from ray_zephyr.train.deepspeed_setup import build_engine, init_single_process
    from ray_zephyr.train.objectives import make_objective
    from ray_zephyr.train.step import train_step

    if device != "cuda" or not importlib.util.find_spec("bitsandbytes"):
        return {"skipped": "needs a GPU and bitsandbytes"}
    init_single_process()
    model_dir = tiny_mistral(work / "tiny-mistral")
    recipe = _recipe(model_dir, device, "model.lora={r: 8, alpha: 16}", "model.load_in_4bit=true", "train.zero_stage=2")
    engine = build_engine(recipe, model_dir, total_steps=1)
    adapter = {n: p.detach().clone() for n, p in engine.module.named_parameters() if "lora_B" in n}
    objective = make_objective(recipe, load_tokenizer(recipe).pad_token_id)
    loss = train_step(engine, objective, [objective.collate(_batches(recipe, 1)[0])])["loss"]
    moved = any(not torch.equal(adapter[n], p) for n, p in engine.module.named_parameters() if n in adapter)
    if not (math.isfinite(loss) and moved):
        raise AssertionError(f"QLoRA step: loss {loss}, adapter moved: {moved}")
    return {"loss": loss, "adapter_moved": moved}


def width(device: str, work: Path, quick: bool) -> dict:
    if device != "cuda":
        return {"skipped": "GPU only"}
    out = {}
    for layers, sides in ((4, []), (8, ["--stages", "sft", "--sides", "ours"])):  # 8: our SFT's memory only
        path = work / f"width-{layers}.json"
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--device", "cuda",
                               "--hidden", "4096", "--layers", str(layers), "--vocab", "smollm2", "--untied-head",
                               "--steps",
                               "3" if quick else "6", "--batch", "4", "--max-length", "1024", "--out", str(path),
                               *sides], capture_output=True, text=True, timeout=900)
        out[f"{layers}_layers"] = json.loads(path.read_text()) if path.is_file() else {"error": done.stderr[-2000:]}
        out[f"{layers}_layers"]["stdout"] = done.stdout[-2000:]
    return out


def vllm_smoke(device: str, work: Path) -> dict:
    if device != "cuda" or not importlib.util.find_spec("vllm"):
        return {"skipped": "needs a GPU and vllm"}
    import asyncio

    from ray_zephyr.serving.engines import load_engine
    from ray_zephyr.serving.protocol import ChatRequest
    from ray_zephyr.serving.service import ChatService
    from ray_zephyr.serving.settings import ServeSettings

    async def ask() -> list:
        settings = ServeSettings(model=tiny_mistral(work / "tiny-mistral"), model_name="tiny", engine="vllm",
                                 num_gpus=1, max_n=2)
        service = ChatService(load_engine(settings), "tiny", 2)
        request = ChatRequest.model_validate({"model": "tiny", "messages": [{"role": "user", "content": "What is 3 plus 4?"}],
                                              "n": 2, "seed": 7, "max_tokens": 16, "stop": ["."]})
        return await service.answers(service.tokenize_request(request))

    answers = asyncio.run(ask())
    return {"answers": [{"text": a.text, "finish_reason": a.finish_reason, "tokens": a.tokens} for a in answers]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="The GPU device check (one JSON of results)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="the checks without the width probe and vLLM")
    args = parser.parse_args(argv)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device}
    with tempfile.TemporaryDirectory(prefix="rz-gpu-check-") as folder:
        work = Path(folder)
        section(results, "environment", environment)
        section(results, "optimizer", lambda: optimizer_check(args.device, work))
        section(results, "correctness", lambda: correctness(args.device, work))
        if not args.quick:
            section(results, "qlora", lambda: qlora(args.device, work))
            section(results, "width", lambda: width(args.device, work, args.quick))
            section(results, "vllm", lambda: vllm_smoke(args.device, work))
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
