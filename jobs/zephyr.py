"""The whole Zephyr recipe on this machine: dSFT -> AI feedback -> dDPO -> evaluation -> chats with the served model.

    python jobs/zephyr.py [--out outputs/zephyr] [--sft tiny-sft] [--aif tiny-aif] [--dpo tiny-dpo] [key=value ...]

AI feedback: the dSFT model answers the task prompts several times, the task's verifier judges, and the
binarized pairs are what dDPO trains on (the dDPO recipe's eval pairs stay the embedded held-out ones).
Overrides apply to both training recipes (`train.max_steps=20`) or to one stage (`sft.train.lr=1e-3`,
`dpo.dpo.beta=0.2`, `aif.generators.0.n=8`).
The terminal shows progress bars and the results; Ray's, DeepSpeed's and the workers' logs go to <out>/zephyr.log.
"""

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ray_zephyr.errors import run_cli
from ray_zephyr.progress import train_with_progress
from ray_zephyr.serving.sample_chats import served_chats

CHAT_PROMPTS = ["What is 3 plus 4?", "Sort 8 1 5.", "Spell tiger backwards."]
SERVED_NAME = "zephyr-tiny"
STAGES = ["dSFT", "AIF", "dDPO", "evaluate", "chat"]
VERIFIER = "ray_zephyr.embedded:verify"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run the Zephyr recipe end to end: dSFT, dDPO, evaluation, chat")
    parser.add_argument("--out", default="outputs/zephyr", help="where the models, curves and summary go")
    parser.add_argument("--sft", default="tiny-sft", help="dSFT recipe (file or shipped name)")
    parser.add_argument("--aif", default="tiny-aif", help="AI-feedback recipe (file or shipped name in recipes/aif)")
    parser.add_argument("--dpo", default="tiny-dpo", help="dDPO recipe (file or shipped name)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for both training stages, or for one with a sft./aif./dpo. prefix")
    return parser.parse_args(argv)


def load_recipes(args):
    """All recipes, validated before anything runs: the dSFT model this run writes answers the AIF prompts and
    is dDPO's start; dDPO trains on the AIF pairs (unless `dpo.data.train` says otherwise)."""
    from ray_zephyr.aif.config import AIFRecipe
    from ray_zephyr.config import load_recipe

    out = Path(args.out).resolve()
    per_stage = {"sft": [], "aif": [], "dpo": []}
    for override in args.overrides:
        stage, _, rest = override.partition(".")
        for name, overrides in per_stage.items():
            if stage == name:
                overrides.append(rest)
            elif stage not in per_stage and name != "aif":
                overrides.append(override)
    sft = load_recipe(args.sft, [*per_stage["sft"], f"train.output_dir={out / 'sft'}"])
    aif = load_recipe(args.aif, [*per_stage["aif"], f"generators.0.model={out / 'sft' / 'model'}",
                                 f"output_dir={out / 'aif'}"], AIFRecipe)
    dpo = load_recipe(args.dpo, [f"data.train=[{{path: {out / 'aif' / 'pairs.parquet'}}}]", *per_stage["dpo"],
                                 f"train.output_dir={out / 'dpo'}", f"model.name_or_path={out / 'sft' / 'model'}"])
    return out, sft, aif, dpo


