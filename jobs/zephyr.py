"""The whole Zephyr recipe on this machine: dSFT -> rounds of AI feedback and dDPO -> evaluation -> chats with the
served model.

    python jobs/zephyr.py [--out outputs/zephyr] [--rounds 3] [--sft tiny-sft] [--aif tiny-aif] [--dpo tiny-dpo]
                          [key=value ...]

AI feedback: the policy (the dSFT model, then each round's dDPO model) answers the task prompts several times, the
task's verifier judges, and the binarized pairs are what the round's dDPO trains on (ray_zephyr/iterative.py; the
dDPO recipe's eval pairs stay the embedded held-out ones). One round is Zephyr's recipe.
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
from pathlib import Path

from ray_zephyr.errors import run_cli
from ray_zephyr.progress import train_with_progress
from ray_zephyr.serving.sample_chats import served_chats

CHAT_PROMPTS = ["What is 3 plus 4?", "Sort 8 1 5.", "Spell tiger backwards."]
SERVED_NAME = "zephyr-tiny"
STAGES = ["dSFT", "AIF + dDPO rounds", "evaluate", "chat"]
VERIFIER = "ray_zephyr.embedded:verify"
ROUNDS = 3  # 5.8 min in all on a 2-core CPU (docs/results.md)
FRESH_FILES = ("recipe.json", "dsft_task_accuracy.json", "summary.json", "summary.txt", "training_curves.png")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run the Zephyr recipe end to end: dSFT, dDPO, evaluation, chat")
    parser.add_argument("--out", default="outputs/zephyr", help="where the models, curves and summary go")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of AI feedback on the policy's own "
                        "samples, each followed by dDPO (1: Zephyr's recipe)")
    parser.add_argument("--sft", default="tiny-sft", help="dSFT recipe (file or shipped name)")
    parser.add_argument("--aif", default="tiny-aif", help="AI-feedback recipe (file or shipped name in recipes/aif)")
    parser.add_argument("--dpo", default="tiny-dpo", help="dDPO recipe (file or shipped name)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for both training stages, or for one with a sft./aif./dpo. prefix")
    return parser.parse_args(argv)


def load_recipes(args):
    """All recipes, validated before anything runs: the dSFT model this run writes is round 1's policy; each round's
    dDPO trains on that round's AIF pairs (ray_zephyr/iterative.py)."""
    from ray_zephyr.config import load_recipe
    from ray_zephyr.iterative import IterativeRecipe, round_recipes

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
    rounds = IterativeRecipe(rounds=args.rounds, policy=str(out / "sft" / "model"), aif=args.aif, dpo=args.dpo,
                             aif_overrides=per_stage["aif"], dpo_overrides=per_stage["dpo"], prompts="reuse",
                             verifier=VERIFIER, output_dir=str(out))
    for r in range(1, args.rounds + 1):
        round_recipes(rounds, r)
    return out, sft, rounds


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


