"""Fixed overhead a newcomer waits through, end to end, each command a fresh process as a user types it:

- `jobs/sft.py --config tiny-sft train.max_steps=5` (its own local Ray: start, tokenize, workers, DeepSpeed, 5
  steps, save) against TRL 1.16's SFTTrainer on the same tiny model, rows, batch and steps (import, tokenize, 5
  steps, save), one process on the same machine;
- `jobs/preview.py --config tiny-sft` (its own local Ray);
- a missing data file (`jobs/sft.py ... data.train=[{path: /missing.jsonl}]`): the one-line error, before Ray.

    python bench/bench_startup.py [--repeats 1]

Prints each wall time, the target it is held to (docs/benchmarks.md), and ours over TRL's for the SFT run.
Run it on a quiet machine (load average < 1.5): the figures are seconds of a 2-core machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sft": 45.0, "preview": 20.0, "missing": 3.0}  # seconds (issue 29, item 8)

# TRL's side: the embedded model and the same generated chats as tiny-sft's embedded source, 16 per step (warmup:
# tiny-sft's 0.1 of 5 steps, rounded up, is 1 step)
TRL_SFT = """
import tempfile
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
import trl
from ray_zephyr.embedded import chat_row
from ray_zephyr.models import resolve_model_path
folder = resolve_model_path("embedded")
rows = Dataset.from_list([{"messages": chat_row(42, "train", i)["messages"]} for i in range(2000)])
out = tempfile.mkdtemp()
args = trl.SFTConfig(output_dir=out, per_device_train_batch_size=16, max_steps=5, learning_rate=3e-3, max_length=128,
                     lr_scheduler_type="cosine", warmup_steps=1, assistant_only_loss=True, logging_steps=5,
                     report_to=[], use_cpu=True, save_strategy="no", dataset_num_proc=None)
trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args, train_dataset=rows,
                         processing_class=AutoTokenizer.from_pretrained(folder))
trainer.train()
trainer.save_model(out + "/model")
"""


def timed(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command; the fastest counts")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each job starts its own Ray, as on a laptop
    print(f"load average before: {os.getloadavg()[0]:.2f} (figures count below 1.5)")
    tmp = Path(tempfile.mkdtemp(prefix="rz-startup-"))
    commands = {
        "sft": [sys.executable, "jobs/sft.py", "--config", "tiny-sft", "train.max_steps=5",
                f"train.output_dir={tmp / 'sft'}"],
        "trl_sft": [sys.executable, "-c", TRL_SFT],
        "preview": [sys.executable, "jobs/preview.py", "--config", "tiny-sft"],
        "missing": [sys.executable, "jobs/sft.py", "--config", "tiny-sft", "data.train=[{path: /missing.jsonl}]",
                    f"train.output_dir={tmp / 'missing'}"],
    }
    best = {}
    for name, command in commands.items():
        for _ in range(args.repeats):
            seconds, done = timed(command, env)
            failed = done.returncode != 0 if name != "missing" else "error: data source" not in done.stderr
            if failed:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            best[name] = min(best.get(name, seconds), seconds)
        target = f"  (target <= {TARGETS[name]:.0f} s)" if name in TARGETS else ""
        print(f"{name:8s} {best[name]:6.1f} s{target}", flush=True)
    print(f"sft / trl_sft: {best['sft'] / best['trl_sft']:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