@contextmanager
def console(log_path: Path):
    """Send everything written to stdout/stderr (by Ray, DeepSpeed, the workers) to `log_path`; yield the
    terminal's (stdout, stderr) for the results and the progress bars."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1), os.dup2(log, 2), os.close(log)
    try:
        yield terminal
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for stream in terminal:
            stream.close()


def task_accuracies(dpo_recipe, sft_dir: Path, dpo_dir: Path) -> dict[str, float]:
    """Greedy task accuracy of both models on the dDPO recipe's held-out prompts, checked by the task's verifier."""
    from ray_zephyr.aif.prompts import read_prompts
    from ray_zephyr.evaluation.task_accuracy import greedy_task_accuracy

    prompts = read_prompts(dpo_recipe.data.eval, dpo_recipe.seed)
    return {"prompts": len(prompts), "sft": greedy_task_accuracy(str(sft_dir), prompts, VERIFIER),
            "dpo": greedy_task_accuracy(str(dpo_dir), prompts, VERIFIER)}


def summary(out: Path, sft, aif, dpo, evaluation, accuracy, chats, timings: dict[str, float]) -> tuple[str, dict]:
    """The final text (table, where things are, how to chat) and the same numbers as a dict for summary.json."""
    from ray_zephyr.report import arrow, first_last, read_metrics, table

    sft_metrics, dpo_metrics = read_metrics(sft.metrics_file), read_metrics(dpo.metrics_file)
    numbers = {
        "sft_train_loss": first_last(sft_metrics["train"], "loss"),
        "sft_eval_loss": first_last(sft_metrics["eval"], "eval_loss"),
        "dpo_eval_loss": first_last(dpo_metrics["eval"], "eval_loss"),
        "dpo_eval_reward_accuracy": first_last(dpo_metrics["eval"], "eval_rewards/accuracies"),
        "dpo_eval_reward_margin": first_last(dpo_metrics["eval"], "eval_rewards/margins"),
        "pairs": evaluation.pairs,
        "sft_preference_accuracy": evaluation.sft.accuracy,
        "dpo_preference_accuracy": evaluation.dpo.accuracy,
        "sft_logp_margin": evaluation.sft.margin,
        "dpo_logp_margin": evaluation.dpo.margin,
        "reward_accuracy": evaluation.reward_accuracy,
        "reward_margin": evaluation.reward_margin,
        "aif": asdict(aif),
        "task_prompts": accuracy["prompts"],
        "sft_task_accuracy": accuracy["sft"],
        "dpo_task_accuracy": accuracy["dpo"],
        "seconds": timings,
    }
    n = evaluation.pairs
    rows = [
        ("dSFT train loss (first -> last logged step)", arrow(numbers["sft_train_loss"])),
        ("dSFT eval loss, held-out chats (first -> last eval)", arrow(numbers["sft_eval_loss"])),
        ("AIF: prompts / completions / pairs (verifier as judge)",
         f"{aif.prompts} / {sum(aif.completions.values())} / {aif.pairs}"),
        (f"greedy task accuracy, SFT model ({accuracy['prompts']} held-out prompts)", f"{accuracy['sft']:.3f}"),
        (f"greedy task accuracy, DPO model ({accuracy['prompts']} held-out prompts)", f"{accuracy['dpo']:.3f}"),
        (f"preference accuracy, SFT model ({n} held-out pairs)", f"{evaluation.sft.accuracy:.3f}"),
        (f"preference accuracy, DPO model ({n} held-out pairs)", f"{evaluation.dpo.accuracy:.3f}"),
        ("log-prob margin chosen - rejected, SFT -> DPO", f"{evaluation.sft.margin:.2f} -> {evaluation.dpo.margin:.2f}"),
        ("DPO reward accuracy / margin vs SFT reference", f"{evaluation.reward_accuracy:.3f} / {evaluation.reward_margin:.3f}"),
        ("dDPO eval loss (first -> last eval)", arrow(numbers["dpo_eval_loss"])),
        ("dDPO eval reward accuracy (first -> last eval)", arrow(numbers["dpo_eval_reward_accuracy"])),
        ("dDPO eval reward margin (first -> last eval)", arrow(numbers["dpo_eval_reward_margin"])),
    ]
    minutes = " + ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.items() if name != "total")
    chat_lines = [f"  user: {prompt}\n  assistant: {answer.strip() or '(nothing: it ended its answer at once)'}"
                  for prompt, answer in chats]
    text = "\n".join([
        f"== ray-zephyr: the Zephyr recipe end to end in {timings['total'] / 60:.1f} min ({minutes}) ==",
        table(rows),
        "preference accuracy: share of pairs where the model gives the chosen answer a higher log-probability than "
        "the rejected one (summed over completion tokens); DPO reward = beta * (log p_DPO - log p_SFT)",
        "",
        "sample chats with the served DPO model:",
        *chat_lines,
        "",
        f"model:   {dpo.model_dir}   (dSFT model: {sft.model_dir})",
        f"curves:  {out / 'training_curves.png'}",
        f"summary: {out / 'summary.json'}   log: {out / 'zephyr.log'}",
        "chat with it (from the repository root):",
        f"  serve run serve.app:build_app model={dpo.model_dir} model_name={SERVED_NAME} engine=transformers num_gpus=0",
        "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{SERVED_NAME}\", \"messages\": [{{\"role\": \"user\", \"content\": \"{CHAT_PROMPTS[0]}\"}}]}}'",
    ])
    return text, numbers


def main(argv=None) -> None:
    args = parse_args(argv)
    out, sft_recipe, aif_recipe, dpo_recipe = load_recipes(args)
    for stage in ("sft", "aif", "dpo"):  # a fresh run: stale step logs would mix into the curves
        shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    start, timings = time.perf_counter(), {}

    with console(out / "zephyr.log") as (stdout, stderr):
        import ray.data
        from tqdm import tqdm

        from ray_zephyr.aif.run import run_aif
        from ray_zephyr.evaluation.preference_accuracy import evaluate_preferences
        from ray_zephyr.report import plot_curves, read_metrics
        from ray_zephyr.runtime import init_ray

        # Ray started for this run, unless told to join one (RAY_ADDRESS, as `ray job submit` sets it).
        own_ray = not os.environ.get("RAY_ADDRESS")
        init_ray(join_existing=not own_ray)
        ray.data.DataContext.get_current().enable_progress_bars = False
        stages = tqdm(STAGES, desc="recipe", unit="stage", file=stderr, position=0)

        def timed(name, fn):
            stages.set_postfix_str(name)
            begin = time.perf_counter()
            result = fn()
            timings[name] = time.perf_counter() - begin
            stages.update(1)
            return result

        sft = timed("dSFT", lambda: train_with_progress(sft_recipe, "dSFT", stderr))
        aif = timed("AIF", lambda: run_aif(aif_recipe))
        dpo = timed("dDPO", lambda: train_with_progress(dpo_recipe, "dDPO", stderr))
        evaluation, accuracy = timed("evaluate", lambda: (
            evaluate_preferences(dpo_recipe, str(sft.model_dir), str(dpo.model_dir)),
            task_accuracies(dpo_recipe, sft.model_dir, dpo.model_dir)))
        plot_curves(read_metrics(sft.metrics_file), read_metrics(dpo.metrics_file), out / "training_curves.png")
        chats = timed("chat", lambda: served_chats(dpo.model_dir, CHAT_PROMPTS, SERVED_NAME, own_ray))
        stages.close()
        timings["total"] = time.perf_counter() - start
        text, numbers = summary(out, sft, aif, dpo, evaluation, accuracy, chats, timings)
        (out / "summary.json").write_text(json.dumps(numbers, indent=2))
        (out / "summary.txt").write_text(text + "\n")
        print(text, file=stdout, flush=True)


if __name__ == "__main__":
    run_cli(main)