def summary(out: Path, sft, rounds: dict, rounds_text: str, evaluation, chats, timings: dict[str, float]
            ) -> tuple[str, dict]:
    """The final text (tables, where things are, how to chat) and the same numbers as a dict for summary.json."""
    from ray_zephyr.report import arrow, first_last, read_metrics, table

    last = rounds["rounds"][-1]
    model_dir = Path(last["model"])
    sft_metrics, dpo_metrics = read_metrics(sft.metrics_file), read_metrics(model_dir.parent / "metrics.jsonl")
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
        "rounds": rounds["rounds"],
        "task_prompts": rounds["task_prompts"],
        "sft_task_accuracy": rounds["dsft_task_accuracy"],
        "dpo_task_accuracy": last["task_accuracy"],
        "model": str(model_dir),
        "seconds": timings,
    }
    n, k, final = evaluation.pairs, rounds["task_prompts"], f"round {last['round']}'s DPO model"
    rows = [
        ("dSFT train loss (first -> last logged step)", arrow(numbers["sft_train_loss"])),
        ("dSFT eval loss, held-out chats (first -> last eval)", arrow(numbers["sft_eval_loss"])),
        (f"greedy task accuracy, SFT model ({k} held-out prompts)", f"{numbers['sft_task_accuracy']:.3f}"),
        (f"greedy task accuracy, {final} ({k} held-out prompts)", f"{numbers['dpo_task_accuracy']:.3f}"),
        (f"preference accuracy, SFT model ({n} held-out pairs)", f"{evaluation.sft.accuracy:.3f}"),
        (f"preference accuracy, {final} ({n} held-out pairs)", f"{evaluation.dpo.accuracy:.3f}"),
        ("log-prob margin chosen - rejected, SFT -> DPO", f"{evaluation.sft.margin:.2f} -> {evaluation.dpo.margin:.2f}"),
        ("DPO reward accuracy / margin vs SFT reference", f"{evaluation.reward_accuracy:.3f} / {evaluation.reward_margin:.3f}"),
        (f"{final}: eval loss (first -> last eval)", arrow(numbers["dpo_eval_loss"])),
        (f"{final}: eval reward accuracy (first -> last eval)", arrow(numbers["dpo_eval_reward_accuracy"])),
    ]
    minutes = " + ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.items() if name != "total")
    chat_lines = [f"  user: {prompt}\n  assistant: {answer.strip() or '(nothing: it ended its answer at once)'}"
                  for prompt, answer in chats]
    text = "\n".join([
        f"== ray-zephyr: the Zephyr recipe end to end in {timings['total'] / 60:.1f} min ({minutes}) ==",
        table(rows),
        "",
        "AI feedback and dDPO, round by round (the policy's own samples; the task's verifier as judge):",
        rounds_text,
        "",
        "preference accuracy: share of pairs where the model gives the chosen answer a higher log-probability than "
        "the rejected one (summed over completion tokens); DPO reward = beta * (log p_DPO - log p_SFT)",
        "",
        "sample chats with the served DPO model:",
        *chat_lines,
        "",
        f"model:   {model_dir}   (dSFT model: {sft.model_dir})",
        f"curves:  {out / 'training_curves.png'}",
        f"summary: {out / 'summary.json'}   log: {out / 'zephyr.log'}",
        "chat with it (from the repository root):",
        f"  serve run serve.app:build_app model={model_dir} model_name={SERVED_NAME} engine=transformers num_gpus=0",
        "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"    -d '{{\"model\": \"{SERVED_NAME}\", \"messages\": [{{\"role\": \"user\", \"content\": \"{CHAT_PROMPTS[0]}\"}}]}}'",
    ])
    return text, numbers


def main(argv=None) -> None:
    args = parse_args(argv)
    out, sft_recipe, rounds_recipe = load_recipes(args)
    for stale in [out / "sft", *out.glob("round-*"), *(out / name for name in FRESH_FILES)]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    start, timings = time.perf_counter(), {}

    with console(out / "zephyr.log") as (stdout, stderr):
        import ray.data
        from tqdm import tqdm

        from ray_zephyr.evaluation.preference_accuracy import evaluate_preferences
        from ray_zephyr.iterative import round_recipes, run_rounds
        from ray_zephyr.report import plot_curves, read_metrics
        from ray_zephyr.runtime import VERBOSE_ENV, init_ray

        # Ray started for this run, unless told to join one (RAY_ADDRESS, as `ray job submit` sets it); Ray's INFO
        # logs too, since they go to zephyr.log, not to the terminal
        os.environ.setdefault(VERBOSE_ENV, "1")
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
        rounds_text, rounds = timed(STAGES[1], lambda: run_rounds(
            rounds_recipe, lambda recipe, label: train_with_progress(recipe, label, stderr)))
        model_dir = Path(rounds["model"])
        dpo_recipe = round_recipes(rounds_recipe, 1)[1]  # every round's eval pairs are the recipe's held-out ones
        evaluation = timed("evaluate", lambda: evaluate_preferences(dpo_recipe, str(sft.model_dir), str(model_dir)))
        plot_curves(read_metrics(sft.metrics_file), read_metrics(model_dir.parent / "metrics.jsonl"),
                    out / "training_curves.png")
        chats = timed("chat", lambda: served_chats(model_dir, CHAT_PROMPTS, SERVED_NAME, own_ray))
        stages.close()
        timings["total"] = time.perf_counter() - start
        text, numbers = summary(out, sft, rounds, rounds_text, evaluation, chats, timings)
        (out / "summary.json").write_text(json.dumps(numbers, indent=2))
        (out / "summary.txt").write_text(text + "\n")
        print(text, file=stdout, flush=True)


if __name__ == "__main__":
    run_cli(main)
